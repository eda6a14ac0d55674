"""Where the state is, what was booted from it, and the lock on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overlayroot.commands import target
from overlayroot.core.errors import BootError


def test_without_booted_json_a_sysroot_is_needed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(target, "BOOTED", str(tmp_path / "booted.json"))
    with pytest.raises(
        BootError,
        match=r"^no state filesystem: not booted by overlayroot and no"
        r" --sysroot given$",
    ):
        target.find(None)
    assert target.find(str(tmp_path)).booted is None


def test_booted_json_counts_only_for_the_state_it_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    booted = tmp_path / "booted.json"
    (tmp_path / "state").mkdir()
    booted.write_text(json.dumps({"deployment": "v1", "state": str(tmp_path / "state")}))
    monkeypatch.setattr(target, "BOOTED", str(booted))
    assert target.find(None).booted_id == "v1"
    assert target.find(str(tmp_path / "state")).booted_id == "v1"
    assert target.find(str(tmp_path)).booted_id is None
    booted.write_text(json.dumps({"state": "/x"}))
    with pytest.raises(BootError, match="does not say which deployment was booted"):
        target.find(None)


def test_the_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    from overlayroot.core.layout import StateLayout

    layout = StateLayout(tmp_path)
    Path(layout.top).mkdir()
    with (
        target.locked(layout),
        pytest.raises(BootError, match="another overlayroot command"),
        target.locked(layout, wait=0.2),
    ):
        pass
    with target.locked(layout, wait=0):
        pass
