"""Superblock and GPT parsing on synthetic headers, and fuzzed input never crashing it."""

from __future__ import annotations

import binascii
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlayroot.core.blkid import (
    GPT_ENTRY,
    GPT_HEADER,
    PROBE_BYTES,
    format_guid,
    gpt_partitions,
    probe_bytes,
)

U = uuid.UUID("12345678-9abc-4def-8123-456789abcdef")


def blank() -> bytearray:
    return bytearray(PROBE_BYTES)


def test_ext4() -> None:
    data = blank()
    data[1024 + 0x38 : 1024 + 0x3A] = b"\x53\xef"
    data[1024 + 0x68 : 1024 + 0x78] = U.bytes
    data[1024 + 0x78 : 1024 + 0x7D] = b"state"
    found = probe_bytes(bytes(data))
    assert found is not None
    assert (found.fstype, found.uuid, found.label) == ("ext4", str(U), "state")


def test_btrfs_label_and_fsid() -> None:
    data = blank()
    base = 0x10000
    data[base + 0x40 : base + 0x48] = b"_BHRfS_M"
    data[base + 0x20 : base + 0x30] = U.bytes
    data[base + 0x12B : base + 0x12B + 4] = b"data"
    found = probe_bytes(bytes(data))
    assert found is not None
    assert (found.fstype, found.uuid, found.label) == ("btrfs", str(U), "data")


def test_xfs_without_label() -> None:
    data = blank()
    data[0:4] = b"XFSB"
    data[32:48] = U.bytes
    found = probe_bytes(bytes(data))
    assert found is not None and (found.fstype, found.uuid, found.label) == ("xfs", str(U), None)


def test_unknown_and_short_input() -> None:
    assert probe_bytes(bytes(blank())) is None
    assert probe_bytes(b"") is None


def test_guid_mixed_endian_matches_uuid_module() -> None:
    assert format_guid(U.bytes_le) == str(U)


def make_gpt(
    path: Path,
    entries: list[tuple[uuid.UUID, uuid.UUID, str]],
    *,
    count: int = 128,
    corrupt: str = "",
) -> None:
    sector = 512
    table = bytearray(count * GPT_ENTRY.size)
    for i, (type_guid, unique, name) in enumerate(entries):
        GPT_ENTRY.pack_into(
            table,
            i * GPT_ENTRY.size,
            type_guid.bytes_le,
            unique.bytes_le,
            2048,
            4095,
            0,
            name.encode("utf-16-le"),
        )
    table_crc = binascii.crc32(table)
    if corrupt == "table":
        table[5] ^= 0xFF
    header = bytearray(sector)
    fields = (
        b"EFI PART",
        b"\0\0\1\0",
        92,
        0,
        1,
        9999,
        34,
        9966,
        uuid.uuid4().bytes_le,
        2,
        count,
        GPT_ENTRY.size,
        table_crc,
    )
    GPT_HEADER.pack_into(header, 0, *fields)
    struct.pack_into("<I", header, 16, binascii.crc32(header[:92]))
    if corrupt == "header":
        header[40] ^= 0xFF
    path.write_bytes(bytes(sector) + header + table + bytes(sector * 4))


LINUX = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")


def test_gpt_entries(tmp_path: Path) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    make_gpt(tmp_path / "d", [(LINUX, a, "root-a"), (uuid.UUID(int=0), b, ""), (LINUX, b, "é")])
    parts = gpt_partitions(str(tmp_path / "d"))
    assert [(p.number, p.uuid, p.label) for p in parts] == [(1, str(a), "root-a"), (3, str(b), "é")]


@pytest.mark.parametrize("corrupt", ["header", "table"])
def test_gpt_with_a_bad_crc_is_no_gpt(tmp_path: Path, corrupt: str) -> None:
    make_gpt(tmp_path / "d", [(LINUX, uuid.uuid4(), "x")], corrupt=corrupt)
    assert gpt_partitions(str(tmp_path / "d")) == []


@settings(max_examples=300)
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash_the_readers(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "d"
    path.write_bytes(data)
    assert gpt_partitions(str(path)) == [] or data[512:520] == b"EFI PART"
    probe_bytes(data)


@settings(max_examples=300)
@given(st.binary(min_size=92, max_size=92))
def test_random_gpt_headers_with_a_valid_signature(
    tmp_path_factory: pytest.TempPathFactory, tail: bytes
) -> None:
    header = bytearray(b"EFI PART" + tail[8:]) + bytes(420)
    struct.pack_into("<II", header, 12, 92, 0)
    struct.pack_into("<I", header, 16, binascii.crc32(header[:92]))  # get past the CRC check
    path = tmp_path_factory.mktemp("fuzz") / "d"
    path.write_bytes(bytes(512) + header)
    assert isinstance(gpt_partitions(str(path)), list)
