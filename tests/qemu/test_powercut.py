"""Issue 7: power cuts that lose what was not flushed, at the flush points of a trial boot and
of every command, on ext4. A sample of the cut points (every ``EVERY``-th, and each operation's
first and last); ``python -m bench.powercut`` checks all of them, on btrfs and xfs too.

The scenario (qemu/powercut.py) is recorded once under QEMU with every write logged; each cut's
disk is rebuilt from the log and checked on the host (qemu/cutcheck.py). A test fails with the
cuts that broke its promise, each named by run, log entry and operation.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qemu.cutcheck import Kind, Outcome, enter_private_mount_namespace, simulate
from qemu.kernel import Kernel
from qemu.powercut import BOOTS, OPERATION_NAMES, record_scenario, require_tools
from qemu.rootfs import build_command_payload

EVERY = 4
# Minutes of boots, recorded once for the module (one worker runs it all: tests/workers.py).
pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module")
def outcomes(
    kernel: Kernel, qemu_accel: str, initramfs: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[Outcome]:
    if os.geteuid() != 0:
        pytest.skip("power-cut checks need root: they loop-mount every cut's disk")
    require_tools("ext4")
    enter_private_mount_namespace()
    work = tmp_path_factory.mktemp("powercut")
    payload = build_command_payload(work / "command")
    runs = record_scenario(work, "ext4", kernel, initramfs, qemu_accel, payload)
    return simulate(runs, work, EVERY)


def broken(outcomes: list[Outcome], *kinds: Kind) -> str:
    """Every violation of ``kinds``, one line each with its cut."""
    return "\n".join(
        f"{o.cut.describe()}: {v.message}"
        for o in outcomes
        for v in o.violations
        if v.kind in kinds
    )


def test_every_operation_and_boot_is_cut_at_flushes_and_between_them(
    outcomes: list[Outcome],
) -> None:
    cut = {o.cut.operation.name for o in outcomes}
    expected = {name for name, _ in BOOTS.values()} | set(OPERATION_NAMES.values())
    assert cut == expected
    assert len(outcomes) >= 40
    assert any(o.cut.torn for o in outcomes) and any(not o.cut.torn for o in outcomes)


def test_the_next_boot_reaches_a_good_deployment_and_nothing_half_staged(
    outcomes: list[Outcome],
) -> None:
    assert not broken(outcomes, Kind.UNBOOTABLE, Kind.FAILOVER, Kind.NOT_GOOD, Kind.HALF_STAGED)


def test_fsynced_var_and_home_data_survives_every_cut(outcomes: list[Outcome]) -> None:
    assert not broken(outcomes, Kind.DATA)
    assert sum(o.lost_bytes for o in outcomes) == 0


def test_a_cut_never_adds_tries_nor_loses_a_bless_or_the_boot_state(
    outcomes: list[Outcome],
) -> None:
    assert not broken(outcomes, Kind.TRIES, Kind.BLESS, Kind.STATE_LOST)


def test_a_trial_boot_hands_over_only_once_its_try_is_on_disk(outcomes: list[Outcome]) -> None:
    assert not broken(outcomes, Kind.HANDOVER)


def test_the_next_command_cleans_up_what_a_cut_left(outcomes: list[Outcome]) -> None:
    assert not broken(outcomes, Kind.CLEANUP)


def test_var_seeding_survives_a_cut(outcomes: list[Outcome]) -> None:
    assert not broken(outcomes, Kind.SEED)


def test_a_first_boot_cut_short_still_verifies_the_image(outcomes: list[Outcome]) -> None:
    assert not broken(outcomes, Kind.VERIFY)
