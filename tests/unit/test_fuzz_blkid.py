"""Superblocks and GPT, fuzzed: random bytes and valid headers with fields changed (checksums
fixed up, so the changes reach the code past them) are "no filesystem" or "no GPT", or what they
say; never an exception."""

from __future__ import annotations

import binascii
import struct
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st

from overlayroot.core.blkid import (
    GPT_ENTRY,
    GPT_HEADER,
    PROBE_BYTES,
    SUPERBLOCKS,
    gpt_partitions,
    probe,
    probe_bytes,
)
from tests import fuzzing

LINUX = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")


def superblock(index: int, noise: bytes, cut: int) -> bytes:
    """A device start with the magic of ``SUPERBLOCKS[index]`` and ``noise`` where its UUID and
    label are, cut to ``cut`` bytes."""
    _, base, magic_at, magic, uuid_at, label_at = SUPERBLOCKS[index]
    data = bytearray(PROBE_BYTES)
    data[base + magic_at : base + magic_at + len(magic)] = magic
    for field in (uuid_at, label_at):
        if field is not None:
            at, size = base + field[0], field[1]
            data[at : at + size] = noise[:size].ljust(size, b"\0")
    return bytes(data[:cut])


SUPERBLOCK_BYTES = st.one_of(
    st.binary(max_size=4096),
    st.builds(
        superblock,
        st.integers(0, len(SUPERBLOCKS) - 1),
        st.binary(max_size=256),
        st.integers(0, PROBE_BYTES),
    ),
)


def feed_probe(data: bytes) -> None:
    found = probe_bytes(data)
    if found is not None:
        f"{found.fstype} {found.uuid} {found.label}".encode()  # printed on the console
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk"
        path.write_bytes(data)
        probe(str(path))


HEADER_FIELDS = (
    "signature",
    "revision",
    "header_size",
    "header_crc",
    "my_lba",
    "alternate_lba",
    "first_usable",
    "last_usable",
    "disk_guid",
    "entries_lba",
    "count",
    "entry_size",
    "entries_crc",
)
FIELD_VALUES = {
    "header_size": st.integers(0, 2**32 - 1),
    "entries_lba": st.one_of(
        st.integers(0, 2**64 - 1),
        st.integers(0, 8),
        st.sampled_from([2**54 - 1, 2**54, 2**63, 2**64 - 1]),
    ),
    "count": st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 1100)),
    "entry_size": st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([128, 127, 4096, 4097])),
}


def gpt_disk(
    changes: dict[str, int], names: list[bytes], fix_table_crc: bool, sector: int
) -> bytes:
    """A valid GPT with ``changes`` to its header fields (the header CRC always recomputed,
    the table's when ``fix_table_crc`` and the table is not huge) and partitions named by raw
    UTF-16 ``names``."""
    count, entry_size = 4, GPT_ENTRY.size
    table = bytearray(count * entry_size)
    for i, name in enumerate(names[:count]):
        GPT_ENTRY.pack_into(
            table,
            i * entry_size,
            LINUX.bytes_le,
            uuid.UUID(int=i + 1).bytes_le,
            2048,
            4095,
            0,
            name,
        )
    values = (
        b"EFI PART",
        b"\0\0\1\0",
        92,
        0,
        1,
        9999,
        34,
        9966,
        bytes(16),
        2,
        count,
        entry_size,
        binascii.crc32(table),
    )
    fields: dict[str, Any] = dict(zip(HEADER_FIELDS, values, strict=True))
    fields.update(changes)
    if fix_table_crc and fields["count"] * fields["entry_size"] <= 1 << 20:
        table_length = fields["count"] * fields["entry_size"]
        fields["entries_crc"] = binascii.crc32(
            bytes(table).ljust(table_length, b"\0")[:table_length]
        )
    header = bytearray(sector)
    GPT_HEADER.pack_into(header, 0, *fields.values())
    size = min(max(fields["header_size"], GPT_HEADER.size), sector)
    struct.pack_into("<I", header, 16, binascii.crc32(header[:16] + bytes(4) + header[20:size]))
    return bytes(sector) + bytes(header) + bytes(table) + bytes(sector * 4)


GPT_DISKS = st.one_of(
    st.binary(max_size=4096),
    st.builds(
        gpt_disk,
        st.fixed_dictionaries({}, optional=FIELD_VALUES),
        st.lists(st.binary(max_size=72), max_size=4),
        st.booleans(),
        st.just(512),
    ).map(lambda disk: (disk, 512)),
    st.builds(
        gpt_disk,
        st.fixed_dictionaries({}, optional=FIELD_VALUES),
        st.lists(st.binary(max_size=72), max_size=4),
        st.booleans(),
        st.just(4096),
    ).map(lambda disk: (disk, 4096)),
).map(lambda d: d if isinstance(d, tuple) else (d, 512))


def feed_gpt(disk: tuple[bytes, int]) -> None:
    data, sector = disk
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk"
        path.write_bytes(data)
        for partition in gpt_partitions(str(path), sector):
            f"{partition.number} {partition.uuid} {partition.label}".encode()


READERS = {
    "blkid.probe_bytes/probe": fuzzing.Reader(SUPERBLOCK_BYTES, feed_probe, ()),
    "blkid.gpt_partitions": fuzzing.Reader(GPT_DISKS, feed_gpt, ()),
}


@pytest.mark.parametrize("name", READERS)
def test_reading_superblocks_and_gpt_never_raises(name: str) -> None:
    reader = READERS[name]
    fuzzing.check(reader, fuzzing.examples(reader))


def test_a_gpt_whose_table_lies_beyond_any_disk_is_no_gpt(tmp_path: Path) -> None:
    for lba in (8, 2**40 - 1, 2**54, 2**64 - 1):  # past the end; times 512 past what seek takes
        path = tmp_path / f"disk-{lba}"
        path.write_bytes(gpt_disk({"entries_lba": lba}, [], True, 512))
        assert gpt_partitions(str(path)) == []


def test_the_gpt_fixture_is_a_valid_gpt(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    names = ["root".encode("utf-16-le"), b"\xff\xdb\x00\x00"]  # the second a lone surrogate
    path.write_bytes(gpt_disk({}, names, True, 512))
    assert [(p.number, p.label) for p in gpt_partitions(str(path))] == [(1, "root"), (2, "\ufffd")]
