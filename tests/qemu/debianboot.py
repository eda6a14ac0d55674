"""Shared pieces of the tests that boot a real Debian (bookworm and trixie) to
``multi-user.target``: the boot, and the checks of a read-only, blessed system."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from overlayroot.commands.staging import deploy
from qemu.disks import make_state_disk
from qemu.kernel import Kernel
from qemu.machine import Machine
from qemu.plugin import MachineFactory
from tests.qemu.stage import CREATED, FS_LABEL, FS_UUID

DEPLOYMENT = "bookworm"
# `ro`: with `rw` and no / in fstab, systemd-remount-fs would try to make the erofs root
# writable and fail (docs/integrations.md).
BASE = f"root=LABEL={FS_LABEL} ro"
# Every failure ends QEMU at once instead of waiting in an emergency shell.
ON_FAILURE = {
    "standalone": "overlayroot.onfail=poweroff",
    "dracut": "rd.shell=0 rd.emergency=poweroff",
    "initramfs-tools": "panic=-1",
    # mkinitcpio has no such switch: its shells are in FAILURES.
    "mkinitcpio": "",
}

FAILURES = (
    "Kernel panic - not syncing",
    "Attempted to kill init",
    "overlayroot: error:",
    "Entering emergency mode",
    "Press Enter for maintenance",
    "Traceback (most recent call last)",
    "You are now being dropped into an emergency shell",
    "Bailing out, you are on your own",
)
BOOT_TIMEOUT = 420  # seconds from power-on to the report, under TCG on a busy host
SHUTDOWN_TIMEOUT = 180


def boot_debian(
    machine: MachineFactory,
    initrd: Path,
    disk: Path,
    cmdline: str,
    name: str,
    kernel: Kernel | None = None,
) -> dict[str, str]:
    m: Machine = machine(initrd=initrd, disks=[disk], cmdline=cmdline, name=name, kernel=kernel)
    with m:
        m.wait_for("OVERLAYROOT-TEST done", BOOT_TIMEOUT, failure=FAILURES)
        # A clean shutdown through systemd: the state filesystem must let go too.
        assert m.wait_exit(SHUTDOWN_TIMEOUT) == 0
        markers = m.markers()
    # For `pytest -rP`: where the time goes, and what the image had to load itself.
    print(
        f"{name}: multi-user.target at {int(markers['multi_user_us']) / 1e6:.1f} s,"
        f" report at {markers['uptime']} s; modules: {markers['modules']}"
    )
    return markers


def check_read_only_system(markers: dict[str, str], deployment: str) -> None:
    assert markers["root_ro"] == "yes"
    assert markers["etc_writable"] == "yes"
    assert markers["tmp_writable"] == "yes"
    assert markers["init_nice"] == "0"  # systemd, and all it starts, at the usual priority
    assert markers["mount_root"].split()[1] == "erofs"
    assert markers["mount_etc"].startswith("overlay overlay")
    assert markers["failed"] == ""
    assert json.loads(markers["booted_json"])["deployment"] == deployment


def check_blessed(markers: dict[str, str], deployment: str) -> None:
    """overlayroot-bless.service ran after boot-complete.target and multi-user.target (which
    does not wait for it), succeeded, and the booted deployment is known good (the report unit
    runs after the bless)."""
    assert markers["boot_complete"] == "active"
    assert (markers["bless_active"], markers["bless_result"]) == ("active", "success")
    assert 0 < int(markers["boot_complete_us"]) <= int(markers["bless_start_us"])
    assert 0 < int(markers["multi_user_us"]) <= int(markers["bless_start_us"])
    status: dict[str, Any] = json.loads(markers["status"])
    booted = [r for r in status["deployments"] if r["booted"]]
    assert [(r["id"], r["successful"], r["bad"]) for r in booted] == [(deployment, True, None)]


def debian_disk(base: Path, root: Path) -> Path:
    """A state disk with the Debian root deployed as erofs, by `overlayroot deploy`."""
    content = base / "state-content"
    content.mkdir()
    deploy(content, root, deployment_id=DEPLOYMENT, fmt="erofs", created=CREATED)
    return make_state_disk(
        base / "state.img",
        content,
        size_mb=640,
        fs_label=FS_LABEL,
        fs_uuid=FS_UUID,
        partlabel="overlayroot state",
        partuuid="c0ffee00-1234-4abc-8def-0000000000a1",
    )
