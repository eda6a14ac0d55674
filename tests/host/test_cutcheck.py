"""The cut checker on real disks, without QEMU: the disk the scenario starts from keeps every
promise, and a disk damaged the ways a cut could damage it breaks the right ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu.cutcheck import Checker, Cut, Kind, Outcome
from qemu.powercut import STATE, Operation, Run, make_state_disk, mounted
from qemu.powercut import loop_device as partition_device
from tests.host.conftest import require_tools

BOOT = Operation("trial boot", -1, 10)


def cut_of(base: Path, index: int = -1) -> Cut:
    run = Run("run1", "ext4", base, base, base.with_suffix(".log"), base.with_suffix(".txt"))
    return Cut(run, BOOT, index, False, False)


@pytest.fixture
def disk(mount_ns: Path) -> Path:
    require_tools("mkfs.ext4", "mkfs.erofs", "sgdisk", "losetup")
    return make_state_disk(mount_ns, "ext4", None)


def kinds(outcome: Outcome) -> set[Kind]:
    return {v.kind for v in outcome.violations}


def test_the_disk_a_run_starts_from_keeps_every_promise(disk: Path, mount_ns: Path) -> None:
    outcome = Checker(mount_ns / "check").check(disk, cut_of(disk), None, None)
    assert outcome.violations == []
    assert outcome.booted == "v1" and outcome.state is not None
    assert sorted(outcome.state.entries) == ["v0", "v1", "vold"]


def test_a_lost_boot_state_and_a_damaged_image_are_found(disk: Path, mount_ns: Path) -> None:
    checker = Checker(mount_ns / "check")
    reference = checker.check(disk, cut_of(disk), None, None)
    with (
        partition_device(disk, STATE) as device,
        mounted(device, "ext4", mount_ns / "damage") as top,
    ):
        for name in ("boot.json", "boot.json.prev"):
            (top / "overlayroot" / name).unlink()
        image = top / "overlayroot/deployments/v1/root.erofs"
        with image.open("r+b") as f:
            f.seek(image.stat().st_size // 2)
            f.write(b"\xff" * 4096)
    outcome = checker.check(disk, cut_of(disk, 7), reference, None)
    assert kinds(outcome) == {Kind.STATE_LOST, Kind.HALF_STAGED, Kind.FAILOVER}
    assert outcome.booted == "v0"  # the fallback: v1 fails its digest check
    messages = "\n".join(v.message for v in outcome.violations)
    assert "the boot state was lost and rebuilt" in messages
    assert "bootable deployment v1 is half-staged: its image" in messages


def test_a_disk_that_does_not_mount_is_unbootable(mount_ns: Path) -> None:
    garbage = mount_ns / "garbage.img"
    with garbage.open("wb") as f:  # sparse but for a partition start that is no filesystem
        f.truncate(STATE.offset + STATE.size)
        f.seek(STATE.offset)
        f.write(b"\xff" * (1 << 20))
    outcome = Checker(mount_ns / "check").check(garbage, cut_of(garbage), None, None)
    assert outcome.unbootable
    assert [v.kind for v in outcome.violations] == [Kind.UNBOOTABLE]
    assert outcome.violations[0].message.startswith(
        f"the state filesystem does not mount: mount -t ext4 {mount_ns}/check/cut.img:"
    )
