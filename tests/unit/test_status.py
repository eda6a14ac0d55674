"""What ``status`` and ``history`` say, from the boot state and the history."""

from __future__ import annotations

from overlayroot.commands import status
from overlayroot.core.bootstate import BootState, Entry


def state(**entries: Entry) -> BootState:
    return BootState(entries)


def test_records_put_the_bootable_first_and_mark_each_role() -> None:
    s = BootState(
        {
            "old": Entry(priority=1, successful=True),
            "good": Entry(priority=2, successful=True, pinned=True),
            "new": Entry(priority=3, tries_left=1),
            "dead": Entry(priority=4, tries_left=0),
        },
        once="old",
    )
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
        "used up its tries without being blessed (it crashed, hung or was reset)"
    )
    assert status.bad_reason(Entry(tries_left=0, bad="no init")) == "no init"
    assert status.bad_reason(Entry(tries_left=0, successful=True)) is None
    assert status.bad_reason(Entry()) is None


def test_an_unblessed_trial_boot_is_called_out() -> None:
    records = status.describe(state(v2=Entry(priority=2, tries_left=1)), "v2", {})
    notes = status.booted_notes({"deployment": "v2", "trial": True}, records, False)
    assert notes == [
        "the booted deployment v2 is on trial and NOT blessed: unless `overlayroot"
        " bless` runs (overlayroot-bless.service does, after boot-complete.target and"
        " multi-user.target), it falls back after 1 more boot(s)"
    ]
    notes = status.booted_notes({"deployment": "v2", "trial": False}, records, False)
    assert "not known good (never blessed), and this boot was not counted" in notes[0]


def test_this_boots_fallbacks_recovery_and_an_uncounted_boot_are_reported() -> None:
    records = status.describe(state(v1=Entry(successful=True)), "v1", {})
    booted = {
        "deployment": "v1",
        "counted": False,
        "count_error": "EROFS",
        "failed": [{"deployment": "v2", "reason": "no init"}],
        "recovery": ["rebuilt"],
    }
    assert status.booted_notes(booted, records, False) == [
        "this trial boot was NOT counted: EROFS",
        "this boot fell back from v2: no init",
        "this boot recovered the boot state: rebuilt",
    ]
    assert "this boot recovered the boot state: rebuilt" not in status.booted_notes(
        booted, records, True
    )


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


def test_history_lines_of_a_kernel_switch() -> None:
    events: list[dict[str, object]] = [
        {
            "time": "T1",
            "event": "kexec",
            "deployment": "v2",
            "kernel": "6.12.1",
            "from_kernel": "6.1.0-57",
            "fallback_from": ["v3"],
        },
        {
            "time": "T2",
            "event": "boot",
            "deployment": "v2",
            "trial": True,
            "tries_left": 1,
            "kernel": "6.12.1",
            "kexec": True,
        },
        {
            "time": "T3",
            "event": "reboot",
            "deployment": "v1",
            "reason": "needs kernel 6.1.0-57, not the kexec'd 6.12.1",
        },
    ]
    lines = [status.history_line(e) for e in status.with_outcomes(events)]
    assert lines == [
        "T1  kexec       v2  switched from kernel 6.1.0-57 to its own kernel 6.12.1, falling back"
        " from v3",
        "T2  boot        v2  trial, 1 tries left after it; under its own kernel 6.12.1, started"
        " by kexec; the latest boot, not blessed yet",
        "T3  reboot      v1  needs kernel 6.1.0-57, not the kexec'd 6.12.1",
    ]
