"""The QEMU harness itself, booted for real: console, failures, power cut, disks, test root."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from qemu.disks import copy_for_boot, make_state_disk, partition_offset, read_file
from qemu.initramfs import make_busybox_initramfs
from qemu.kernel import Kernel
from qemu.logwrites import read_log
from qemu.machine import BootFailure, LoggedDisk, parse_markers
from qemu.plugin import MachineFactory
from qemu.rootfs import SEED, make_test_root

BOOT_TIMEOUT = 90.0
VIRTIO_BLK = ("virtio_pci", "virtio_blk")
FS_UUID = "0e5b7a52-6b7d-4b36-9d43-5b1d0a1f0001"
PARTUUID = "0e5b7a52-6b7d-4b36-9d43-5b1d0a1f0002"

# Mounts the test root from the state partition, hands /proc /sys /dev over, becomes its init.
SWITCH_ROOT = """\
mount -o {mode} /dev/vda1 /newroot
for fs in proc sys dev; do mount --move /$fs /newroot/$fs; done
exec switch_root /newroot /sbin/init
"""


def initramfs(tmp_path: Path, script: str, kernel: Kernel | None = None) -> Path:
    modules = VIRTIO_BLK if kernel is not None else ()
    return make_busybox_initramfs(tmp_path / "initrd.cpio", script, kernel=kernel, modules=modules)


def state_disk(tmp_path: Path, content: Path) -> Path:
    return make_state_disk(
        tmp_path / "state.img",
        content,
        size_mb=32,
        fs_label="ovr-state",
        fs_uuid=FS_UUID,
        partlabel="ovr-part",
        partuuid=PARTUUID,
    )


def test_boot_reaches_init_and_powers_off(tmp_path: Path, machine: MachineFactory) -> None:
    script = "read -r up _ < /proc/uptime\necho OVERLAYROOT-TEST uptime=$up\npoweroff -f\n"
    started = time.monotonic()
    with machine(initrd=initramfs(tmp_path, script)) as guest:
        guest.wait_for("OVERLAYROOT-TEST uptime=", BOOT_TIMEOUT)
        wall = time.monotonic() - started
        assert guest.wait_exit(30) == 0
    uptime = float(guest.markers()["uptime"])
    print(f"busybox /init marker: guest uptime {uptime:.2f} s, wall {wall:.2f} s")
    assert "\r" not in guest.console


def test_failure_pattern_raises_boot_failure_naming_the_log(
    tmp_path: Path, machine: MachineFactory
) -> None:
    script = "echo something went BADLY\nsleep 600\n"
    guest = machine(initrd=initramfs(tmp_path, script), name="bad")
    with guest, pytest.raises(BootFailure) as failure:
        guest.wait_for("never printed", BOOT_TIMEOUT, failure=["went BADLY"])
    assert str(guest.log_path) in str(failure.value)
    assert "something went BADLY" in str(failure.value)
    assert "something went BADLY" in guest.log_path.read_text()


def test_init_exiting_panics_and_ends_qemu(tmp_path: Path, machine: MachineFactory) -> None:
    with machine(initrd=initramfs(tmp_path, "exit 3\n")) as guest:
        with pytest.raises(BootFailure, match="Attempted to kill init"):
            guest.wait_for("never printed", BOOT_TIMEOUT)
        guest.wait_exit(60)


def test_wait_for_reports_qemu_exit(tmp_path: Path, machine: MachineFactory) -> None:
    guest = machine(initrd=initramfs(tmp_path, "poweroff -f\n"))
    with guest, pytest.raises(BootFailure, match="QEMU exited"):
        guest.wait_for("never printed", BOOT_TIMEOUT)


def test_kill_cuts_the_power(tmp_path: Path, machine: MachineFactory) -> None:
    with machine(initrd=initramfs(tmp_path, "echo READY\nsleep 600\n")) as guest:
        guest.wait_for("READY", BOOT_TIMEOUT)
        started = time.monotonic()
        guest.kill()
        assert time.monotonic() - started < 5
        with pytest.raises(BootFailure, match="QEMU exited"):
            guest.wait_for("never printed", 1)


def test_disks_appear_in_order_as_virtio_blk(
    tmp_path: Path, kernel: Kernel, machine: MachineFactory
) -> None:
    disks = []
    for name, size in (("a.img", 8), ("b.img", 16)):
        disk = tmp_path / name
        with disk.open("wb") as image:
            image.truncate(size << 20)
        disks.append(disk)
    script = (
        "echo OVERLAYROOT-TEST vda=$(cat /sys/block/vda/size)\n"
        "echo OVERLAYROOT-TEST vdb=$(cat /sys/block/vdb/size)\n"
        "poweroff -f\n"
    )
    with machine(initrd=initramfs(tmp_path, script, kernel), disks=disks) as guest:
        guest.wait_for(re.compile(r"OVERLAYROOT-TEST vdb=\d+"), BOOT_TIMEOUT)
    assert guest.markers() == {"vda": str(8 << 11), "vdb": str(16 << 11)}


def test_a_logged_disk_records_every_write_and_flush_next_to_a_plain_disk(
    tmp_path: Path, kernel: Kernel, machine: MachineFactory
) -> None:
    logged, plain = tmp_path / "logged.img", tmp_path / "plain.img"
    for disk in (logged, plain):
        with disk.open("wb") as image:
            image.truncate(8 << 20)
    script = (
        "echo hello | dd of=/dev/vda bs=512 seek=8 conv=sync,fsync 2>/dev/null\n"
        "echo OVERLAYROOT-TEST vdb=$(cat /sys/block/vdb/size)\n"
        "poweroff -f\n"
    )
    log = tmp_path / "logged.log"
    with machine(
        initrd=initramfs(tmp_path, script, kernel), disks=[LoggedDisk(logged, log), plain]
    ) as guest:
        guest.wait_for(re.compile(r"OVERLAYROOT-TEST vdb=\d+"), BOOT_TIMEOUT)
        guest.wait_exit(30)
    assert guest.markers() == {"vdb": str(8 << 11)}
    entries = read_log(log).entries
    first = next(e for e in entries if e.writes)
    assert (first.sector, read_log(log).data(first, 8, 1)[:6]) == (8, b"hello\n")
    assert any(e.durable_point for e in entries[first.index + 1 :])  # the fsync's flush
    assert logged.read_bytes()[8 * 512 : 8 * 512 + 6] == b"hello\n"  # written through


def test_markers_are_parsed_anywhere_in_a_console_line() -> None:
    console = (
        "[ 1.0] noise\nOVERLAYROOT-TEST root_ro=yes\n"
        "[ 2.0] kernel: OVERLAYROOT-TEST mount_etc=overlay overlay rw,index=off \n"
        "OVERLAYROOT-TEST var_token=\nOVERLAYROOT-TEST done\n"
    )
    assert parse_markers(console) == {
        "root_ro": "yes",
        "mount_etc": "overlay overlay rw,index=off",
        "var_token": "",
        "done": "",
    }


def test_state_disk_carries_its_names_and_content(tmp_path: Path) -> None:
    content = tmp_path / "content"
    (content / "overlayroot").mkdir(parents=True)
    (content / "overlayroot" / "boot.json").write_text('{"generation": 1}\n')
    disk = state_disk(tmp_path, content)

    info = subprocess.run(["sgdisk", "-i", "1", str(disk)], capture_output=True, text=True).stdout
    assert "Partition name: 'ovr-part'" in info
    assert f"Partition unique GUID: {PARTUUID.upper()}" in info
    assert "First sector: 2048 " in info
    offset = partition_offset(disk)
    assert offset == 1 << 20
    probe = subprocess.run(
        ["blkid", "-p", "-O", str(offset), "-o", "export", str(disk)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert {"TYPE=ext4", "LABEL=ovr-state", f"UUID={FS_UUID}"} <= set(probe)
    assert read_file(disk, offset, "/overlayroot/boot.json") == b'{"generation": 1}\n'
    with pytest.raises(FileNotFoundError):
        read_file(disk, offset, "/overlayroot/missing")


def test_a_disk_copied_for_a_boot_keeps_its_content_and_its_holes(tmp_path: Path) -> None:
    content = tmp_path / "content"
    (content / "overlayroot").mkdir(parents=True)
    (content / "overlayroot" / "boot.json").write_text('{"generation": 7}\n')
    disk = state_disk(tmp_path, content)

    copy = copy_for_boot(disk, tmp_path / "copy.img")

    assert copy.read_bytes() == disk.read_bytes()
    # 32 MiB of disk, nearly all of it holes: a benchmark's fsync must not write them all.
    assert copy.stat().st_blocks * 512 < disk.stat().st_size // 4
    assert read_file(copy, partition_offset(copy), "/overlayroot/boot.json") == (
        b'{"generation": 7}\n'
    )


def test_test_root_reports_a_read_only_root(
    tmp_path: Path, kernel: Kernel, machine: MachineFactory
) -> None:
    disk = state_disk(tmp_path, make_test_root(tmp_path / "root"))
    script = SWITCH_ROOT.format(mode="ro")
    with machine(
        initrd=initramfs(tmp_path, script, kernel),
        disks=[disk],
        cmdline="test.write=t1 test.read=1",
    ) as guest:
        guest.wait_for("OVERLAYROOT-TEST done", BOOT_TIMEOUT)
        assert guest.wait_exit(30) == 0
    markers = guest.markers()
    assert float(markers["uptime"]) > 0
    assert markers["pid"] == "1"
    assert markers["image"] == "test"
    assert markers["root_ro"] == "yes"
    assert markers["root_write_error"] == "Read-only file system"
    assert markers["etc_writable"] == "no"
    assert markers["mount_root"].startswith("/dev/vda1 ext4 ro")
    assert markers["write_var"] == "Read-only file system"
    assert markers["var_token"] == ""
    assert markers["var_seed"] == SEED
    assert "booted_json" not in markers


def test_test_root_tokens_persist_across_boots(
    tmp_path: Path, kernel: Kernel, machine: MachineFactory
) -> None:
    disk = state_disk(tmp_path, make_test_root(tmp_path / "root"))
    initrd = initramfs(tmp_path, SWITCH_ROOT.format(mode="rw"), kernel)
    with machine(initrd=initrd, disks=[disk], cmdline="test.write=tok1", name="write") as first:
        first.wait_for("OVERLAYROOT-TEST done", BOOT_TIMEOUT)
        first.wait_exit(30)
    assert first.markers()["root_ro"] == "no"
    assert first.markers()["write_etc"] == "ok"
    assert read_file(disk, partition_offset(disk), "/etc/test-token") == b"tok1\n"
    with machine(initrd=initrd, disks=[disk], cmdline="test.read=1", name="read") as second:
        second.wait_for("OVERLAYROOT-TEST done", BOOT_TIMEOUT)
    markers = second.markers()
    assert (markers["etc_token"], markers["var_token"], markers["home_token"]) == ("tok1",) * 3
