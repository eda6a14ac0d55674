"""The harness's cache entries: all or nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qemu.paths import cache_entry


def test_a_filled_entry_appears_whole_and_replaces_an_older_one(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "thing"
    final.mkdir(parents=True)
    (final / "old").write_text("stale")
    with cache_entry(final) as staging:
        (staging / "new").write_text("fresh")
        assert not (final / "new").exists()
    assert (final / "new").read_text() == "fresh" and (final / ".complete").exists()
    assert not (final / "old").exists()
    assert [p.name for p in final.parent.iterdir()] == ["thing"]  # no staging left


def test_a_failed_fill_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "thing"
    with pytest.raises(RuntimeError), cache_entry(final) as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("the download failed")
    assert list(tmp_path.iterdir()) == []


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
