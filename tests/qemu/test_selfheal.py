"""Issue 3 end to end: deployments that heal themselves, under QEMU.

Every deployment here is the busybox test root with the frozen ``overlayroot`` command in it.
A boot is one QEMU run: the test init powers off when it is done, and a reboot, a panic or a
watchdog reset ends QEMU too (``panic=-1``, ``-no-reboot``); booting the same disk again is the
next boot. The kernel command line is the same for every boot of a scenario, so whatever the
machine does between them it does by itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from overlayroot.commands.fsops import Progress
from overlayroot.commands.images import build_image
from overlayroot.core import bootstate, statefile
from qemu.disks import delete_file, write_file
from qemu.machine import Machine
from qemu.plugin import MachineFactory
from tests.qemu.stage import (
    BOOT_TIMEOUT,
    BROKEN,
    CMDLINE,
    CREATED,
    Disk,
    booted,
    history,
    rows,
    status,
)


def boot(
    machine: MachineFactory, initramfs: Path, disk: Path, name: str, extra: str = ""
) -> Machine:
    """A boot that reaches the test init's end and powers off."""
    m = machine(initrd=initramfs, disks=[disk], cmdline=f"{CMDLINE} {extra}", name=name)
    m.start()
    m.wait_for(
        "OVERLAYROOT-TEST done",
        BOOT_TIMEOUT,
        failure=(
            "Kernel panic - not syncing",
            "Attempted to kill init",
            "overlayroot: error: no",
            "OVERLAYROOT-TEST failing=",
            *BROKEN,
        ),
    )
    m.wait_exit(60)
    return m


def boot_fails(
    machine: MachineFactory, initramfs: Path, disk: Path, name: str, extra: str, failure: str
) -> Machine:
    """A boot of a bad deployment: its init says how it fails, then QEMU ends by itself."""
    m = machine(initrd=initramfs, disks=[disk], cmdline=f"{CMDLINE} {extra}", name=name)
    m.start()
    m.wait_for(
        f"OVERLAYROOT-TEST failing={failure}",
        BOOT_TIMEOUT,
        failure=("OVERLAYROOT-TEST done", *BROKEN),
    )
    m.wait_exit(120)  # a hang waits for the watchdog
    return m


def test_an_update_from_inside_is_tried_blessed_and_rolled_back_with_its_own_etc(
    machine: MachineFactory, initramfs: Path, command_payload: Path, tmp_path: Path
) -> None:
    disk = Disk(tmp_path, command_payload)
    disk.deploy("v1")
    updates = disk.content / "updates"
    updates.mkdir()
    build_image(disk.root("v2"), updates / "v2.erofs", "erofs", "v2", CREATED, Progress(None))
    path = disk.make()

    first = boot(machine, initramfs, path, "1-update", "test.bless=1 test.run=update")
    m = first.markers()
    assert booted(first) == "v1" and m["bless"] == "0" and m["deploy"] == "0"
    assert "overlayroot: blessed v1: it is known good" in first.console
    assert "stopped the trial boot's watchdog" in first.console
    assert status(first)["default"] == "v2"
    assert rows(first)["v2"]["tries_left"] is None and rows(first)["v1"]["successful"]

    second = boot(machine, initramfs, path, "2-trial", "test.bless=1 test.run=check-update")
    m = second.markers()
    assert booted(second) == "v2"
    assert "trial boot of v2: 1 tries left after this one" in second.console
    assert m["local_conf"] == "carried"  # the /etc edit made on v1 before the update
    assert m["etc_diff"].split() == ["A", "/etc/local.conf", "A", "/etc/v2.conf"]
    assert m["bless"] == "0" and rows(second)["v2"]["successful"]
    assert [(e["event"], e["deployment"]) for e in history(second)][-2:] == [
        ("boot", "v2"),
        ("blessed", "v2"),
    ]
    assert m["rollback"] == "0"
    assert "rolled back: v1 boots next (the default was v2)" in second.console

    third = boot(machine, initramfs, path, "3-rollback", "test.run=after-rollback")
    m = third.markers()
    assert booted(third) == "v1"
    assert (m["local_conf"], m["v2_conf"]) == ("carried", "")  # v1's own /etc
    assert (status(third)["default"], status(third)["rollback"]) == ("v1", "v2")
    assert "Traceback" not in first.console + second.console + third.console


def test_bad_updates_that_exit_panic_or_hang_fall_back_by_themselves(
    machine: MachineFactory, initramfs: Path, command_payload: Path, tmp_path: Path
) -> None:
    disk = Disk(tmp_path, command_payload)
    disk.deploy("v1")
    disk.bless("v1")
    for name, failure in (("v2-exit", "exit"), ("v3-panic", "panic"), ("v4-hang", "hang")):
        disk.deploy(name, failure)
    path = disk.make()
    extra = "overlayroot.watchdog=15 test.run=report"

    seen = []
    for name, failure, crash in (
        ("v4-hang", "hang", "softdog: Initiating system reboot"),
        ("v3-panic", "panic", "sysrq triggered crash"),
        ("v2-exit", "exit", "Attempted to kill init"),
    ):
        for attempt in (1, 2):
            m = boot_fails(machine, initramfs, path, f"{name}-{attempt}", extra, failure)
            assert booted(m) == name
            assert f"trial boot of {name}: {2 - attempt} tries left after this one" in m.console
            assert crash in m.console
            seen.append(name)
    last = boot(machine, initramfs, path, "back-on-v1", extra)
    assert booted(last) == "v1"
    assert "trial boot" not in last.console  # v1 is known good: no counting, no watchdog

    records = rows(last)
    for name in ("v2-exit", "v3-panic", "v4-hang"):
        assert records[name]["tries_left"] == 0 and not records[name]["bootable"]
        assert records[name]["bad"] == (
            "used up its tries without being blessed (it crashed, hung or was reset)"
        )
    boots = [e for e in history(last) if e["event"] == "boot"]
    assert [e["deployment"] for e in boots] == [*seen, "v1"]
    for event in boots[:-1]:
        assert event["trial"] is True and event["counted"] is True
    # The first try of each was never blessed; after the second, the next boot found its tries
    # gone and marked it bad.
    used_up = f"marked bad: {bootstate.USED_UP}"
    outcomes = [e["outcome"] for e in boots[:-1]]
    assert all(o.startswith("never blessed") for o in outcomes[0::2]), outcomes
    assert outcomes[1::2] == [used_up] * 3
    assert "v4-hang: bad: used up its tries" in last.console


def test_an_image_that_does_not_mount_or_verify_falls_back_in_the_same_boot(
    machine: MachineFactory, initramfs: Path, command_payload: Path, tmp_path: Path
) -> None:
    disk = Disk(tmp_path, command_payload)
    disk.deploy("v1")
    disk.bless("v1")
    disk.deploy("v2-nomount")
    disk.deploy("v3-damaged")
    garbage = b"not a filesystem\n" * 4096
    nomount = Path(disk.layout.deployment_dir("v2-nomount"))
    (nomount / "root.erofs").write_bytes(garbage)
    manifest = disk.layout.read_manifest("v2-nomount")
    manifest.sha256 = hashlib.sha256(garbage).hexdigest()
    manifest.blake2b = hashlib.blake2b(garbage, digest_size=32).hexdigest()
    (nomount / "manifest.json").write_text(manifest.to_json())  # it verifies, but does not mount
    damaged = Path(disk.layout.deployment_dir("v3-damaged")) / "root.erofs"
    with open(damaged, "r+b") as f:
        f.seek(8192)
        f.write(b"\xff" * 16)
    path = disk.make()

    m = boot(machine, initramfs, path, "fallback", "test.run=report")
    assert booted(m) == "v1"
    assert "falling back to deployment v2-nomount" in m.console
    assert "falling back to deployment v1" in m.console
    records = rows(m)
    assert "fails its digest check" in records["v3-damaged"]["bad"]
    assert "does not mount as erofs" in records["v2-nomount"]["bad"]
    failed = [e["deployment"] for e in history(m) if e["event"] == "failed"]
    assert failed == ["v3-damaged", "v2-nomount"]
    assert any(n.startswith("this boot fell back from v3-damaged") for n in status(m)["notes"])


def test_a_pin_on_the_command_line_and_a_one_shot_default(
    machine: MachineFactory, initramfs: Path, command_payload: Path, tmp_path: Path
) -> None:
    disk = Disk(tmp_path, command_payload)
    for name in ("v1", "v2", "v3"):
        disk.deploy(name)
        disk.bless(name)
    path = disk.make()

    pinned = boot(machine, initramfs, path, "pinned", "overlayroot.deployment=v1 test.run=once")
    assert booted(pinned) == "v1" and pinned.markers()["once"] == "0"
    assert (status(pinned)["default"], status(pinned)["once"]) == ("v3", "v2")

    once = boot(machine, initramfs, path, "once", "test.run=report")
    assert booted(once) == "v2"
    state = disk.state()
    assert (state.once, bootstate.default(state)) == (None, "v3")  # used up, v3 next


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted"])
def test_a_damaged_state_file_still_boots_a_good_deployment_and_says_so(
    machine: MachineFactory, initramfs: Path, command_payload: Path, tmp_path: Path, damage: str
) -> None:
    disk = Disk(tmp_path, command_payload)
    disk.deploy("v1")
    disk.bless("v1")
    disk.deploy("v2", fail="exit")
    disk.change(bootstate.mark_bad, "v2", "kernel panic")
    statefile.append_history(disk.layout, "marked-bad", "v2", reason="kernel panic")
    disk.change(bootstate.set_default, "v1")  # boot.json.prev says the same as boot.json
    path = disk.make()
    state_file = "/overlayroot/boot.json"
    text = disk.read(state_file)
    if damage == "garbage":
        write_file(path, disk.offset, state_file, b"\x00garbage{" * 40)
        expected = (
            "recovered the boot state from /sysroot/overlayroot/boot.json.prev"
            " (generation 4); boot.json was unreadable"
        )
        # The stage writes the repaired state at once; status reports this boot's recovery.
        note = "boot.json.prev (generation 4); boot.json was unreadable"
    else:
        delete_file(path, disk.offset, f"{state_file}.prev")
        if damage == "truncated":
            write_file(path, disk.offset, state_file, text[: len(text) // 2])
        else:
            delete_file(path, disk.offset, state_file)
        expected = "rebuilt the boot state from the 2 deployments on disk and the boot history"
        note = expected

    m = boot(machine, initramfs, path, damage, "test.run=report")
    assert booted(m) == "v1"
    assert f"overlayroot: warning: {expected}" in m.console
    assert any(note in n for n in status(m)["notes"])
    assert rows(m)["v2"]["bad"] is not None
    assert any(e["event"] == "recovered" for e in history(m))


def test_a_deployment_never_blessed_boots_degraded_instead_of_rebooting_forever(
    machine: MachineFactory, initramfs: Path, command_payload: Path, tmp_path: Path
) -> None:
    """A factory image whose bless unit is missing: once its tries are used up, the last resort
    boots it anyway, uncounted, without a watchdog, and says so everywhere."""
    disk = Disk(tmp_path, command_payload)
    disk.deploy("factory")
    path = disk.make()
    for attempt in (1, 2):
        m = boot(machine, initramfs, path, f"trial-{attempt}", "test.run=report")
        assert f"trial boot of factory: {2 - attempt} tries left after this one" in m.console
    m = machine(
        initrd=initramfs, disks=[path], cmdline=f"{CMDLINE} test.run=report", name="degraded"
    )
    m.start()
    m.wait_for(
        "OVERLAYROOT-TEST done",
        BOOT_TIMEOUT,
        failure=("Kernel panic - not syncing", "Attempted to kill init", *BROKEN),
    )
    m.wait_exit(60)
    assert booted(m) == "factory"
    assert "DEGRADED boot as a last resort" in m.console
    assert "DEGRADED boot of factory, a last resort, not counted and without a watchdog" in (
        m.console
    )
    assert json.loads(m.markers()["booted_json"])["watchdog"] is None
    assert any(n.startswith("DEGRADED BOOT: factory") for n in status(m)["notes"])
    boots = [e for e in history(m) if e["event"] == "boot"]
    assert boots[-1]["degraded"] and boots[-1]["trial"] is False
    assert rows(m)["factory"]["tries_left"] == 0  # no try was taken from it
