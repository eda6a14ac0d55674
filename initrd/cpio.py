"""The newc ("070701") cpio format the kernel unpacks an initramfs from, declared as data.

Each entry is a 110-byte header of thirteen 8-digit ASCII hex fields, the NUL-terminated name
padded to 4 bytes (counting the header), then the data padded to 4 bytes. The archive ends with
an entry named ``TRAILER!!!``. Writing is deterministic: inode numbers follow entry order,
owners are 0:0 and every mtime is the one given.
"""

from __future__ import annotations

import io
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from construct import Bytes, Const, ConstructError, ExprAdapter, Padding, Struct, this

from initrd.errors import BuildError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


class CpioError(BuildError):
    """Bytes that are not a newc archive, or one cut short."""


def _hex(raw: bytes) -> int:
    # int(raw, 16) alone would also take " +1_f" and "0x1f".
    if not _HEX_DIGITS.issuperset(raw):
        raise ValueError(f"header field {raw!r} is not 8 hex digits")
    return int(raw, 16)


HexField = ExprAdapter(
    Bytes(8),
    decoder=lambda raw, ctx: _hex(raw),
    encoder=lambda value, ctx: b"%08x" % value,
)

Header = Struct(
    "magic" / Const(MAGIC),
    "ino" / HexField,
    "mode" / HexField,
    "uid" / HexField,
    "gid" / HexField,
    "nlink" / HexField,
    "mtime" / HexField,
    "filesize" / HexField,
    "devmajor" / HexField,
    "devminor" / HexField,
    "rdevmajor" / HexField,
    "rdevminor" / HexField,
    "namesize" / HexField,
    "check" / HexField,
)

Entry = Struct(
    "header" / Header,
    "name" / Bytes(this.header.namesize),
    Padding(lambda ctx: -(Header.sizeof() + ctx.header.namesize) % 4),
    "data" / Bytes(this.header.filesize),
    Padding(lambda ctx: -ctx.header.filesize % 4),
)


@dataclass(frozen=True)
class Member:
    """One archive member: ``name`` is relative (no leading slash), as the kernel expects."""

    name: str
    mode: int
    """File type and permission bits, as in ``st_mode``."""
    data: bytes = b""
    """File contents, or the target of a symbolic link."""
    rdev: tuple[int, int] = (0, 0)
    """Major and minor number of a device node."""

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> Member:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> Member:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> Member:
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, name: str, major: int, minor: int, perm: int = 0o600) -> Member:
        return cls(name, stat.S_IFCHR | perm, rdev=(major, minor))


def write_cpio(out: BinaryIO, members: Iterable[Member], mtime: int = 0) -> int:
    """Write ``members`` in the given order plus the trailer; return the bytes written."""
    written = 0
    for ino, member in enumerate(members, start=1):
        written += out.write(_build(member, ino, mtime))
    written += out.write(_build(Member(TRAILER, 0), 0, 0))
    return written


def read_cpio(data: bytes) -> Iterator[Member]:
    """The members of a newc archive up to its trailer (for tests and inspection); a
    CpioError for bytes that are not one."""
    stream = io.BytesIO(data)
    while True:
        offset = stream.tell()
        try:
            entry = Entry.parse_stream(stream)
            name = bytes(entry.name).rstrip(b"\0").decode()
        except (ConstructError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            raise CpioError(
                f"not a newc cpio archive, or one cut short: at byte {offset}: {e}"
            ) from None
        if name == TRAILER:
            return
        header = entry.header
        yield Member(
            name=name,
            mode=header.mode,
            data=bytes(entry.data),
            rdev=(header.rdevmajor, header.rdevminor),
        )


def _build(member: Member, ino: int, mtime: int) -> bytes:
    name = member.name.encode() + b"\0"
    is_dir = stat.S_ISDIR(member.mode)
    header = {
        "ino": ino,
        "mode": member.mode,
        "uid": 0,
        "gid": 0,
        "nlink": 2 if is_dir else 1,
        "mtime": mtime,
        "filesize": len(member.data),
        "devmajor": 0,
        "devminor": 0,
        "rdevmajor": member.rdev[0],
        "rdevminor": member.rdev[1],
        "namesize": len(name),
        "check": 0,
    }
    built: bytes = Entry.build({"header": header, "name": name, "data": member.data})
    return built
