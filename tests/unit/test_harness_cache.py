"""The harness's cache entries: all or nothing."""

from __future__ import annotations

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
