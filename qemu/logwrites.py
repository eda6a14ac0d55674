"""Read a write log in dm-log-writes' format, and rebuild a disk as it stood at any entry.

QEMU's ``blklogwrites`` block driver (and Linux's ``dm-log-writes`` target) record every write,
flush, FUA write and discard a guest sends to a disk. The log is a sequence of sectors of
``sectorsize`` bytes:

- sector 0: the super block, ``SUPER``: magic, version, how many entries follow, sector size;
- from sector 1, each entry: one sector holding ``ENTRY`` (target sector, sector count, flags,
  length of a mark's text) padded with zeros, then ``nr_sectors`` sectors of the data written,
  except for a discard (no data). A mark (dm-log-writes only) keeps its text in its own sector.

Sector numbers and counts are in units of the log's sector size. QEMU writes the super block
again at every flush, so the entry count it holds covers every flush the guest completed: the
entries past it are what QEMU wrote after the last flush, which a power cut may drop anyway.

A power cut with a volatile disk cache keeps what was written before the last completed flush
(or FUA write) and may drop everything after it: ``replay`` up to a flush point and stop there
gives the disk such a cut leaves behind.
"""

from __future__ import annotations

import enum
import os
import struct
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = 0x6A736677736872
VERSION = 1
SUPER = struct.Struct("<QQQI")  # magic, version, nr_entries, sectorsize
ENTRY = struct.Struct("<QQQQ")  # sector, nr_sectors, flags, data_len
_CHUNK = 1 << 20


class Flag(enum.IntFlag):
    FLUSH = 1 << 0
    FUA = 1 << 1
    DISCARD = 1 << 2
    MARK = 1 << 3


KNOWN_FLAGS = Flag.FLUSH | Flag.FUA | Flag.DISCARD | Flag.MARK


class LogFormatError(ValueError):
    """A write log that is not one, or is torn: names the file and what is wrong."""


@dataclass(frozen=True)
class Entry:
    index: int
    sector: int
    nr_sectors: int
    flags: Flag
    data_offset: int
    """Where the entry's data starts in the log file."""
    mark: str | None = None

    @property
    def durable_point(self) -> bool:
        """Everything up to and including this entry is on stable storage once it completes."""
        return bool(self.flags & (Flag.FLUSH | Flag.FUA))

    @property
    def writes(self) -> bool:
        return self.nr_sectors > 0 and not self.flags & Flag.MARK


@dataclass(frozen=True)
class WriteLog:
    path: Path
    sectorsize: int
    entries: tuple[Entry, ...]

    def durable_points(self) -> list[int]:
        """Indices of the flush and FUA entries: the moments a power cut can be simulated at."""
        return [e.index for e in self.entries if e.durable_point]

    def data(self, entry: Entry, sector: int, count: int) -> bytes:
        """``count`` sectors of what ``entry`` wrote, starting at disk sector ``sector``."""
        if not entry.writes or entry.flags & Flag.DISCARD:
            raise ValueError(f"entry {entry.index} carries no data")
        first = sector - entry.sector
        if first < 0 or first + count > entry.nr_sectors:
            raise ValueError(f"sectors {sector}+{count} are outside entry {entry.index}")
        with self.path.open("rb") as log:
            log.seek(entry.data_offset + first * self.sectorsize)
            return log.read(count * self.sectorsize)


def read_log(path: Path) -> WriteLog:
    """Parse the log at ``path``; raise LogFormatError for a file that is not a whole log."""
    try:
        size = path.stat().st_size
        with path.open("rb") as log:
            return WriteLog(path, *_parse(log, size, path))
    except OSError as e:
        raise LogFormatError(f"{path}: cannot read the write log: {e.strerror}") from None


def _parse(log: BinaryIO, size: int, path: Path) -> tuple[int, tuple[Entry, ...]]:
    head = log.read(SUPER.size)
    if len(head) < SUPER.size:
        raise LogFormatError(f"{path}: {size} bytes is too short for a write log's super block")
    magic, version, count, sectorsize = SUPER.unpack(head)
    if magic != MAGIC:
        raise LogFormatError(f"{path}: not a write log (magic {magic:#x}, expected {MAGIC:#x})")
    if version != VERSION:
        raise LogFormatError(f"{path}: write log version {version}; only {VERSION} is known")
    if sectorsize < ENTRY.size or sectorsize & (sectorsize - 1) or sectorsize >= 1 << 24:
        raise LogFormatError(
            f"{path}: sector size {sectorsize} is not a power of two between"
            f" {ENTRY.size} bytes and 16 MiB"
        )
    entries = []
    sector = 1
    for index in range(count):
        offset = sector * sectorsize
        log.seek(offset)
        raw = log.read(sectorsize)
        if len(raw) < sectorsize:
            raise LogFormatError(
                f"{path}: torn write log: the super block counts {count} entries, but the file"
                f" ends ({size} bytes) inside entry {index}"
            )
        target, nr_sectors, flags, data_len = ENTRY.unpack_from(raw)
        if flags & ~int(KNOWN_FLAGS):
            raise LogFormatError(
                f"{path}: entry {index} at byte {offset} has unknown flags"
                f" {flags:#x}: the log is damaged"
            )
        mark = None
        if flags & Flag.MARK:
            if data_len > sectorsize - ENTRY.size:
                raise LogFormatError(
                    f"{path}: entry {index}: a mark of {data_len} bytes does not fit its sector"
                )
            mark = raw[ENTRY.size : ENTRY.size + data_len].decode(errors="replace")
        sector += 1
        entry = Entry(index, target, nr_sectors, Flag(flags), sector * sectorsize, mark)
        if entry.writes and not flags & Flag.DISCARD:
            sector += nr_sectors
            if sector * sectorsize > size:
                raise LogFormatError(
                    f"{path}: torn write log: entry {index} writes {nr_sectors} sectors that"
                    f" run past the end of the file ({size} bytes)"
                )
        entries.append(entry)
    return sectorsize, tuple(entries)


def copy_sparse(source: Path, dest: Path) -> None:
    """A copy sharing blocks where the filesystem can (reflink), else keeping holes. ``dest``
    is a new file: a loop device lazily let go of may still hold the old one."""
    dest.unlink(missing_ok=True)
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(source), str(dest)], check=True)


class Replayer:
    """A disk image walked forward through a log: ``advance(i)`` applies entries up to ``i``.

    The image starts as a copy of ``base`` (the disk as it was when the log began).
    """

    def __init__(self, log: WriteLog, base: Path, image: Path) -> None:
        self.log = log
        self.image = image
        self.applied = -1
        copy_sparse(base, image)
        self._disk_size = image.stat().st_size

    def advance(self, index: int) -> None:
        """Apply every entry after the last applied one, up to and including ``index``."""
        if index < self.applied:
            raise ValueError(f"the image is at entry {self.applied}; it cannot go back to {index}")
        if index >= len(self.log.entries):
            raise ValueError(f"entry {index} is past the log's {len(self.log.entries)} entries")
        with self.log.path.open("rb") as log, self.image.open("r+b") as disk:
            for entry in self.log.entries[self.applied + 1 : index + 1]:
                self._apply(entry, log, disk.fileno())
        self.applied = index

    def snapshot(self, dest: Path) -> Path:
        """The image as it stands, copied to ``dest`` (for a check that writes to it)."""
        copy_sparse(self.image, dest)
        return dest

    def _apply(self, entry: Entry, log: BinaryIO, disk: int) -> None:
        if not entry.writes:
            return
        size = self.log.sectorsize
        offset, length = entry.sector * size, entry.nr_sectors * size
        if offset + length > self._disk_size:
            raise LogFormatError(
                f"{self.log.path}: entry {entry.index} writes bytes {offset}..{offset + length},"
                f" past the end of the {self._disk_size}-byte disk {self.image}: wrong base disk?"
            )
        for at, chunk in _chunks(entry, log, size):
            os.pwrite(disk, chunk, offset + at)


def _chunks(entry: Entry, log: BinaryIO, sectorsize: int) -> Iterator[tuple[int, bytes]]:
    """(offset in the write, bytes) of what ``entry`` leaves on the disk; a discard leaves
    zeros (what the device returns after one is not defined: zeros are the harsher reading)."""
    length = entry.nr_sectors * sectorsize
    if entry.flags & Flag.DISCARD:
        for at in range(0, length, _CHUNK):
            yield at, bytes(min(_CHUNK, length - at))
        return
    log.seek(entry.data_offset)
    for at in range(0, length, _CHUNK):
        chunk = log.read(min(_CHUNK, length - at))
        yield at, chunk


def sectors_written(log: WriteLog, first: int, count: int) -> Iterable[tuple[Entry, int, int]]:
    """(entry, first sector, sector count) of every write that touches disk sectors
    ``[first, first + count)``, in log order."""
    end = first + count
    for entry in log.entries:
        if not entry.writes or entry.flags & Flag.DISCARD:
            continue
        lo, hi = max(entry.sector, first), min(entry.sector + entry.nr_sectors, end)
        if lo < hi:
            yield entry, lo, hi - lo
