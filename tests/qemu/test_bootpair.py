"""Deployments with kernels and the boot pair under QEMU (issue 9, the deployment side).

- The bridge, with two real Debian kernels: our initramfs for kernel A followed by our
  initramfs for kernel B (what ``initrd.img`` holds between the two renames of a promotion,
  docs/kernels.md) boots under A and under B, each loading its own modules.
- Inside a booted busybox system, the frozen ``overlayroot`` command deploys an erofs image that
  carries a kernel and a kargs.d file (the image loop-mounted, the TOML read) and promotes it to
  the boot pair on the state filesystem.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from initrd.build import BuildConfig, Compression, build_initramfs
from overlayroot.commands.deploy import Progress, build_image, deploy
from qemu.disks import make_state_disk, partition_offset, read_file
from qemu.kernel import Kernel
from qemu.machine import Machine
from qemu.paths import cache_dir
from qemu.plugin import MachineFactory
from qemu.rootfs import build_command_payload, make_test_root
from tests.kernelfakes import add_kernel
from tests.qemu.stage import (
    BASE,
    CREATED,
    FS_LABEL,
    FS_UUID,
    PARTLABEL,
    PARTUUID,
    initramfs,
    make_root,
    state_disk,
)

__all__ = ["initramfs"]  # the fixture, imported so pytest finds it here

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


FAKE = "6.1.0-99-fake-amd64"
KERNEL_UPDATE = """\
overlayroot deploy --id v2 --karg quiet /run/overlayroot/state/updates/v2.erofs
echo "OVERLAYROOT-TEST deploy=$?"
overlayroot promote v2
echo "OVERLAYROOT-TEST promote=$?"
echo "OVERLAYROOT-TEST status=$(overlayroot status --json | tr -d '\\n')"
overlayroot status
"""


def test_a_kernel_deployed_and_promoted_from_inside(
    machine: MachineFactory, initramfs: Path, tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    payload = build_command_payload(tmp_path_factory.mktemp("overlayroot-command"))
    scripts = {"kernel-update": KERNEL_UPDATE}
    content = tmp_path / "state-content"
    content.mkdir()
    v1 = make_test_root(tmp_path / "root-v1", image="v1", command=payload, scripts=scripts)
    deploy(content, v1, deployment_id="v1", created=CREATED, known_good=True)
    v2 = make_test_root(tmp_path / "root-v2", image="v2", command=payload, scripts=scripts)
    add_kernel(v2, FAKE)
    (v2 / "usr/lib/bootc/kargs.d").mkdir(parents=True)
    (v2 / "usr/lib/bootc/kargs.d/10-console.toml").write_text('kargs = ["console=ttyS0"]\n')
    (content / "updates").mkdir()
    build_image(v2, content / "updates/v2.erofs", "erofs", "v2", CREATED, Progress(None))
    disk = make_state_disk(tmp_path / "state.img", content, size_mb=160, fs_label=FS_LABEL,
                           fs_uuid=FS_UUID, partlabel=PARTLABEL, partuuid=PARTUUID)

    m = machine(initrd=initramfs, disks=[disk], cmdline=f"{BASE} test.run=kernel-update",
                name="kernel-update")
    m.start()
    m.wait_for("OVERLAYROOT-TEST done", BOOT_TIMEOUT, failure=(
        "Kernel panic - not syncing", "Attempted to kill init", "Traceback"))
    m.wait_exit(60)
    markers = m.markers()
    assert (markers["deploy"], markers["promote"]) == ("0", "0"), m.console[-3000:]
    status = json.loads(markers["status"])
    kernels = {d["id"]: d["kernel"] for d in status["deployments"]}
    assert kernels == {"v1": None, "v2": FAKE}
    pair = "/run/overlayroot/state/overlayroot/boot"
    assert status["boot_pair"] == {"dir": pair, "deployment": "v2", "version": FAKE,
                                   "complete": True, "recorded": "v2"}
    assert f"boot pair in {pair}: the kernel {FAKE} of v2" in m.console

    offset = partition_offset(disk)
    manifest = json.loads(read_file(disk, offset, "/overlayroot/deployments/v2/manifest.json"))
    assert manifest["kernel"]["kargs"] == ["console=ttyS0", "quiet"]
    source = (v2 / "usr/lib/modules" / FAKE / "vmlinuz").read_bytes()
    for path in ("/overlayroot/deployments/v2/vmlinuz", "/overlayroot/boot/vmlinuz"):
        assert read_file(disk, offset, path) == source, path
    initrd = read_file(disk, offset, "/overlayroot/boot/initrd.img")
    assert hashlib.sha256(initrd).hexdigest() == manifest["kernel"]["initramfs_sha256"]
