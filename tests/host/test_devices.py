"""Finding the state device by LABEL=, UUID=, PARTUUID=, PARTLABEL= and path, on a real GPT disk
attached to a loop device with partition scanning."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayroot.boot import devices
from overlayroot.boot.devices import find, scan
from overlayroot.core.blkid import probe
from overlayroot.core.errors import BootError
from qemu.disks import make_state_disk
from tests.host.conftest import require_tools

FS_UUID = "0b7a5c1e-1111-4222-8333-444455556666"
PARTUUID = "a1b2c3d4-0000-4000-8000-00000000beef"


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_tools("sgdisk", "mke2fs", "losetup")
    base = tmp_path_factory.mktemp("disk")
    content = base / "content"
    content.mkdir()
    image = make_state_disk(
        base / "disk.img",
        content,
        size_mb=16,
        fs_label="ortest-state",
        fs_uuid=FS_UUID,
        partlabel="ortest part",
        partuuid=PARTUUID,
    )
    loopdev = subprocess.run(
        ["losetup", "--find", "--show", "--partscan", "--read-only", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deadline = time.monotonic() + 2
    while not Path(f"{loopdev}p1").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not Path(f"{loopdev}p1").exists():
        # Kernels built without CONFIG_EFI_PARTITION (this CI's) do not scan GPT: tell the
        # kernel about the partition with BLKPG instead, as partx does.
        subprocess.run(["partx", "--add", loopdev], check=True)
    yield loopdev
    subprocess.run(["losetup", "--detach", loopdev], check=False)


@pytest.mark.parametrize(
    "spec",
    [
        "LABEL=ortest-state",
        f"UUID={FS_UUID}",
        f"UUID={FS_UUID.upper()}",
        f"PARTUUID={PARTUUID}",
        "PARTLABEL=ortest part",
        "/dev/disk/by-partlabel/ortest\\x20part",
        f"/dev/disk/by-uuid/{FS_UUID}",
    ],
)
def test_finds_the_partition_by_every_kind_of_spec(disk: str, spec: str) -> None:
    found = find(spec, timeout=0)
    assert found.path == f"{disk}p1"
    assert found.probe is not None and found.probe.fstype == "ext4"


def test_finds_a_device_by_path(disk: str) -> None:
    assert find(f"{disk}p1", timeout=0).name == f"{disk.removeprefix('/dev/')}p1"


def test_scan_agrees_with_blkid(disk: str) -> None:
    by_name = {d.path: d for d in scan()}
    part = by_name[f"{disk}p1"]
    out = subprocess.run(
        ["blkid", "-p", "-o", "export", part.path], check=True, capture_output=True, text=True
    ).stdout
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert part.probe is not None and part.partition is not None
    assert (part.probe.label, part.probe.uuid) == (fields["LABEL"], fields["UUID"])
    assert part.partition.uuid == fields["PART_ENTRY_UUID"]
    assert part.partition.label == fields["PART_ENTRY_NAME"].replace("\\ ", " ")  # shell-quoted
    assert by_name[disk].probe is None  # the whole disk holds a partition table, not a fs


def test_a_label_that_never_appears_names_the_spec_and_lists_what_was_seen(disk: str) -> None:
    started = time.monotonic()
    with pytest.raises(BootError) as e:
        find("LABEL=no-such-label", timeout=0.3)
    assert time.monotonic() - started >= 0.3
    message = str(e.value)
    assert message.startswith("the state device LABEL=no-such-label did not appear within 0.3 s")
    assert f"{disk}p1 ext4 LABEL=ortest-state UUID={FS_UUID} PARTUUID={PARTUUID}" in message
    assert "overlayroot.timeout=" in message


@pytest.mark.parametrize("spec", ["LABLE=x", "UUID=", "dev/vda", "x"])
def test_a_spec_that_cannot_be_read(spec: str) -> None:
    with pytest.raises(BootError, match=f"cannot read the device spec '{spec}': use LABEL="):
        find(spec, timeout=0)


def test_probe_reads_erofs_and_squashfs_images(tmp_path: Path) -> None:
    require_tools("mkfs.erofs", "mksquashfs")
    (tmp_path / "tree").mkdir()
    # erofs-utils 1.5 cannot set a volume label: only the UUID is checked.
    subprocess.run(
        [
            "mkfs.erofs",
            "--quiet",
            f"-U{FS_UUID}",
            str(tmp_path / "a.erofs"),
            str(tmp_path / "tree"),
        ],
        check=True,
    )
    subprocess.run(
        ["mksquashfs", str(tmp_path / "tree"), str(tmp_path / "a.sqfs"), "-quiet", "-no-progress"],
        check=True,
    )
    erofs = probe(str(tmp_path / "a.erofs"))
    assert erofs is not None and (erofs.fstype, erofs.uuid) == ("erofs", FS_UUID)
    squash = probe(str(tmp_path / "a.sqfs"))
    assert squash is not None and squash.fstype == "squashfs"
    (tmp_path / "junk").write_bytes(b"\x01" * 70000)
    assert probe(str(tmp_path / "junk")) is None


def test_the_wait_looks_again_soon_then_every_50_ms(
    monkeypatch: pytest.MonkeyPatch, disk: str
) -> None:
    """A device that appears just after a scan is found within 5 ms, not a whole 50 ms later;
    the intervals double up to 50 ms."""
    real_scan = devices.scan
    scans: list[int] = []
    slept: list[float] = []

    def late_scan(sysfs: str, dev: str) -> list[devices.BlockDevice]:
        scans.append(1)
        return real_scan(sysfs, dev) if len(scans) > 7 else []  # present from the 8th scan

    monkeypatch.setattr(devices, "scan", late_scan)
    monkeypatch.setattr(time, "sleep", slept.append)
    assert find("LABEL=ortest-state", timeout=60).name == f"{disk.removeprefix('/dev/')}p1"
    assert slept == [0.005, 0.01, 0.02, 0.04, 0.05, 0.05, 0.05]
