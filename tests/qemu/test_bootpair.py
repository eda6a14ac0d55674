"""Deployments with kernels and the boot pair under QEMU (issue 9, the deployment side).

- The bridge, with two real Debian kernels: our initramfs for kernel A followed by our
  initramfs for kernel B (what ``initrd.img`` holds between the two renames of a promotion,
  docs/kernels.md) boots under A and under B, each loading its own modules.
- Inside a booted busybox system, the frozen ``overlayroot`` command deploys an erofs image that
  carries a kernel and a kargs.d file (the image loop-mounted, the TOML read) and promotes it to
  the boot pair on the state filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from initrd.build import BuildConfig, Compression, build_initramfs
from overlayroot.commands import bootpair
from overlayroot.commands.fsops import Progress
from overlayroot.commands.images import build_image
from overlayroot.commands.staging import deploy
from overlayroot.core.layout import StateLayout
from qemu.cutcheck import cut_points, enter_private_mount_namespace
from qemu.disks import make_state_disk, partition_offset, read_file
from qemu.kernel import Kernel
from qemu.logwrites import Replayer, copy_sparse, read_log
from qemu.machine import LoggedDisk, Machine
from qemu.paths import cache_dir
from qemu.plugin import MachineFactory
from qemu.rootfs import make_test_root
from tests.kernelfakes import add_kernel, assert_bootable
from tests.qemu.stage import (
    BASE,
    CREATED,
    FS_LABEL,
    FS_UUID,
    PARTLABEL,
    PARTUUID,
    make_root,
    state_disk,
)

BOOT_TIMEOUT = 150


def other_kernel(kernel: Kernel) -> Kernel:
    """A cached Debian kernel of another release than the test kernel (the second kernel of
    issue 9: bookworm-backports' 6.12 cloud kernel)."""
    for package in sorted((cache_dir() / "kernels").glob("linux-image-*")):
        version = package.name.removeprefix("linux-image-")
        vmlinuz = package / "boot" / f"vmlinuz-{version}"
        modules = package / "lib" / "modules" / version
        if (
            version != kernel.version
            and (package / ".complete").exists()
            and vmlinuz.exists()
            and modules.is_dir()
        ):
            return Kernel(vmlinuz=vmlinuz, modules=modules, version=version)
    pytest.skip(
        "needs a second Debian kernel in .cache/kernels (the bookworm-backports cloud"
        " kernel the kexec tests fetch)"
    )


def test_the_bridge_initramfs_boots_under_both_kernels(
    kernel: Kernel, qemu_accel: str, tmp_path: Path
) -> None:
    second = other_kernel(kernel)
    images = []
    for k in (kernel, second):
        out = tmp_path / f"initrd-{k.version}.img"
        build_initramfs(BuildConfig(modules_dir=k.modules, output=out, compress=Compression.ZSTD))
        images.append(out.read_bytes())
    bridge = tmp_path / "bridge.img"
    bridge.write_bytes(images[0] + images[1])  # the old pair's, then the new deployment's
    disk = state_disk(tmp_path, [("v1", "erofs", make_root(tmp_path))])
    for k in (kernel, second):
        machine = Machine(
            k,
            bridge,
            log_path=tmp_path / f"boot-{k.version}.log",
            disks=[disk],
            cmdline=f"{BASE} overlayroot.debug",
            accel=qemu_accel,
        )
        try:
            machine.start()
            machine.wait_for(
                "OVERLAYROOT-TEST done",
                BOOT_TIMEOUT,
                failure=(
                    "Kernel panic - not syncing",
                    "Attempted to kill init",
                    "overlayroot: error:",
                ),
            )
            machine.wait_exit(30)
        finally:
            if machine.started:
                machine.kill()
        console = machine.console
        assert f"Linux version {k.version} " in console
        assert "did not load" not in console and "cannot open kernel module" not in console
        # Its own modules, from its list: the ones every boot loads at the start (the rest load
        # when a step needs them: erofs before its mount, overlay before /etc's, loop where the
        # kernel cannot mount erofs from its file).
        loaded = re.search(r"overlayroot: .*loaded (\d+) kernel modules", console)
        assert loaded is not None and int(loaded.group(1)) >= 1, "its own modules, from its list"
        # overlayroot.debug times each module the stage loads (erofs for the image at least).
        assert re.search(r"overlayroot: \[ *[\d.]+\] loaded kernel module erofs in \d+ ms", console)
        # The stage runs hurried (overlayroot/boot/priority.py) and hands over at nice 0.
        assert "the interpreter started and imported the stage (nice -20)" in console
        assert "switching root to v1 (/sbin/init)" in console
        assert machine.markers()["root_ro"] == "yes"
        assert machine.markers()["init_nice"] == "0"


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
    machine: MachineFactory, initramfs: Path, tmp_path: Path, command_payload: Path
) -> None:
    scripts = {"kernel-update": KERNEL_UPDATE}
    content = tmp_path / "state-content"
    content.mkdir()
    v1 = make_test_root(tmp_path / "root-v1", image="v1", command=command_payload, scripts=scripts)
    deploy(content, v1, deployment_id="v1", created=CREATED, known_good=True)
    v2 = make_test_root(tmp_path / "root-v2", image="v2", command=command_payload, scripts=scripts)
    add_kernel(v2, FAKE)
    (v2 / "usr/lib/bootc/kargs.d").mkdir(parents=True)
    (v2 / "usr/lib/bootc/kargs.d/10-console.toml").write_text('kargs = ["console=ttyS0"]\n')
    (content / "updates").mkdir()
    build_image(v2, content / "updates/v2.erofs", "erofs", "v2", CREATED, Progress(None))
    disk = make_state_disk(
        tmp_path / "state.img",
        content,
        size_mb=160,
        fs_label=FS_LABEL,
        fs_uuid=FS_UUID,
        partlabel=PARTLABEL,
        partuuid=PARTUUID,
    )

    m = machine(
        initrd=initramfs,
        disks=[disk],
        cmdline=f"{BASE} test.run=kernel-update",
        name="kernel-update",
    )
    m.start()
    m.wait_for(
        "OVERLAYROOT-TEST done",
        BOOT_TIMEOUT,
        failure=("Kernel panic - not syncing", "Attempted to kill init", "Traceback"),
    )
    m.wait_exit(60)
    markers = m.markers()
    assert (markers["deploy"], markers["promote"]) == ("0", "0"), m.console[-3000:]
    status = json.loads(markers["status"])
    kernels = {d["id"]: d["kernel"] for d in status["deployments"]}
    assert kernels == {"v1": None, "v2": FAKE}
    pair = "/run/overlayroot/state/overlayroot/boot"
    assert status["boot_pair"] == {
        "dir": pair,
        "deployment": "v2",
        "version": FAKE,
        "complete": True,
        "recorded": "v2",
    }
    assert f"boot pair in {pair}: the kernel {FAKE} of v2" in m.console

    offset = partition_offset(disk)
    manifest = json.loads(read_file(disk, offset, "/overlayroot/deployments/v2/manifest.json"))
    assert manifest["kernel"]["kargs"] == ["console=ttyS0", "quiet"]
    source = (v2 / "usr/lib/modules" / FAKE / "vmlinuz").read_bytes()
    for path in ("/overlayroot/deployments/v2/vmlinuz", "/overlayroot/boot/vmlinuz"):
        assert read_file(disk, offset, path) == source, path
    initrd = read_file(disk, offset, "/overlayroot/boot/initrd.img")
    assert hashlib.sha256(initrd).hexdigest() == manifest["kernel"]["initramfs_sha256"]


PROMOTE = """\
overlayroot promote v2
echo "OVERLAYROOT-TEST promote=$?"
"""


def kernel_root(base: Path, name: str, k: Kernel, initrd: bytes, payload: Path) -> Path:
    """A busybox test root that carries kernel ``k`` and ``initrd`` the bootc way."""
    root = make_test_root(
        base / f"root-{name}", image=name, command=payload, scripts={"promote": PROMOTE}
    )
    moddir = root / "usr/lib/modules" / k.version
    moddir.mkdir(parents=True)
    (moddir / "vmlinuz").write_bytes(k.vmlinuz.read_bytes())
    (moddir / "initramfs.img").write_bytes(initrd)
    return root


@contextlib.contextmanager
def mounted_state(disk: Path, offset: int, where: Path) -> Iterator[Path]:
    """The state filesystem of ``disk`` (a copy: mounting replays its journal, as the next
    boot's mount would) mounted in this process's private mount namespace."""
    where.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-t", "ext4", "-o", f"loop,offset={offset}", str(disk), str(where)], check=True
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_promotion_cut_at_every_flush_leaves_a_pair_that_boots(
    kernel: Kernel, qemu_accel: str, tmp_path: Path, command_payload: Path
) -> None:
    """The guest, booted from the pair (kernel A), promotes deployment v2's kernel B; its state
    disk's writes are logged, and the disk every flush point (and every torn half between two)
    leaves behind must hold a bootable pair. The pair in the middle of the promotion, kernel A
    with the bridge, and kernel B with the bridge, each boots under QEMU from the cut disk."""
    second = other_kernel(kernel)
    if os.geteuid() != 0:
        pytest.skip("needs root: the cut disks are loop-mounted")
    enter_private_mount_namespace()
    images = {}
    for k in (kernel, second):
        out = tmp_path / f"initrd-{k.version}.img"
        build_initramfs(BuildConfig(modules_dir=k.modules, output=out, compress=Compression.ZSTD))
        images[k.version] = out.read_bytes()
    content = tmp_path / "state-content"
    content.mkdir()
    deploy(
        content,
        kernel_root(tmp_path, "v2", second, images[second.version], command_payload),
        deployment_id="v2",
        created=CREATED,
        known_good=True,
    )
    deploy(
        content,
        kernel_root(tmp_path, "v1", kernel, images[kernel.version], command_payload),
        deployment_id="v1",
        created=CREATED + 1,
        known_good=True,
    )  # the default
    state = StateLayout(content)
    bootpair.promote(Path(state.top) / "boot", state, state.read_manifest("v1"))
    disk = make_state_disk(
        tmp_path / "state.img",
        content,
        size_mb=256,
        fs_label=FS_LABEL,
        fs_uuid=FS_UUID,
        partlabel=PARTLABEL,
        partuuid=PARTUUID,
    )
    offset = partition_offset(disk)
    pristine = tmp_path / "pristine.img"
    copy_sparse(disk, pristine)

    log = tmp_path / "promote.log"
    m = Machine(
        kernel,
        tmp_path / f"initrd-{kernel.version}.img",
        log_path=tmp_path / "promote-console.log",
        disks=[LoggedDisk(disk, log)],
        cmdline=f"{BASE} test.run=promote",
        accel=qemu_accel,
    )
    with m:
        m.wait_for(
            "OVERLAYROOT-TEST done",
            BOOT_TIMEOUT,
            failure=("Kernel panic - not syncing", "overlayroot: error:", "Traceback"),
        )
        m.wait_exit(60)
    assert m.markers()["promote"] == "0"

    kernels = {"A": kernel.vmlinuz.read_bytes(), "B": second.vmlinuz.read_bytes()}
    writes = read_log(log)
    replayer = Replayer(writes, pristine, tmp_path / "cut.img")
    seen: dict[tuple[str, str], Path] = {}
    for index, torn in cut_points(writes):
        if index >= 0:
            replayer.advance(index)
        snapshot = replayer.snapshot(tmp_path / "snapshot.img")
        where = f"cut at log entry {index}{' (torn)' if torn else ''}"
        with mounted_state(snapshot, offset, tmp_path / "mnt") as top:
            pair = top / "overlayroot/boot"
            try:
                release = assert_bootable(pair, kernels, zstd=True)
            except AssertionError as e:
                raise AssertionError(f"{where}: the pair is not bootable: {e}") from None
            initrd = (pair / "initrd.img").read_bytes()
            kind = (
                "IA"
                if initrd == images[kernel.version]
                else "IB"
                if initrd == images[second.version]
                else "bridge"
            )
            files = {name: (pair / name).read_bytes() for name in ("vmlinuz", "initrd.img")}
        if (release, kind) not in seen:
            keep = tmp_path / f"pair-{len(seen)}"
            keep.mkdir()
            for name, data in files.items():
                (keep / name).write_bytes(data)
            copy_sparse(snapshot, keep / "disk.img")
            seen[(release, kind)] = keep
    assert (kernel.version, "IA") in seen and (second.version, "IB") in seen
    middles = [k for k in seen if k[1] == "bridge"]
    assert middles, f"no cut fell between the renames: {sorted(seen)}"
    for release, kind in middles:
        keep = seen[(release, kind)]
        booting = Kernel(vmlinuz=keep / "vmlinuz", modules=kernel.modules, version=release)
        machine = Machine(
            booting,
            keep / "initrd.img",
            log_path=keep / "console.log",
            disks=[keep / "disk.img"],
            cmdline=f"{BASE} overlayroot.debug",
            accel=qemu_accel,
        )
        with machine:
            machine.wait_for(
                "OVERLAYROOT-TEST done",
                BOOT_TIMEOUT,
                failure=(
                    "Kernel panic - not syncing",
                    "Attempted to kill init",
                    "overlayroot: error:",
                ),
            )
            machine.wait_exit(60)
        assert f"Linux version {release} " in machine.console
        assert "did not load" not in machine.console
