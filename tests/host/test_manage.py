"""The ``overlayroot`` commands in a booted system, for real: a state filesystem on a loop device,
prepared by the boot stage in a private mount namespace, and every command run against it."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from overlayroot.core import bootstate, statefile, watchdog
from tests.host.conftest import NO_WATCHDOG, System, add_check, good_v1

# -- where the state is ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["history"],
        ["rollback"],
        ["bless"],
        ["gc", "--keep", "1"],
        ["etc", "diff"],
        ["deploy", "/nonexistent-source"],
    ],
)
def test_without_a_booted_system_or_sysroot_every_command_says_so(
    system: System, command: list[str]
) -> None:
    assert system.fails(*command) == (
        "overlayroot: error: no state filesystem: not booted by overlayroot and no --sysroot"
        " given\n"
    )


def test_a_sysroot_without_state_is_named(system: System, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    err = system.fails("status", "--sysroot", str(empty))
    assert f"{empty} holds no overlayroot state" in err


def test_a_damaged_booted_json_is_named(system: System) -> None:
    (system.env.run / "booted.json").write_text("{")
    err = system.fails("status")
    assert f"cannot read {system.env.run / 'booted.json'}, which says what was booted" in err


def test_commands_work_offline_on_a_sysroot(system: System) -> None:
    system.env.deploy("v1")
    system.env.deploy("v2")
    sysroot = str(system.env.sysroot)
    status = system.status("--sysroot", sysroot)
    assert (status["booted"], status["default"]) == (None, "v2")
    system.ok("set-default", "v1", "--sysroot", sysroot)
    assert system.default() == "v1"


# -- status ------------------------------------------------------------------------------------


def test_status_marks_booted_default_rollback_and_an_unblessed_trial(system: System) -> None:
    good_v1(system)
    system.ok("deploy", str(system.tree("v2")), "--id", "v2")
    system.reboot("overlayroot.tries=2 " + NO_WATCHDOG)
    status = system.status()
    rows = {r["id"]: r for r in status["deployments"]}
    assert [r["id"] for r in status["deployments"]] == ["v2", "v1"]
    assert rows["v2"]["booted"] and rows["v2"]["default"] and rows["v2"]["tries_left"] == 1
    assert rows["v1"]["rollback"] and rows["v1"]["successful"]
    assert rows["v2"]["format"] == "erofs" and rows["v2"]["origin"].endswith("tree-v2")
    assert any("v2 is on trial and NOT blessed" in n for n in status["notes"])

    table = system.ok("status")
    lines = table.splitlines()
    assert lines[0].split() == [
        "ID",
        "MARKS",
        "PRIO",
        "TRIES",
        "GOOD",
        "CREATED",
        "SIZE",
        "FORMAT",
        "KERNEL",
        "ORIGIN",
    ]
    assert lines[1].split()[8:10] == ["running", "kernel"]  # no kernel of its own
    assert lines[1].split()[:5] == ["v2", "booted,default", "2", "1", "no"]
    assert lines[2].split()[:5] == ["v1", "rollback", "1", "-", "yes"]
    assert (
        "note: the booted deployment v2 is on trial and NOT blessed: unless `overlayroot"
        " bless` runs" in table
    )
    assert "it falls back after 1 more boot(s)" in table


def test_status_shows_why_a_deployment_is_bad(system: System) -> None:
    good_v1(system)
    system.ok("deploy", str(system.tree("v2")), "--id", "v2")
    system.ok("mark-bad", "v2", "--reason", "broke the network")
    assert "v2: bad: broke the network" in system.ok("status")


def test_status_reports_a_fallback_of_this_boot(system: System) -> None:
    good_v1(system)
    system.ok("deploy", str(system.tree("v2")), "--id", "v2")
    system.shutdown()
    image = system.env.sysroot / "overlayroot/deployments/v2/root.erofs"
    image.write_bytes(b"\0" * image.stat().st_size)
    system.boot()
    notes = system.status()["notes"]
    assert any(
        n.startswith("this boot fell back from v2: deployment 'v2': its image") for n in notes
    )


def test_status_reports_the_recovery_of_this_boot(system: System) -> None:
    good_v1(system)
    system.shutdown()
    (system.env.sysroot / "overlayroot/boot.json").write_text("garbage")
    system.boot()  # boot.json.prev is from before the bless: a trial again, which heals it
    notes = system.status()["notes"]
    assert isinstance(notes, list)
    recovered = [n for n in notes if n.startswith("this boot recovered the boot state: ")]
    assert "boot.json is unreadable: not JSON" in recovered[0]
    assert "recovered the boot state from" in recovered[1] and len(recovered) == 2
    assert not [n for n in notes if "damaged" in n]


def test_status_reports_the_boots_recovery_and_the_state_is_repaired(system: System) -> None:
    good_v1(system)
    system.ok("set-default", "v1")  # so that boot.json.prev says v1 is good too
    system.shutdown()
    (system.env.sysroot / "overlayroot/boot.json").write_text("garbage")
    system.boot()  # the stage writes the repaired state even on a boot that counts nothing
    notes = system.status()["notes"]
    assert isinstance(notes, list)
    recovered = [n for n in notes if n.startswith("this boot recovered the boot state: ")]
    assert len(recovered) == 2
    assert "boot.json is unreadable: not JSON" in recovered[0]
    assert "recovered the boot state from" in recovered[1]
    assert not [n for n in notes if n.startswith("the boot state on disk is damaged")]


# -- deploy in the booted system ---------------------------------------------------------------


def test_deploy_carries_etc_changes_forward_whiteouts_and_opaque_dirs_included(
    system: System,
) -> None:
    tree = system.tree("v1")
    (tree / "etc/motd").write_text("from the image\n")
    (tree / "etc/skel").mkdir()
    (tree / "etc/skel/.profile").write_text("image profile\n")
    system.ok("deploy", "--sysroot", str(system.env.sysroot), "--id", "v1", str(tree))
    system.boot()
    etc = system.env.sysroot / "etc"
    (etc / "hostname").write_text("edited\n")
    (etc / "motd").unlink()
    (etc / "added.conf").write_text("new\n")
    os.system(f"rm -r {etc / 'skel'} && mkdir {etc / 'skel'}")  # an opaque directory
    (etc / "skel/other").write_text("mine\n")

    out = system.ok("deploy", str(system.tree("v2")), "--id", "v2")
    assert "v2 is the default now, on trial: it boots next; /etc carried forward from v1" in out
    upper = Path(system.state.etc_upper("v2"))
    whiteout = os.lstat(upper / "motd")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert os.getxattr(upper / "skel", "trusted.overlay.opaque") == b"y"
    assert system.default() == "v2"

    assert system.reboot()["deployment"] == "v2"
    assert (etc / "hostname").read_text() == "edited\n"
    assert not (etc / "motd").exists()
    assert (etc / "added.conf").read_text() == "new\n"
    assert sorted(os.listdir(etc / "skel")) == ["other"]
    assert (etc / "release").read_text() == "v2\n"  # the new image's own file


def test_offline_deploy_registers_the_deployment_as_the_default_on_trial(system: System) -> None:
    system.env.deploy("v1")
    system.env.deploy("v2")
    entries = system.entries()
    assert entries["v2"].priority > entries["v1"].priority
    assert not entries["v2"].successful and entries["v2"].tries_left is None
    assert system.default() == "v2"


def test_deploy_refuses_a_lower_without_mount_points(system: System) -> None:
    good_v1(system)
    tree = system.tree("v2")
    (tree / "proc").rmdir()
    err = system.fails("deploy", str(tree), "--id", "v2")
    assert "lacks the mount points the read-only root needs: proc" in err
    assert system.default() == "v1"


def test_deploy_on_a_full_disk_leaves_nothing_half_staged(system: System, tmp_path: Path) -> None:
    good_v1(system)
    generation = statefile.load(system.state)[0].generation
    tree = system.tree("big")
    with open(tree / "big.bin", "wb") as f:
        f.write(os.urandom(80 << 20))  # more than the 64 MB state filesystem holds
    err = system.fails("deploy", "--format", "dir", str(tree), "--id", "big")
    assert "No space left on device" in err
    assert "free space on the state filesystem and deploy again" in err
    layout = system.state
    assert os.listdir(layout.deployments) == ["v1"]
    assert sorted(os.listdir(Path(layout.top) / "etc")) == ["v1"]
    state, notes = statefile.load(layout)
    assert (state.generation, notes, bootstate.default(state)) == (generation, [], "v1")


def test_deploy_in_the_booted_system_needs_root(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    good_v1(system)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    err = system.fails("deploy", str(system.tree("v2")))
    assert f"overlayroot deploy changes the boot state on {system.env.state}: run it as root" in err


# -- rollback, bless ---------------------------------------------------------------------------


def test_rollback_returns_to_the_previous_good_deployment_with_its_own_etc(system: System) -> None:
    good_v1(system)
    (system.env.sysroot / "etc/hostname").write_text("v1 edit\n")
    system.ok("deploy", str(system.tree("v2")), "--id", "v2")
    system.reboot()
    (system.env.sysroot / "etc/hostname").write_text("v2 edit\n")
    system.ok("bless")
    assert system.ok("rollback") == "rolled back: v1 boots next (the default was v2)\n"
    assert system.reboot()["deployment"] == "v1"
    assert (system.env.sysroot / "etc/hostname").read_text() == "v1 edit\n"


def test_rollback_without_a_good_deployment_is_refused(system: System) -> None:
    system.env.deploy("v1")
    system.env.deploy("v2")
    system.boot()
    err = system.fails("rollback")
    assert "no deployment to roll back to on" in err
    assert (
        "none besides the booted v2 is known good (blessed); the others (v1) were never"
        " blessed" in err
    )


def test_bless_runs_the_checks_then_marks_the_booted_deployment_good(
    system: System, tmp_path: Path
) -> None:
    system.env.deploy("v1")
    system.boot()
    add_check(tmp_path, "required", "10-ok", "exit 0")
    add_check(tmp_path, "wanted", "20-meh", "echo 'disk almost full'; exit 1")
    code, out, err = system.run("bless")
    assert code == 0, err
    assert "health check required/10-ok: ok" in out
    assert "warning: health check wanted/20-meh failed (exit 1): disk almost full" in err
    assert "blessed v1: it is known good" in out
    assert system.entries()["v1"].successful
    assert [e["event"] for e in statefile.read_history(system.state)][-1] == "blessed"


def test_a_failed_required_check_marks_a_trial_bad_and_reboots(
    system: System, tmp_path: Path
) -> None:
    good_v1(system)
    system.ok("deploy", str(system.tree("v2")), "--id", "v2")
    system.reboot()
    add_check(tmp_path, "required", "50-network", "echo starting; echo 'no route to host'; exit 3")
    code, _, err = system.run("bless")
    assert code == 1
    reason = "health check required/50-network failed (exit 3): starting / no route to host"
    assert f"overlayroot: error: {reason}" in err
    assert "marked v2 bad; v1 boots next" in err
    assert (tmp_path / "rebooted").read_text() == "rebooted\n"
    assert system.entries()["v2"].bad == reason
    last = statefile.read_history(system.state)[-1]
    assert (last["event"], last["deployment"], last["reason"]) == ("marked-bad", "v2", reason)
    assert system.reboot()["deployment"] == "v1"


def test_no_reboot_marks_bad_without_rebooting(system: System, tmp_path: Path) -> None:
    good_v1(system)
    system.ok("deploy", str(system.tree("v2")), "--id", "v2")
    system.reboot()
    add_check(tmp_path, "required", "check", "exit 1")
    system.fails("bless", "--no-reboot")
    assert not (tmp_path / "rebooted").exists()
    assert system.entries()["v2"].bad == "health check required/check failed (exit 1)"


def test_a_failed_check_on_a_known_good_boot_marks_nothing(system: System, tmp_path: Path) -> None:
    good_v1(system)
    system.reboot()
    add_check(tmp_path, "required", "check", "exit 1")
    err = system.fails("bless")
    assert "This boot was not a trial" in err
    assert system.entries()["v1"].successful and not (tmp_path / "rebooted").exists()


def test_a_failed_check_with_nothing_to_fall_back_to_marks_nothing(
    system: System, tmp_path: Path
) -> None:
    system.env.deploy("v1")
    system.boot()
    add_check(tmp_path, "required", "check", "exit 1")
    err = system.fails("bless")
    assert "not marked bad either: no other deployment could boot" in err
    assert system.entries()["v1"].bad is None and not (tmp_path / "rebooted").exists()


def test_bless_stops_the_watchdog_of_a_trial_boot(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    system.env.deploy("v1")
    monkeypatch.setattr(watchdog, "arm", lambda timeout: timeout)
    disarmed = []
    monkeypatch.setattr(watchdog, "disarm", lambda: disarmed.append(True))
    system.boot("overlayroot.watchdog=60")
    assert "stopped the trial boot's watchdog" in system.ok("bless")
    assert disarmed == [True]


def test_bless_says_when_the_watchdog_cannot_be_stopped(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    system.env.deploy("v1")
    monkeypatch.setattr(watchdog, "arm", lambda timeout: timeout)

    def broken() -> None:
        raise OSError(errno.EBUSY, "Device or resource busy", "/dev/watchdog")

    monkeypatch.setattr(watchdog, "disarm", broken)
    system.boot("overlayroot.watchdog=60")
    err = system.fails("bless")
    assert (
        "blessed v1, but cannot stop the trial boot's watchdog (Device or resource busy:"
        " /dev/watchdog): the machine will be reset, and boots v1 again" in err
    )
    assert system.entries()["v1"].successful


def test_bless_offline_is_refused(system: System) -> None:
    system.env.deploy("v1")
    err = system.fails("bless", "--sysroot", str(system.env.sysroot))
    assert "overlayroot bless acts on the booted deployment" in err


# -- deploy from a tar archive -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "compress"), [("dir", ""), ("erofs", "--gzip"), ("squashfs", "--zstd")]
)
def test_deploy_from_a_tar_archive_keeps_owners_and_xattrs(
    system: System, tmp_path: Path, fmt: str, compress: str
) -> None:
    good_v1(system)
    tree = system.tree("v2")
    (tree / "usr/bin").mkdir(parents=True)
    tool = tree / "usr/bin/tool"
    tool.write_text("#!/bin/sh\n")
    os.chown(tool, 1234, 5678)
    os.setxattr(tool, "trusted.test", b"kept")
    archive = tmp_path / "v2.tar"
    subprocess.run(
        [
            "tar",
            "--create",
            f"--file={archive}",
            "--xattrs",
            "--xattrs-include=*",
            *([compress] if compress else []),
            f"--directory={tree}",
            ".",
        ],
        check=True,
    )
    system.ok("deploy", "--format", fmt, "--id", "v2", str(archive))
    layout = system.state
    assert sorted(os.listdir(layout.deployment_dir("v2"))) == sorted(
        ["manifest.json", layout.read_manifest("v2").image]
    )
    assert system.reboot()["deployment"] == "v2"
    deployed = system.env.sysroot / "usr/bin/tool"
    assert (deployed.stat().st_uid, deployed.stat().st_gid) == (1234, 5678)
    assert os.getxattr(deployed, "trusted.test") == b"kept"
    assert (system.env.sysroot / "etc/release").read_text() == "v2\n"


def test_a_tar_archive_without_mount_points_is_refused_and_nothing_is_left(
    system: System, tmp_path: Path
) -> None:
    good_v1(system)
    tree = system.tree("v2")
    (tree / "run").rmdir()
    archive = tmp_path / "v2.tar"
    subprocess.run(["tar", "--create", f"--file={archive}", f"--directory={tree}", "."], check=True)
    err = system.fails("deploy", "--id", "v2", str(archive))
    assert f"{archive} lacks the mount points the read-only root needs: run" in err
    assert os.listdir(system.state.deployments) == ["v1"] and system.default() == "v1"


def test_a_file_that_is_neither_image_nor_archive_is_refused(
    system: System, tmp_path: Path
) -> None:
    good_v1(system)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 4096)
    err = system.fails("deploy", str(junk))
    assert "is not an erofs or squashfs image, nor a tar archive" in err
