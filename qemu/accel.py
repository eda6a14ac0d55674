"""Pick KVM only when a real guest boots under it here; TCG otherwise.

/dev/kvm existing proves nothing on these machines: guests hang or abort under it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qemu.initramfs import make_busybox_initramfs
from qemu.kernel import Kernel
from qemu.machine import BootFailure, Machine
from qemu.paths import cache_dir

ACCELS = ("kvm", "tcg")
PROBE_TIMEOUT = 20.0
_PROBE_MARKER = "OVERLAYROOT-ACCEL-PROBE ok"
_chosen: dict[Path, str] = {}


def choose_accel(kernel: Kernel) -> str:
    """`$OVERLAYROOT_QEMU_ACCEL` if set, else the probe's verdict (cached per process, on disk)."""
    forced = os.environ.get("OVERLAYROOT_QEMU_ACCEL")
    if forced:
        if forced not in ACCELS:
            raise ValueError(f"OVERLAYROOT_QEMU_ACCEL={forced}: expected one of {ACCELS}")
        return forced
    if kernel.vmlinuz not in _chosen:
        _chosen[kernel.vmlinuz] = _cached_probe(kernel)
    return _chosen[kernel.vmlinuz]


def _cached_probe(kernel: Kernel) -> str:
    stat = kernel.vmlinuz.stat()
    verdict = cache_dir() / "accel" / f"{kernel.version}-{stat.st_size}-{int(stat.st_mtime)}"
    if verdict.exists() and verdict.read_text().strip() in ACCELS:
        return verdict.read_text().strip()
    accel = "kvm" if kvm_boots(kernel) else "tcg"
    verdict.parent.mkdir(parents=True, exist_ok=True)
    # Written beside it, then renamed: a test process reading it meanwhile sees all or nothing.
    partial = verdict.with_name(f".{verdict.name}.{os.getpid()}")
    partial.write_text(accel + "\n")
    partial.rename(verdict)
    return accel


def kvm_boots(kernel: Kernel, timeout: float = PROBE_TIMEOUT) -> bool:
    """Boot a busybox initramfs under KVM; true only if its /init ran and printed the marker."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="overlayroot-accel-") as tmp:
        initrd = make_busybox_initramfs(
            Path(tmp) / "probe.cpio", f"echo {_PROBE_MARKER}\npoweroff -f\n"
        )
        machine = Machine(
            kernel, initrd, log_path=Path(tmp) / "probe.log", accel="kvm", cmdline="quiet"
        )
        try:
            with machine:
                machine.wait_for(_PROBE_MARKER, timeout)
        except (BootFailure, OSError):
            return False
    return True
