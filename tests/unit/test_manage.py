"""The pure parts of the commands: what status and history say, what gc keeps, what etc diff
finds, which checks bless runs, where the state is; and the bless unit's shape."""

from __future__ import annotations

import argparse
import configparser
import json
import os
from pathlib import Path

import pytest

from overlayroot import cli, etcdiff, health, manage, status, target
from overlayroot.bootstate import BootState, Entry
from overlayroot.errors import BootError

REPO = Path(__file__).resolve().parents[2]


def state(**entries: Entry) -> BootState:
    return BootState(entries)


# -- status ------------------------------------------------------------------------------------


def test_records_put_the_bootable_first_and_mark_each_role() -> None:
    s = BootState({
        "old": Entry(priority=1, successful=True),
        "good": Entry(priority=2, successful=True, pinned=True),
        "new": Entry(priority=3, tries_left=1),
        "dead": Entry(priority=4, tries_left=0),
    }, once="old")
    records = status.describe(s, "good", {"good": {"created": "2024", "size": 3 << 20}})
    assert [r["id"] for r in records] == ["new", "good", "old", "dead"]
    by_id = {r["id"]: r for r in records}
    assert status.marks(by_id["new"]) == "default"
    assert status.marks(by_id["good"]) == "booted,pinned"
    assert status.marks(by_id["old"]) == "rollback,once"
    assert status.marks(by_id["dead"]) == "-"
    assert [status.tries(by_id[k]) for k in ("new", "good", "dead")] == ["1", "-", "0"]
    assert status.size(by_id["good"]["size"]) == "3.0M" and status.size(None) == "?"


def test_a_deployment_out_of_tries_is_shown_as_bad_with_why() -> None:
    assert status.bad_reason(Entry(tries_left=0)) == (
        "used up its tries without being blessed (it crashed, hung or was reset)")
    assert status.bad_reason(Entry(tries_left=0, bad="no init")) == "no init"
    assert status.bad_reason(Entry(tries_left=0, successful=True)) is None
    assert status.bad_reason(Entry()) is None


def test_an_unblessed_trial_boot_is_called_out() -> None:
    records = status.describe(state(v2=Entry(priority=2, tries_left=1)), "v2", {})
    notes = status.booted_notes({"deployment": "v2", "trial": True}, records, False)
    assert notes == ["the booted deployment v2 is on trial and NOT blessed: unless `overlayroot"
                     " bless` runs (overlayroot-bless.service does, after boot-complete.target),"
                     " it falls back after 1 more boot(s)"]
    notes = status.booted_notes({"deployment": "v2", "trial": False}, records, False)
    assert "not known good (never blessed), and this boot was not counted" in notes[0]


def test_this_boots_fallbacks_recovery_and_an_uncounted_boot_are_reported() -> None:
    records = status.describe(state(v1=Entry(successful=True)), "v1", {})
    booted = {"deployment": "v1", "counted": False, "count_error": "EROFS",
              "failed": [{"deployment": "v2", "reason": "no init"}], "recovery": ["rebuilt"]}
    assert status.booted_notes(booted, records, False) == [
        "this trial boot was NOT counted: EROFS",
        "this boot fell back from v2: no init",
        "this boot recovered the boot state: rebuilt",
    ]
    assert "this boot recovered the boot state: rebuilt" not in status.booted_notes(
        booted, records, True)


def test_the_table_aligns_columns() -> None:
    assert status.table([["ID", "X"], ["long-id", "y"]]) == "ID       X\nlong-id  y"


def test_history_outcomes() -> None:
    events: list[dict[str, object]] = [
        {"event": "boot", "deployment": "v1", "trial": True},
        {"event": "blessed", "deployment": "v1"},
        {"event": "boot", "deployment": "v2", "trial": True},
        {"event": "boot", "deployment": "v2", "trial": True},
        {"event": "marked-bad", "deployment": "v2", "reason": "check"},
        {"event": "boot", "deployment": "v3", "trial": True, "fallback_from": ["v4"]},
        {"event": "boot", "deployment": "v1", "trial": False},
        {"event": "boot", "deployment": "v1", "trial": False},
    ]
    outcomes = [e["outcome"] for e in status.with_outcomes(events) if "outcome" in e]
    assert outcomes == [
        "blessed",
        "never blessed: crashed, hung, was reset or lost power before the next boot",
        "marked bad: check",
        "never blessed: crashed, hung, was reset or lost power before the next boot",
        "not a trial (not tracked)",
        "the latest boot",
    ]
    line = status.history_line(status.with_outcomes(events)[5])
    assert "fell back from v4" in line


# -- gc ----------------------------------------------------------------------------------------


def test_gc_never_removes_the_booted_default_rollback_once_or_pinned() -> None:
    s = BootState({
        "a": Entry(priority=1, pinned=True),
        "b": Entry(priority=2, successful=True),
        "c": Entry(priority=3),
        "d": Entry(priority=4, tries_left=0),
        "e": Entry(priority=5),
        "f": Entry(priority=6, tries_left=0),
        "g": Entry(priority=7, tries_left=0),
    }, once="d")
    created = {k: f"2024-01-0{i}" for i, k in enumerate("abcdefg", 1)}
    assert manage.protected(s, "c") == {"c": "booted", "e": "default", "b": "rollback",
                                        "d": "next boot", "a": "pinned"}
    assert manage.doomed(s, created, "c", 1) == ["f"]
    assert manage.doomed(s, created, "c", 7) == []


def test_gc_orders_by_creation_time_not_priority() -> None:
    s = BootState({"old": Entry(priority=9, tries_left=0), "new": Entry(priority=1,
                   tries_left=0), "default": Entry(priority=5, successful=True)})
    created = {"old": "2020", "new": "2024", "default": "2023"}
    assert manage.doomed(s, created, None, 1) == ["old"]


# -- etc diff ----------------------------------------------------------------------------------


def test_etc_diff_on_plain_directories(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for d in (lower / "sub", upper / "sub", lower / "was-dir"):
        d.mkdir(parents=True)
    (lower / "same").write_text("x")
    (upper / "same").write_text("x")
    (lower / "changed").write_text("x")
    (upper / "changed").write_text("y")
    (lower / "link").symlink_to("a")
    (upper / "link").symlink_to("b")
    (upper / "sub" / "new").write_text("n")
    (upper / "was-dir").write_text("now a file")
    assert etcdiff.diff(str(upper), str(lower)) == {
        "added": ["/sub/new"],
        "modified": ["/changed", "/link", "/was-dir"],
        "deleted": [],
    }


def test_etc_diff_without_the_lower_etc_is_all_added(tmp_path: Path) -> None:
    (tmp_path / "upper" / "d").mkdir(parents=True)
    (tmp_path / "upper" / "d" / "f").write_text("")
    assert etcdiff.diff(str(tmp_path / "upper"), str(tmp_path / "missing"))["added"] == [
        "/d", "/d/f"]


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and trusted xattrs need root")
def test_etc_diff_understands_whiteouts_and_opaque_directories(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for d in (lower / "opaque", upper / "opaque"):
        d.mkdir(parents=True)
    (lower / "gone").write_text("x")
    (lower / "opaque" / "hidden").write_text("x")
    os.mknod(upper / "gone", 0o600 | 0o020000, 0)
    os.mknod(upper / "never-was", 0o600 | 0o020000, 0)
    os.setxattr(upper / "opaque", etcdiff.OPAQUE, b"y")
    (upper / "opaque" / "kept").write_text("k")
    assert etcdiff.diff(str(upper), str(lower)) == {
        "added": ["/opaque/kept"], "modified": [], "deleted": ["/gone", "/opaque/hidden"]}


# -- bless's checks ----------------------------------------------------------------------------


def test_checks_run_required_first_in_name_order_executables_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for kind, name, mode in (("wanted", "a", 0o755), ("required", "20-b", 0o755),
                             ("required", "10-a", 0o755), ("required", "30-off", 0o644),
                             ("required", ".hidden", 0o755)):
        path = tmp_path / kind / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(mode)
    found = [(c.kind, os.path.basename(c.path)) for c in health.checks(str(tmp_path))]
    assert found == [("required", "10-a"), ("required", "20-b"), ("wanted", "a")]
    assert "30-off is not executable: not run" in capsys.readouterr().err
    assert health.checks(str(tmp_path / "none")) == []


def test_a_checks_failure_names_it_and_the_tail_of_its_output(tmp_path: Path) -> None:
    check = tmp_path / "net"
    check.write_text("#!/bin/sh\nfor i in 1 2 3 4 5 6 7; do echo line $i; done; exit 4\n")
    check.chmod(0o755)
    result = health.run_check(health.Check("required", str(check), 10, None))
    assert not result.passed
    assert result.describe() == ("health check required/net failed (exit 4): line 3 / line 4 /"
                                 " line 5 / line 6 / line 7")
    broken = tmp_path / "broken"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    assert health.run_check(health.Check("wanted", str(broken), 10, None)).describe() == (
        "health check wanted/broken failed (cannot run it: No such file or directory)")


# -- where the state is ------------------------------------------------------------------------


def test_without_booted_json_a_sysroot_is_needed(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setattr(target, "BOOTED", str(tmp_path / "booted.json"))
    with pytest.raises(BootError, match=r"^no state filesystem: not booted by overlayroot and no"
                       r" --sysroot given$"):
        target.find(None)
    assert target.find(str(tmp_path)).booted is None


def test_booted_json_counts_only_for_the_state_it_names(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
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
    from overlayroot.layout import StateLayout

    layout = StateLayout(tmp_path)
    layout.top.mkdir()
    with (
        target.locked(layout),
        pytest.raises(BootError, match="another overlayroot command"),
        target.locked(layout, wait=0.2),
    ):
        pass
    with target.locked(layout, wait=0):
        pass


# -- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "deploy", "rollback", "bless", "mark-bad",
                                     "set-default", "pin", "unpin", "gc", "history"])
def test_every_command_takes_a_sysroot(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert "--sysroot DIR" in capsys.readouterr().out


def test_every_handler_module_is_frozen_with_the_command() -> None:
    modules = set()

    def visit(parser: argparse.ArgumentParser) -> None:
        handler = parser.get_default("handler")
        if isinstance(handler, str):
            modules.add(handler.split(":")[0])
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    visit(sub)

    visit(cli.build_parser())
    assert modules == {m for m in cli.FROZEN_MODULES if m.startswith("overlayroot.")}


def test_the_bless_unit_runs_after_boot_complete() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "hooks/systemd/overlayroot-bless.service")
    assert unit["Unit"]["After"] == "boot-complete.target"
    assert unit["Unit"]["Requires"] == "boot-complete.target"
    assert unit["Unit"]["ConditionPathExists"] == "/run/overlayroot/booted.json"
    assert unit["Service"]["ExecStart"] == "overlayroot bless"
    assert unit["Service"]["Type"] == "oneshot"
