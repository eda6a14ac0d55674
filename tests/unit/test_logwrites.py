"""The write-log reader and replayer on synthetic logs: cuts, marks, discards, damaged logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu.logwrites import (
    ENTRY,
    MAGIC,
    SUPER,
    VERSION,
    Flag,
    LogFormatError,
    Replayer,
    read_log,
    sectors_written,
)

SECTOR = 512


def sector(byte: int, count: int = 1) -> bytes:
    return bytes([byte]) * (SECTOR * count)


def make_log(
    path: Path,
    entries: list[tuple[int, int, Flag, bytes]],
    *,
    count: int | None = None,
    sectorsize: int = SECTOR,
    magic: int = MAGIC,
    version: int = VERSION,
) -> Path:
    """A log of (sector, nr_sectors, flags, data) entries, as blklogwrites writes one."""
    body = b""
    for target, nr_sectors, flags, data in entries:
        mark = data if flags & Flag.MARK else b""
        header = ENTRY.pack(target, nr_sectors, int(flags), len(mark)) + mark
        body += header.ljust(sectorsize, b"\0")
        if not flags & (Flag.MARK | Flag.DISCARD):
            body += data
    total = len(entries) if count is None else count
    head = SUPER.pack(magic, version, total, sectorsize).ljust(sectorsize, b"\0")
    path.write_bytes(head + body)
    return path


def base_disk(path: Path, sectors: int = 16) -> Path:
    path.write_bytes(sector(0xAA, sectors))
    return path


def test_a_cut_at_a_flush_keeps_what_came_before_and_drops_what_came_after(
    tmp_path: Path,
) -> None:
    log = read_log(
        make_log(
            tmp_path / "log",
            [
                (1, 1, Flag(0), sector(1)),
                (0, 0, Flag.FLUSH, b""),
                (2, 2, Flag(0), sector(2, 2)),
                (3, 1, Flag.FUA, sector(3)),
                (4, 1, Flag(0), sector(4)),  # never flushed
            ],
        )
    )
    assert log.durable_points() == [1, 3]
    replay = Replayer(log, base_disk(tmp_path / "base"), tmp_path / "disk")
    replay.advance(1)
    first = replay.snapshot(tmp_path / "cut1").read_bytes()
    assert first == sector(0xAA) + sector(1) + sector(0xAA, 14)
    replay.advance(3)
    second = replay.image.read_bytes()
    assert second == sector(0xAA) + sector(1) + sector(2) + sector(3) + sector(0xAA, 12)
    assert (tmp_path / "cut1").read_bytes() == first  # a snapshot does not follow the replay
    assert (tmp_path / "base").read_bytes() == sector(0xAA, 16)  # nor does the base change


def test_a_discard_leaves_zeros_and_a_mark_writes_nothing(tmp_path: Path) -> None:
    log = read_log(
        make_log(
            tmp_path / "log",
            [
                (2, 2, Flag.DISCARD, b""),
                (0, 0, Flag.MARK, b"before-deploy"),
                (5, 1, Flag(0), sector(5)),
                (0, 0, Flag.FLUSH, b""),
            ],
        )
    )
    assert [e.mark for e in log.entries] == [None, "before-deploy", None, None]
    replay = Replayer(log, base_disk(tmp_path / "base", 8), tmp_path / "disk")
    replay.advance(3)
    assert replay.image.read_bytes() == (
        sector(0xAA, 2) + sector(0, 2) + sector(0xAA) + sector(5) + sector(0xAA, 2)
    )


def test_the_writes_to_a_range_of_sectors_are_found_with_their_data(tmp_path: Path) -> None:
    log = read_log(
        make_log(
            tmp_path / "log",
            [
                (0, 4, Flag(0), sector(1) + sector(2) + sector(3) + sector(4)),
                (9, 1, Flag(0), sector(9)),
                (0, 0, Flag.FLUSH, b""),
            ],
        )
    )
    hits = list(sectors_written(log, 2, 8))
    assert [(e.index, first, count) for e, first, count in hits] == [(0, 2, 2), (1, 9, 1)]
    entry, first, count = hits[0]
    assert log.data(entry, first, count) == sector(3) + sector(4)
    with pytest.raises(ValueError, match="outside entry 0"):
        log.data(entry, 3, 4)
    with pytest.raises(ValueError, match="entry 2 carries no data"):
        log.data(log.entries[2], 0, 1)


def test_entries_past_the_super_blocks_count_are_not_read(tmp_path: Path) -> None:
    # QEMU rewrites the count at each flush: writes after the last one are not counted yet.
    log = read_log(
        make_log(
            tmp_path / "log",
            [
                (1, 1, Flag(0), sector(1)),
                (0, 0, Flag.FLUSH, b""),
                (2, 1, Flag(0), sector(2)),
            ],
            count=2,
        )
    )
    assert len(log.entries) == 2


def test_the_replay_only_goes_forward_and_not_past_the_log(tmp_path: Path) -> None:
    log = read_log(make_log(tmp_path / "log", [(0, 0, Flag.FLUSH, b"")]))
    replay = Replayer(log, base_disk(tmp_path / "base"), tmp_path / "disk")
    replay.advance(0)
    with pytest.raises(ValueError, match="entry 1 is past the log's 1 entries"):
        replay.advance(1)
    with pytest.raises(ValueError, match="it cannot go back to -1"):
        replay.advance(-1)


def test_a_write_past_the_end_of_the_base_disk_says_so(tmp_path: Path) -> None:
    log = read_log(make_log(tmp_path / "log", [(20, 1, Flag(0), sector(1))]))
    replay = Replayer(log, base_disk(tmp_path / "base", 8), tmp_path / "disk")
    with pytest.raises(
        LogFormatError,
        match=r"entry 0 writes bytes 10240\.\.10752, past the end"
        r" of the 4096-byte disk .*wrong base disk\?",
    ):
        replay.advance(0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"short"), "5 bytes is too short for a write log's super block"),
        (lambda p: p.write_bytes(b"\xff" * 4096), "not a write log \\(magic 0xffffffffffffffff"),
        (lambda p: make_log(p, [], version=2), "write log version 2; only 1 is known"),
        (lambda p: make_log(p, [], sectorsize=24), "sector size 24 is not a power of two"),
        (
            lambda p: make_log(p, [(0, 0, Flag.FLUSH, b"")], count=3),
            "torn write log: the super block counts 3 entries, but the file ends \\(1024 bytes\\)"
            " inside entry 1",
        ),
        (
            lambda p: make_log(p, [(0, 0, Flag(64), b"")]),
            "entry 0 at byte 512 has unknown flags 0x40: the log is damaged",
        ),
    ],
    ids=["short", "garbage", "version", "sectorsize", "torn", "flags"],
)
def test_a_damaged_log_is_a_clear_error(tmp_path: Path, make: object, message: str) -> None:
    path = tmp_path / "log"
    assert callable(make)
    make(path)
    with pytest.raises(LogFormatError, match=f"{path}: {message}"):
        read_log(path)


def test_data_cut_short_by_the_end_of_the_file_is_a_torn_log(tmp_path: Path) -> None:
    path = make_log(tmp_path / "log", [(0, 4, Flag(0), sector(1, 4))])
    path.write_bytes(path.read_bytes()[:-SECTOR])
    with pytest.raises(
        LogFormatError,
        match="torn write log: entry 0 writes 4 sectors that run"
        " past the end of the file \\(2560 bytes\\)",
    ):
        read_log(path)


def test_a_missing_log_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(
        LogFormatError, match=f"{tmp_path}/nope: cannot read the write log: No such file"
    ):
        read_log(tmp_path / "nope")


def test_a_mark_too_long_for_its_sector_is_damage(tmp_path: Path) -> None:
    path = make_log(tmp_path / "log", [(0, 0, Flag.MARK, b"")])
    raw = bytearray(path.read_bytes())
    ENTRY.pack_into(raw, SECTOR, 0, 0, int(Flag.MARK), 1000)
    path.write_bytes(bytes(raw))
    with pytest.raises(LogFormatError, match="entry 0: a mark of 1000 bytes does not fit"):
        read_log(path)
