"""The builder's readers of outside input, fuzzed: cpio archives (what the writer makes, changed
or cut short, and random bytes), kernel modules' ELF headers, and ``SOURCE_DATE_EPOCH``."""

from __future__ import annotations

import gzip
import io
import lzma
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import strategies as st

from initrd import cli as initrd_cli
from initrd.cpio import CpioError, Member, read_cpio, write_cpio
from initrd.errors import BuildError
from initrd.kmod import ModuleError, decompress, parse_modinfo
from tests import fuzzing
from tests.unit.test_initrd_kmod import fake_ko


def archive(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    write_cpio(out, [Member.file(name, data) for name, data in members], mtime=7)
    return out.getvalue()


def changed(data: bytes, changes: list[tuple[int, int]], cut: int) -> bytes:
    """``data`` with bytes set at some offsets (modulo its length), then cut to ``cut`` bytes."""
    result = bytearray(data)
    for offset, value in changes:
        result[offset % len(result)] = value
    return bytes(result[:cut])


NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\0/"), min_size=1, max_size=12)
MEMBERS = st.lists(st.tuples(NAMES, st.binary(max_size=40)), max_size=3)
CHANGES = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6)
CPIO_BYTES = st.one_of(
    st.binary(max_size=600),
    st.builds(changed, MEMBERS.map(archive), CHANGES, st.integers(0, 1000)),
    # A header field of ASCII that int(x, 16) would take but is not 8 hex digits.
    st.builds(
        lambda a, field, text: a[: 6 + 8 * field] + text + a[14 + 8 * field :],
        MEMBERS.map(archive),
        st.integers(0, 12),
        st.sampled_from([b" +000001", b"0x000001", b"0000_001", b"   -0001"]),
    ),
)


def feed_cpio(data: bytes) -> None:
    for member in read_cpio(data):
        member.name.encode()


MODULES = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda cut: b"\x7fELF\x02\x01"[:cut], st.integers(0, 6)),
    st.builds(
        changed,
        st.lists(st.text(max_size=12), max_size=4).map(fake_ko),
        CHANGES,
        st.integers(0, 1000),
    ),
)


def feed_module(data: bytes) -> None:
    parse_modinfo(data, Path("m.ko"))


COMPRESSED = st.tuples(
    st.sampled_from([".ko.xz", ".ko.gz", ".ko.zst"]),
    st.one_of(
        st.binary(max_size=100),
        st.builds(
            changed,
            st.sampled_from(
                [lzma.compress(b"\x7fELF" * 8), gzip.compress(b"\x7fELF" * 8, mtime=0)]
            ),
            CHANGES,
            st.integers(0, 200),
        ),
    ),
)


def feed_compressed(module: tuple[str, bytes]) -> None:
    suffix, data = module
    if suffix == ".ko.zst" and shutil.which("zstd") is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"m{suffix}"
        path.write_bytes(data)
        decompress(path)


EPOCHS = st.one_of(
    st.text(max_size=24),
    st.integers(-(10**25), 10**25).map(str),
    st.sampled_from(["٣", "1_0", " 1", "+1", "4294967296", "99999999999999999999"]),
)


def feed_epoch(value: str) -> None:
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("SOURCE_DATE_EPOCH", value)
        epoch = initrd_cli._source_date_epoch()
    finally:
        mp.undo()
    write_cpio(io.BytesIO(), [Member.file("a", b"")], mtime=epoch)  # the writer takes it


READERS = {
    "initrd.cpio.read_cpio": fuzzing.Reader(CPIO_BYTES, feed_cpio, (CpioError,)),
    "initrd.kmod.parse_modinfo": fuzzing.Reader(MODULES, feed_module, (ModuleError,)),
    "initrd.kmod.decompress": fuzzing.Reader(COMPRESSED, feed_compressed, (ModuleError,)),
    "initrd.cli SOURCE_DATE_EPOCH": fuzzing.Reader(
        EPOCHS.filter(lambda v: "\0" not in v), feed_epoch, (BuildError,)
    ),
}


@pytest.mark.parametrize("name", READERS)
def test_the_builders_readers_raise_only_their_errors(name: str) -> None:
    reader = READERS[name]
    fuzzing.check(reader, fuzzing.examples(reader))


def test_a_cut_archive_is_a_cpio_error_saying_where() -> None:
    data = archive([("etc/hostname", b"test\n")])
    with pytest.raises(
        CpioError,
        match=r"^not a newc cpio archive, or one cut short: at byte"
        r" 132: ",
    ):
        list(read_cpio(data[:140]))


def test_a_header_field_that_is_not_8_hex_digits_is_a_cpio_error() -> None:
    data = archive([("a", b"x")])
    with pytest.raises(CpioError, match=r"header field b' \+000001' is not 8 hex digits"):
        list(read_cpio(data[:6] + b" +000001" + data[14:]))


@pytest.mark.parametrize("data", [b"\x7fELF", b"\x7fELF\x02"])
def test_a_module_cut_inside_its_elf_ident_is_a_module_error(data: bytes) -> None:
    with pytest.raises(ModuleError, match=r"^m\.ko: not a kernel module \(no ELF header\)$"):
        parse_modinfo(data, Path("m.ko"))


def test_a_section_table_offset_past_what_an_index_holds_is_a_module_error() -> None:
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    header[40:48] = (2**63).to_bytes(8, "little")  # e_shoff
    header[60:62] = (1).to_bytes(2, "little")  # e_shnum
    with pytest.raises(
        ModuleError,
        match=r"^m\.ko: not a kernel module \(bad ELF section"
        r" table: Python int too large to convert to C ssize_t\)$",
    ):
        parse_modinfo(bytes(header), Path("m.ko"))


@pytest.mark.parametrize("value", ["4294967296", "99999999999999999999", "٣", "1_0", "+1", " 1"])
def test_a_source_date_epoch_a_cpio_archive_cannot_hold_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    message = f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds since 1970 up to 4294967295"
    with pytest.raises(BuildError, match="^" + re.escape(message + " (what a cpio archive holds)")):
        initrd_cli._source_date_epoch()


def test_the_last_second_a_cpio_archive_holds_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "4294967295")
    out = io.BytesIO()
    write_cpio(out, [Member.file("a", b"")], mtime=initrd_cli._source_date_epoch())
    assert out.getvalue()[46:54] == b"ffffffff"  # the first header's mtime field


@pytest.mark.parametrize(
    ("suffix", "problem"),
    [
        (".ko.xz", "Input format not supported"),
        (".ko.gz", "Not a gzipped file"),
        (".ko.zst", "zstd: "),
    ],
)
def test_a_module_that_does_not_decompress_is_a_module_error(
    tmp_path: Path, suffix: str, problem: str
) -> None:
    if suffix == ".ko.zst" and shutil.which("zstd") is None:
        pytest.skip("needs zstd")
    path = tmp_path / f"m{suffix}"
    path.write_bytes(b"not compressed")
    with pytest.raises(ModuleError, match=rf"^{path}: cannot decompress it \(.*{problem}"):
        decompress(path)
