"""The boot pair's bridge under QEMU, with two real Debian kernels: our initramfs for kernel A
followed by our initramfs for kernel B (what ``initrd.img`` holds between the two renames of a
promotion, docs/kernels.md) boots under A and under B, each loading its own modules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from initrd.build import BuildConfig, Compression, build_initramfs
from qemu.kernel import Kernel
from qemu.machine import Machine
from qemu.paths import cache_dir
from tests.qemu.stage import BASE, make_root, state_disk

BOOT_TIMEOUT = 150


def other_kernel(kernel: Kernel) -> Kernel:
    """A cached Debian kernel of another release than the test kernel (the second kernel of
    issue 9: bookworm-backports' 6.12 cloud kernel)."""
    for package in sorted((cache_dir() / "kernels").glob("linux-image-*")):
        version = package.name.removeprefix("linux-image-")
        vmlinuz = package / "boot" / f"vmlinuz-{version}"
        modules = package / "lib" / "modules" / version
        if (version != kernel.version and (package / ".complete").exists() and vmlinuz.exists()
                and modules.is_dir()):
            return Kernel(vmlinuz=vmlinuz, modules=modules, version=version)
    pytest.skip("needs a second Debian kernel in .cache/kernels (the bookworm-backports cloud"
                " kernel the kexec tests fetch)")


def test_the_bridge_initramfs_boots_under_both_kernels(
    kernel: Kernel, qemu_accel: str, tmp_path: Path
) -> None:
    second = other_kernel(kernel)
    images = []
    for k in (kernel, second):
        out = tmp_path / f"initrd-{k.version}.img"
        build_initramfs(BuildConfig(modules_dir=k.modules, output=out,
                                    compress=Compression.ZSTD))
        images.append(out.read_bytes())
    bridge = tmp_path / "bridge.img"
    bridge.write_bytes(images[0] + images[1])  # the old pair's, then the new deployment's
    disk = state_disk(tmp_path, [("v1", "erofs", make_root(tmp_path))])
    for k in (kernel, second):
        machine = Machine(k, bridge, log_path=tmp_path / f"boot-{k.version}.log", disks=[disk],
                          cmdline=f"{BASE} overlayroot.debug", accel=qemu_accel)
        try:
            machine.start()
            machine.wait_for("OVERLAYROOT-TEST done", BOOT_TIMEOUT, failure=(
                "Kernel panic - not syncing", "Attempted to kill init", "overlayroot: error:"))
            machine.wait_exit(30)
        finally:
            if machine.started:
                machine.kill()
        console = machine.console
        assert f"Linux version {k.version} " in console
        assert "did not load" not in console and "cannot open kernel module" not in console
        loaded = re.search(r"overlayroot: .*loaded (\d+) kernel modules", console)
        assert loaded is not None and int(loaded.group(1)) >= 5, "its own modules, from its list"
        assert "switching root to v1 (/sbin/init)" in console
        assert machine.markers()["root_ro"] == "yes"
