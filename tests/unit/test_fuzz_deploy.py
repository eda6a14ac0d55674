"""``overlayroot deploy``'s readers, fuzzed: ``--created`` and ``SOURCE_DATE_EPOCH``, the source
file's magic, and whole tar archives (random, or a valid one with bytes changed) as the source.
Whatever they hold, deploying raises only BootError."""

from __future__ import annotations

import io
import shutil
import struct
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import strategies as st

from overlayroot.commands import cli, deploy, sources, staging
from overlayroot.core import layout
from overlayroot.core.errors import BootError
from tests import fuzzing

DIGITS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(["٣", "1_0", " 1", "+1", "1e3", "9" * 5000, "", "0x10"]),
)
CREATED = st.one_of(
    st.none(),
    st.text(max_size=40),
    DIGITS.map(lambda d: "@" + d),
    st.datetimes().map(lambda t: t.isoformat()),
    st.sampled_from(
        [
            "9999-12-31T23:59:59Z",
            "9999-12-31T23:59:59-14:00",
            "0001-01-01T00:00:00Z",
            "1970-01-01T00:00:00+00:01",
            "2024-02-30T00:00:00Z",
            "2024-05-01T12:00Z",
        ]
    ),
)
SOURCE_DATE_EPOCH = st.one_of(st.none(), DIGITS, st.text(max_size=12))


def feed_created(values: tuple[str | None, str | None]) -> None:
    epoch = deploy.parse_created(*values)
    if epoch is not None:  # what deploy does with it
        layout.check_id(staging.default_id(epoch))
        layout.created_stamp(epoch)


def near_valid_image(data: bytes, magic: int) -> bytes:
    """``data`` with the erofs or squashfs magic, or a tar or compressor magic, put in place."""
    head = bytearray(data.ljust(2048, b"\0"))
    if magic == 0:
        struct.pack_into("<I", head, 1024, 0xE0F5E1E2)
    elif magic == 1:
        head[0:4] = b"hsqs"
    else:
        offset, value = sources.TAR_MAGICS[magic - 2]
        head[offset : offset + len(value)] = value
    return bytes(head)


HEADS = st.one_of(
    st.binary(max_size=2100),
    st.tuples(st.binary(max_size=2100), st.integers(0, 1 + len(sources.TAR_MAGICS))).map(
        lambda d: near_valid_image(*d)
    ),
)


def feed_head(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "source"
        path.write_bytes(data)
        sources.is_tar(path)
        sources.detect_image(path)


def valid_tar() -> bytes:
    """A tar archive of a tree with the mount points and a file."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in layout.MOUNT_POINTS:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        info = tarfile.TarInfo("etc/hostname")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"test\n"))
    return out.getvalue()


VALID_TAR = valid_tar()
TARS = st.one_of(
    st.binary(max_size=2048).map(lambda b: near_valid_image(b, 2)),  # "ustar" at 257
    st.binary(max_size=512).map(lambda b: b"\x1f\x8b" + b),  # gzip magic
    # The valid archive with a few bytes changed, or cut short.
    st.lists(
        st.tuples(st.integers(0, len(VALID_TAR) - 1), st.integers(0, 255)), min_size=1, max_size=8
    ).map(lambda changes: bytes(_changed(bytearray(VALID_TAR), changes))),
    st.integers(0, len(VALID_TAR)).map(lambda n: VALID_TAR[:n] if n > 262 else VALID_TAR),
)


def _changed(data: bytearray, changes: list[tuple[int, int]]) -> bytearray:
    for offset, value in changes:
        data[offset] = value
    return data


def feed_tar(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source, sysroot = Path(tmp) / "root.tar", Path(tmp) / "sysroot"
        source.write_bytes(data)
        sysroot.mkdir()
        try:
            staging.deploy(sysroot, source, deployment_id="t", fmt="dir", created=0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # what tar unpacked may be read-only


READERS = {
    "deploy.parse_created": fuzzing.Reader(
        st.tuples(CREATED, SOURCE_DATE_EPOCH), feed_created, (BootError,)
    ),
    "sources.detect_image/is_tar": fuzzing.Reader(HEADS, feed_head, (BootError,)),
    "staging.deploy(tar)": fuzzing.Reader(TARS, feed_tar, (BootError,), costly=True),
}


@pytest.mark.parametrize("name", READERS)
def test_reading_what_deploy_is_given_raises_only_boot_errors(name: str) -> None:
    if name == "staging.deploy(tar)" and shutil.which("tar") is None:
        pytest.skip("needs GNU tar")
    reader = READERS[name]
    fuzzing.check(reader, fuzzing.examples(reader))


# -- the cases of issue 7 ----------------------------------------------------------------------


def tree(root: Path) -> Path:
    for name in layout.MOUNT_POINTS:
        (root / name).mkdir(parents=True)
    return root


@pytest.mark.parametrize(
    "created",
    [
        "@99999999999999999999",
        "@253402300800",
        "@" + "9" * 5000,
        "@٣",
        "@1_0",
        "@ 1",
        "@+1",
        "10000-01-01T00:00:00Z",
    ],
)
def test_a_created_time_out_of_range_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], created: str
) -> None:
    argv = ["deploy", "--sysroot", str(tmp_path), "--created", created, str(tree(tmp_path / "t"))]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == (
        f"overlayroot: error: --created {created!r} is not a time from 1970 to 9999: give RFC 3339"
        " ('2024-05-01T12:00:00Z') or '@<unix seconds>' (0 to 253402300799)\n"
    )


def test_the_last_second_of_9999_is_a_time() -> None:
    assert deploy.parse_created("@253402300799", None) == deploy.MAX_EPOCH
    assert deploy.parse_created("9999-12-31T23:59:59Z", None) == deploy.MAX_EPOCH
    assert staging.default_id(deploy.MAX_EPOCH) == "99991231.235959"
    assert layout.created_stamp(deploy.MAX_EPOCH) == "9999-12-31T23:59:59Z"


def test_a_huge_source_date_epoch_is_named() -> None:
    with pytest.raises(
        BootError,
        match=r"^SOURCE_DATE_EPOCH '@99999999999999999999' is not a"
        r" time from 1970 to 9999",
    ):
        deploy.parse_created(None, "99999999999999999999")


def test_an_empty_id_is_refused_not_replaced_by_the_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["deploy", "--sysroot", str(tmp_path), "--id", "", str(tree(tmp_path / "t"))]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.startswith(
        "overlayroot: error: invalid deployment id '': use 1-64 letters, digits"
    )
    assert not (tmp_path / "overlayroot" / "deployments").exists()


def test_an_erofs_image_with_another_format_is_named_in_english(tmp_path: Path) -> None:
    image = tmp_path / "root.erofs"
    image.write_bytes(near_valid_image(bytes(4096), 0))
    with pytest.raises(BootError, match=f"^{image} is an erofs image, but --format squashfs was"):
        sources.inspect_source(image, "squashfs")
