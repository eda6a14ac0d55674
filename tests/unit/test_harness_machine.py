"""qemu.machine.Machine's command line: the instruction clock is asked for, and only under TCG."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu.kernel import Kernel
from qemu.machine import Machine


def kernel(tmp_path: Path) -> Kernel:
    return Kernel(version="6.1.0-test", vmlinuz=tmp_path / "vmlinuz", modules=tmp_path / "lib")


def test_the_instruction_clock_is_icount_shift_0(tmp_path: Path) -> None:
    plain = Machine(kernel(tmp_path), tmp_path / "initrd", log_path=tmp_path / "log").command()
    counted = Machine(
        kernel(tmp_path), tmp_path / "initrd", log_path=tmp_path / "log", icount=True
    ).command()
    assert "-icount" not in plain
    assert counted == [*plain, "-icount", "shift=0"]


def test_the_instruction_clock_needs_tcg(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^the instruction clock \(icount\) needs TCG, not kvm$"):
        Machine(kernel(tmp_path), tmp_path / "i", log_path=tmp_path / "l", accel="kvm", icount=True)
