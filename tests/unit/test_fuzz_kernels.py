"""The deployment side of issue 9, fuzzed: a root's ``kargs.d/*.toml`` files, its kernel image
header, ``--karg`` words and the boot pair's ``pair.json`` note. Whatever they hold, reading them
raises only BootError (the note is never an error: it is only a note)."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import strategies as st

from overlayroot.commands import bootpair, kernels
from overlayroot.core.errors import BootError
from tests import fuzzing
from tests.kernelfakes import bzimage

TOML_PIECES = st.sampled_from(
    [
        "kargs = ",
        "match-architectures = ",
        "[",
        "]",
        '"quiet"',
        '"root=/dev/sda"',
        ", ",
        "\n",
        "'a b'",
        "1",
        "true",
        "{",
        "}",
        "x = 1",
        "[table]",
        "[[kargs]]",
        '"\\ud800"',
        '"é"',
        "=",
        '"x86_64"',
        "inf",
        "nan",
        "1979-05-27",
        '"""',
        "#",
        "\0",
    ]
)
TOML_TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(TOML_PIECES, max_size=30).map("".join),
    st.integers(1, 3000).map(lambda n: "kargs = " + "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: "a = " + "{x = " * n + "1" + "}" * n),
)
TOML_BYTES = st.one_of(TOML_TEXT.map(str.encode), st.binary(max_size=200))


def feed_kargs_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / kernels.KARGS_DIR
        directory.mkdir(parents=True)
        (directory / "10-fuzz.toml").write_bytes(data)
        kernels.check_kargs(kernels.read_kargs_dir(Path(tmp), "x86_64"))


HEADERS = st.one_of(
    st.binary(max_size=0x600),
    st.tuples(st.text(max_size=80), st.integers(0, 0xFFFF)).map(
        lambda v: _with_pointer(bzimage(v[0].replace("\0", "")), v[1])
    ),
    st.tuples(st.binary(min_size=0x210, max_size=0x800), st.integers(0, 0xFFFF)).map(
        lambda v: _with_pointer(v[0][:0x202] + b"HdrS" + v[0][0x206:], v[1])
    ),
)


def _with_pointer(image: bytes, pointer: int) -> bytes:
    data = bytearray(image)
    if len(data) >= 0x210:
        struct.pack_into("<H", data, 0x20E, pointer)
    return bytes(data)


def feed_kernel_image(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vmlinuz"
        path.write_bytes(data)
        for machine in ("x86_64", "aarch64", "s390x"):
            kernels.check_image(path, "6.1.0-27-cloud-amd64", machine)


def feed_kargs(words: list[str]) -> None:
    kernels.check_kargs(words)


def feed_pair_record(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / bootpair.RECORD).write_bytes(data)
        (Path(tmp) / bootpair.KERNEL).write_bytes(b"kernel")
        record = bootpair.read_record(Path(tmp))
        assert record is None or isinstance(record, dict)
        pair = bootpair.describe(Path(tmp), {})
        bootpair.summary(pair, Path(tmp))


READERS = {
    "kernels.read_kargs_dir": fuzzing.Reader(TOML_BYTES, feed_kargs_file, (BootError,)),
    "kernels.check_image": fuzzing.Reader(HEADERS, feed_kernel_image, (BootError,)),
    "kernels.check_kargs": fuzzing.Reader(
        st.lists(st.text(max_size=20), max_size=5), feed_kargs, (BootError,)
    ),
    "bootpair.read_record": fuzzing.Reader(
        st.one_of(
            st.binary(max_size=200),
            st.text(max_size=200).map(str.encode),
            st.sampled_from(
                [b'{"version": 1, "vmlinuz_sha256": 2}', b"[" * 5000, b'{"deployment": {"a": []}}']
            ),
        ),
        feed_pair_record,
        (),
    ),
}


@pytest.mark.parametrize("name", READERS)
def test_the_kernel_readers_raise_only_boot_errors(name: str) -> None:
    reader = READERS[name]
    fuzzing.check(reader, fuzzing.examples(reader))
