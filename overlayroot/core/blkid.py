"""Identify filesystems and GPT partitions by reading their on-disk headers, like blkid -p.

Each format is declared once as data: where its superblock sits, its magic, and where the UUID
and label are. No udev and no blkid binary are needed in the initramfs.
"""

from __future__ import annotations

import binascii
import codecs
import io
from _struct import Struct  # what struct.Struct is, without the struct module

# (fstype, superblock offset, magic offset in it, magic, uuid (offset, length) or None,
#  label (offset, length, encoding) or None)
_Superblock = tuple[str, int, int, bytes, "tuple[int, int] | None", "tuple[int, int] | None"]
SUPERBLOCKS: tuple[_Superblock, ...] = (
    ("ext4", 1024, 0x38, b"\x53\xef", (0x68, 16), (0x78, 16)),
    ("btrfs", 0x10000, 0x40, b"_BHRfS_M", (0x20, 16), (0x12B, 256)),
    ("xfs", 0, 0, b"XFSB", (32, 16), (108, 12)),
    ("erofs", 1024, 0, b"\xe2\xe1\xf5\xe0", (48, 16), (64, 16)),
    ("squashfs", 0, 0, b"hsqs", None, None),
)
PROBE_BYTES = 0x10000 + 0x1000  # enough for every superblock above (btrfs is the furthest)

GPT_SIGNATURE = b"EFI PART"
# struct gpt_header, up to the fields we use (UEFI spec 2.10 §5.3.2).
GPT_HEADER = Struct("<8s4sII4xQQQQ16sQIII")
# struct gpt_entry (UEFI spec §5.3.3).
GPT_ENTRY = Struct("<16s16sQQQ72s")
MAX_GPT_ENTRIES = 1024


class Probe:
    """What a block device's first bytes say it holds."""

    __slots__ = ("fstype", "label", "uuid")

    def __init__(self, fstype: str, uuid: str | None, label: str | None) -> None:
        self.fstype = fstype
        self.uuid = uuid
        self.label = label

    def __repr__(self) -> str:
        return f"Probe({self.fstype!r}, uuid={self.uuid!r}, label={self.label!r})"


class Partition:
    """One used GPT entry: its number (1-based, as the kernel numbers it), PARTUUID, PARTLABEL."""

    __slots__ = ("label", "number", "uuid")

    def __init__(self, number: int, uuid: str, label: str) -> None:
        self.number = number
        self.uuid = uuid
        self.label = label

    def __repr__(self) -> str:
        return f"Partition({self.number}, uuid={self.uuid!r}, label={self.label!r})"


def format_uuid(raw: bytes) -> str:
    """Filesystem UUIDs are stored in display order."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def format_guid(raw: bytes) -> str:
    """GPT GUIDs store their first three fields little-endian (``uuid.UUID(bytes_le=...)``)."""
    swapped = raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]
    return format_uuid(swapped)


def probe_bytes(data: bytes) -> Probe | None:
    """The filesystem whose superblock is in ``data`` (the start of a device), if any."""
    for fstype, base, magic_at, magic, uuid_at, label_at in SUPERBLOCKS:
        start = base + magic_at
        if data[start : start + len(magic)] != magic:
            continue
        uuid = None
        if uuid_at is not None:
            raw = data[base + uuid_at[0] : base + uuid_at[0] + uuid_at[1]]
            uuid = format_uuid(raw) if any(raw) else None
        label = None
        if label_at is not None:
            raw = data[base + label_at[0] : base + label_at[0] + label_at[1]]
            label = raw.split(b"\0", 1)[0].decode("utf-8", "replace") or None
        return Probe(fstype, uuid, label)
    return None


def probe(path: str) -> Probe | None:
    with open(path, "rb") as f:
        return probe_bytes(f.read(PROBE_BYTES))


def gpt_partitions(path: str, sector_size: int = 512) -> list[Partition]:
    """The used entries of the GPT on ``path``; empty when there is no valid GPT.

    Only the primary header is read, and its CRCs are checked: a disk with a corrupt primary GPT
    is one the kernel may not partition the same way either.
    """
    with open(path, "rb") as f:
        f.seek(sector_size)
        header = f.read(sector_size)
        if len(header) < GPT_HEADER.size or header[:8] != GPT_SIGNATURE:
            return []
        (
            _,
            _,
            header_size,
            header_crc,
            _,
            _,
            _,
            _,
            _,
            entries_lba,
            count,
            entry_size,
            entries_crc,
        ) = GPT_HEADER.unpack_from(header)
        if not GPT_HEADER.size <= header_size <= sector_size:
            return []
        zeroed = header[:16] + b"\0\0\0\0" + header[20:header_size]
        if binascii.crc32(zeroed) != header_crc:
            return []
        if count > MAX_GPT_ENTRIES or not GPT_ENTRY.size <= entry_size <= 4096:
            return []
        # A table said to lie past the end is no table (seeking there may fail or overflow).
        if entries_lba * sector_size + count * entry_size > f.seek(0, io.SEEK_END):
            return []
        f.seek(entries_lba * sector_size)
        table = f.read(count * entry_size)
    if len(table) != count * entry_size or binascii.crc32(table) != entries_crc:
        return []
    partitions = []
    for index in range(count):
        type_guid, unique, _first, _last, _attrs, name = GPT_ENTRY.unpack_from(
            table, index * entry_size
        )
        if not any(type_guid):
            continue
        # The codec function directly: bytes.decode("utf-16-le") would import an encodings
        # module at run time, which the frozen stage does not carry.
        label = codecs.utf_16_le_decode(name, "replace")[0].split("\0", 1)[0]
        partitions.append(Partition(index + 1, format_guid(unique), label))
    return partitions
