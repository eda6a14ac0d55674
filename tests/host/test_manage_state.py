"""``mark-bad``, ``set-default``, ``pin``, ``gc``, ``history`` and the state lock, for real, and
every mistake a user can make with them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from overlayroot.commands import target
from overlayroot.core import statefile
from overlayroot.core.bootstate import USED_UP
from tests.host.conftest import System, good_v1


def three(system: System) -> None:
    """v1, v2, v3 deployed offline, v1 and v2 blessed; v3 (untried) is the default."""
    for name in ("v1", "v2", "v3"):
        system.env.deploy(name)
    for name in ("v1", "v2"):
        system.bless_offline(name)


@pytest.mark.parametrize(
    "command",
    [
        ["mark-bad", "v9"],
        ["set-default", "v9"],
        ["set-default", "--once", "v9"],
        ["pin", "v9"],
        ["unpin", "v9"],
        ["etc", "diff", "v9"],
    ],
)
def test_an_unknown_id_lists_the_known_ones(system: System, command: list[str]) -> None:
    three(system)
    err = system.fails(*command, "--sysroot", str(system.env.sysroot))
    assert err == (
        f"overlayroot: error: no deployment 'v9' on {system.env.sysroot};"
        " deployments there: v1, v2, v3\n"
    )


@pytest.mark.parametrize(
    "command",
    [
        ["mark-bad", "v1"],
        ["set-default", "v1"],
        ["pin", "v1"],
        ["unpin", "v1"],
        ["rollback"],
        ["gc", "--keep", "1"],
        ["bless"],
    ],
)
def test_changing_the_state_needs_root(
    system: System, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    good_v1(system)  # booted: the commands work on the state the system booted from
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    err = system.fails(*command)
    assert err.endswith(f"changes the boot state on {system.env.state}: run it as root\n")


def test_reading_needs_no_root(system: System, monkeypatch: pytest.MonkeyPatch) -> None:
    good_v1(system)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    system.ok("status")
    system.ok("history")
    system.ok("gc", "--keep", "1", "--dry-run")


def test_a_held_lock_names_its_holder(system: System) -> None:
    three(system)
    layout = system.state
    with target.locked(layout):
        err = system.fails("pin", "v1", "--sysroot", str(system.env.sysroot))
    assert f"another overlayroot command (pid {os.getpid()}: " in err
    assert f"is changing the state on {system.env.sysroot}: wait for it to finish" in err
    system.ok("pin", "v1", "--sysroot", str(system.env.sysroot))  # released


def test_mark_bad_records_the_reason_and_refuses_to_leave_nothing_bootable(system: System) -> None:
    good_v1(system)
    system.ok("deploy", str(system.tree("v2")), "--id", "v2")
    out = system.ok("mark-bad", "v2", "--reason", "eats disks")
    assert out == "marked v2 bad: eats disks; the default is v1\n"
    assert system.entries()["v2"].bad == "eats disks"
    last = statefile.read_history(system.state)[-1]
    assert (last["event"], last["deployment"], last["reason"]) == ("marked-bad", "v2", "eats disks")
    err = system.fails("mark-bad", "v1")
    assert "marking v1 bad would leave nothing bootable" in err
    assert system.entries()["v1"].bad is None


def test_set_default_gives_a_bad_deployment_a_fresh_trial(system: System) -> None:
    three(system)
    sysroot = str(system.env.sysroot)
    system.ok("mark-bad", "v3", "--sysroot", sysroot)
    out = system.ok("set-default", "v3", "--sysroot", sysroot)
    assert out == "v3 is the default, on trial (not known good yet)\n"
    entry = system.entries()["v3"]
    assert (entry.bad, entry.tries_left, system.default()) == (None, None, "v3")
    assert system.ok("set-default", "v1", "--sysroot", sysroot) == "v1 is the default\n"


def test_set_default_once_boots_it_next_time_only(system: System) -> None:
    three(system)
    system.boot()
    assert system.booted()["deployment"] == "v3"
    out = system.ok("set-default", "--once", "v1")
    assert out == "v1 boots next time only; then v3 again\n"
    assert system.status()["once"] == "v1"
    assert system.reboot()["deployment"] == "v1"
    assert system.reboot()["deployment"] == "v3"


def test_pin_and_unpin(system: System) -> None:
    three(system)
    sysroot = str(system.env.sysroot)
    assert system.ok("pin", "v1", "--sysroot", sysroot) == "v1 is pinned: gc keeps it\n"
    assert system.entries()["v1"].pinned
    assert system.ok("unpin", "v1", "--sysroot", sysroot) == "v1 is no longer pinned\n"
    assert not system.entries()["v1"].pinned


def test_gc_keeps_the_newest_and_every_protected_deployment(system: System) -> None:
    for name in ("v1", "v2", "v3", "v4", "v5", "v6"):
        system.env.deploy(name)
        # Creation times in deploy order (Env.deploy fixes them all to one second).
        manifest = system.state.read_manifest(name)
        manifest.created = f"2024-01-0{name[1]}T00:00:00Z"
        (Path(system.state.deployment_dir(name)) / "manifest.json").write_text(manifest.to_json())
    system.bless_offline("v2")
    system.ok("pin", "v1", "--sysroot", str(system.env.sysroot))
    system.ok("set-default", "--once", "v3", "--sysroot", str(system.env.sysroot))
    system.ok("set-default", "v4", "--sysroot", str(system.env.sysroot))
    system.boot()  # boots v3, the one-shot; the default is v4, the rollback v2

    dry = system.ok("gc", "--keep", "1", "--dry-run")
    assert "keeping v1 (pinned)" in dry and "keeping v2 (rollback)" in dry
    assert "keeping v3 (booted)" in dry and "keeping v4 (default)" in dry
    assert "would remove v6" not in dry  # the newest
    assert dry.splitlines()[-1] == "would remove v5"
    assert sorted(system.entries()) == ["v1", "v2", "v3", "v4", "v5", "v6"]

    out = system.ok("gc", "--keep", "1")
    assert "removed v5" in out
    layout = system.state
    assert sorted(os.listdir(layout.deployments)) == ["v1", "v2", "v3", "v4", "v6"]
    assert sorted(os.listdir(Path(layout.top) / "etc")) == ["v1", "v2", "v3", "v4", "v6"]
    assert sorted(system.entries()) == ["v1", "v2", "v3", "v4", "v6"]
    assert system.ok("gc", "--keep", "5").startswith("keeping")
    assert system.ok("gc", "--keep", "5").endswith("nothing to remove: 5 deployments, keeping 5\n")


def test_gc_clears_what_interrupted_commands_left_not_an_etc_placed_for_a_coming_deploy(
    system: System,
) -> None:
    three(system)
    layout = system.state
    deployments = Path(layout.deployments)
    for leftover in (
        deployments / ".staging-v9",
        deployments / ".removing-v0",
        Path(layout.top) / "etc" / ".staging-v9",
        Path(layout.top) / "etc" / "next",
    ):
        leftover.mkdir()
    (Path(layout.top) / "etc" / "next" / "hostname").write_text("placed by a pipeline\n")
    out = system.ok("gc", "--keep", "3", "--dry-run", "--sysroot", str(system.env.sysroot))
    assert f"would remove {Path(layout.deployments) / '.staging-v9'}, left by an interrupted" in out
    assert "next" not in out
    assert sorted(os.listdir(Path(layout.top) / "etc")) == [".staging-v9", "next", "v1", "v2", "v3"]
    system.ok("gc", "--keep", "3", "--sysroot", str(system.env.sysroot))
    assert sorted(os.listdir(layout.deployments)) == ["v1", "v2", "v3"]
    assert sorted(os.listdir(Path(layout.top) / "etc")) == ["next", "v1", "v2", "v3"]
    assert (Path(layout.top) / "etc" / "next" / "hostname").read_text() == "placed by a pipeline\n"


def test_gc_needs_a_sensible_keep(system: System) -> None:
    three(system)
    err = system.fails("gc", "--keep", "0", "--sysroot", str(system.env.sysroot))
    assert "--keep 0: keep at least 1 deployment" in err


def test_history_shows_every_boot_with_its_outcome(system: System) -> None:
    good_v1(system)
    system.ok("deploy", str(system.tree("v2")), "--id", "v2")
    system.reboot("overlayroot.tries=2 overlayroot.watchdog=0")  # v2 crashes, as it were
    system.reboot("overlayroot.tries=2 overlayroot.watchdog=0")
    system.reboot("overlayroot.tries=2 overlayroot.watchdog=0")  # back on v1
    events = json.loads(system.ok("history", "--json"))
    boots = [(e["deployment"], e["outcome"]) for e in events if e["event"] == "boot"]
    never = "never blessed: crashed, hung, was reset or lost power before the next boot"
    used_up = f"marked bad: {USED_UP}"  # by the boot that found its tries gone
    assert boots == [("v1", "blessed"), ("v2", never), ("v2", used_up), ("v1", "the latest boot")]
    text = system.ok("history").splitlines()
    assert len(text) == len(events)
    assert text[1].split()[1:3] == ["blessed", "v1"]
    assert "boot        v2  trial, 1 tries left after it; " + never in text[2]
    assert len(system.ok("history", "-n", "2").splitlines()) == 2
    assert "-n 0: give a positive number" in system.fails("history", "-n", "0")


def test_history_of_a_fresh_state(system: System, tmp_path: Path) -> None:
    system.env.deploy("v1")
    out = system.ok("history", "--sysroot", str(system.env.sysroot))
    assert out == f"no boot history on {system.env.sysroot} yet\n"
