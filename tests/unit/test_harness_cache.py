"""The harness's cache entries: all or nothing, and built once when test processes (pytest-xdist
workers) want the same entry at the same time."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from qemu.paths import build_once, entry_lock

# fork: the children run this module's functions without importing it again.
FORK: Any = multiprocessing.get_context("fork")


def test_a_filled_entry_appears_whole_and_replaces_an_incomplete_one(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "thing"
    final.mkdir(parents=True)
    (final / "old").write_text("stale, never marked complete")
    seen: list[bool] = []

    def fill(staging: Path) -> None:
        (staging / "new").write_text("fresh")
        seen.append((final / "new").exists())

    assert build_once(final, fill) == final
    assert seen == [False]  # filled beside it, not in place
    assert (final / "new").read_text() == "fresh" and (final / ".complete").exists()
    assert not (final / "old").exists()
    # No staging directory left; the lock file stays beside the entry, hidden.
    assert sorted(p.name for p in final.parent.iterdir()) == [".thing.lock", "thing"]


def test_a_complete_entry_is_used_as_it_is(tmp_path: Path) -> None:
    final = tmp_path / "thing"
    build_once(final, lambda staging: (staging / "first").write_text("1"))

    def fill(staging: Path) -> None:
        raise AssertionError("a complete entry was built again")

    assert build_once(final, fill) == final
    assert (final / "first").read_text() == "1"


def test_a_failed_fill_leaves_nothing_and_the_next_call_builds(tmp_path: Path) -> None:
    final = tmp_path / "thing"

    def fail(staging: Path) -> None:
        (staging / "half").write_text("x")
        raise RuntimeError("the download failed")

    with pytest.raises(RuntimeError, match="the download failed"):
        build_once(final, fail)
    assert [p.name for p in tmp_path.iterdir()] == [".thing.lock"]
    build_once(final, lambda staging: (staging / "whole").write_text("y"))
    assert (final / "whole").read_text() == "y"


def test_the_trixie_cache_keeps_images_someone_asked_for_lately(tmp_path: Path) -> None:
    """Another checkout or a running benchmark shares the cache: its image, asked for within a
    day, is not removed under it; an image nobody asked for in a day is."""
    from qemu import trixie

    now = 1_800_000_000.0
    entries = {}
    for name, used in (("current", now), ("recent", now - 3600), ("stale", now - 2 * 86400)):
        entry = tmp_path / name
        entry.mkdir()
        (entry / ".complete").touch()
        (entry / trixie.USED).touch()
        os.utime(entry / trixie.USED, (used, used))
        entries[name] = entry
    half = tmp_path / "half-built"  # no .complete: a build in progress elsewhere
    half.mkdir()
    removed = trixie.prune(entries["current"], now=now)
    assert removed == [entries["stale"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "half-built", "recent"]


def _build_slowly(final: Path, barrier: Any, log: Path, result: Path) -> None:
    """A test process that wants ``final``: every fill it runs is logged in ``log``; what it
    got, in ``result``."""
    barrier.wait()

    def fill(staging: Path) -> None:
        with log.open("a") as f:
            f.write(f"{os.getpid()} started\n")
        (staging / "part1").write_text("one")
        time.sleep(1.0)  # the other process asks for the entry meanwhile
        (staging / "part2").write_text("two")
        with log.open("a") as f:
            f.write(f"{os.getpid()} done\n")

    entry = build_once(final, fill)
    result.write_text(" ".join(sorted(p.name for p in entry.iterdir())))


def test_two_processes_wanting_the_same_entry_get_one_build_and_both_use_it(
    tmp_path: Path,
) -> None:
    final = tmp_path / "cache" / "thing"
    log = tmp_path / "fills.log"
    barrier = FORK.Barrier(2)
    results = [tmp_path / "result-a", tmp_path / "result-b"]
    processes = [
        FORK.Process(target=_build_slowly, args=(final, barrier, log, result)) for result in results
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0, 0]
    fills = log.read_text().splitlines()
    assert len(fills) == 2 and fills[0].endswith(" started") and fills[1].endswith(" done"), fills
    assert [r.read_text() for r in results] == [".complete part1 part2"] * 2


def _fill_then_hang(final: Path, filling: Any) -> None:
    def fill(staging: Path) -> None:
        (staging / "half").write_text("x")
        filling.set()
        time.sleep(60)

    build_once(final, fill)


def test_a_builder_killed_mid_fill_leaves_no_entry_and_lets_the_next_one_build(
    tmp_path: Path,
) -> None:
    final = tmp_path / "thing"
    filling = FORK.Event()
    builder = FORK.Process(target=_fill_then_hang, args=(final, filling))
    builder.start()
    assert filling.wait(30)
    os.kill(builder.pid, signal.SIGKILL)
    builder.join(30)
    assert not final.exists()
    # Its lock went with it: the next build does not wait for it.
    build_once(final, lambda staging: (staging / "whole").write_text("y"))
    assert (final / "whole").read_text() == "y" and not (final / "half").exists()


def test_the_lock_is_held_for_the_whole_block(tmp_path: Path) -> None:
    """A second holder waits for the first to let go."""
    final = tmp_path / "thing"
    held = FORK.Event()
    release = FORK.Event()
    order = tmp_path / "order"

    def hold() -> None:
        with entry_lock(final):
            held.set()
            release.wait(30)
            with order.open("a") as f:
                f.write("first\n")

    holder = FORK.Process(target=hold)
    holder.start()
    assert held.wait(30)
    release.set()
    with entry_lock(final), order.open("a") as f:
        f.write("second\n")
    holder.join(30)
    assert order.read_text() == "first\nsecond\n"
