"""Find the state device named by a spec (``LABEL=``, ``UUID=``, ``PARTUUID=``, ``PARTLABEL=`` or
a ``/dev`` path) from sysfs and the devices' own headers, waiting for it to appear."""

from __future__ import annotations

import os
import time

from overlayroot.core.blkid import Partition, Probe, gpt_partitions, probe
from overlayroot.core.errors import BootError

SPEC_KINDS = ("LABEL", "UUID", "PARTUUID", "PARTLABEL")
# udev's symlinks do not exist without udev; read them as the spec they stand for.
_BY_DIRS = {
    "by-label": "LABEL",
    "by-uuid": "UUID",
    "by-partuuid": "PARTUUID",
    "by-partlabel": "PARTLABEL",
}
# The wait for the state device: a device that appears just after a scan is seen within 5 ms,
# not a whole interval later; one that takes long is looked for every 50 ms (a scan reads each
# device's first blocks).
FIRST_POLL_INTERVAL = 0.005
POLL_INTERVAL = 0.05


def parse_spec(spec: str) -> tuple[str, str]:
    """``("LABEL", "state")``, ..., or ``("PATH", "/dev/vda1")``."""
    if spec.startswith("/dev/disk/"):
        parts = spec.split("/")
        if len(parts) == 5 and parts[3] in _BY_DIRS and parts[4]:
            return _BY_DIRS[parts[3]], _unescape_udev(parts[4])
    if spec.startswith("/"):
        return "PATH", spec
    kind, sep, value = spec.partition("=")
    if sep and kind.upper() in SPEC_KINDS and value:
        return kind.upper(), value
    raise BootError(
        f"cannot read the device spec {spec!r}: use LABEL=, UUID=, PARTUUID=, PARTLABEL= or a"
        " /dev path (in overlayroot.state= or root=)"
    )


def _unescape_udev(name: str) -> str:
    """udev writes a space in a label as ``\\x20``."""
    out, i = [], 0
    while i < len(name):
        if name.startswith("\\x", i) and i + 4 <= len(name):
            try:
                out.append(chr(int(name[i + 2 : i + 4], 16)))
                i += 4
                continue
            except ValueError:
                pass
        out.append(name[i])
        i += 1
    return "".join(out)


class BlockDevice:
    __slots__ = ("name", "partition", "path", "probe", "rdev", "size")

    def __init__(
        self,
        name: str,
        path: str,
        size: int,
        rdev: str,
        probe: Probe | None,
        partition: Partition | None,
    ) -> None:
        self.name = name
        self.path = path
        self.size = size  # bytes
        self.rdev = rdev  # "major:minor"
        self.probe = probe
        self.partition = partition

    def describe(self) -> str:
        words = [self.path]
        if self.probe:
            words.append(self.probe.fstype)
            if self.probe.label:
                words.append(f"LABEL={self.probe.label}")
            if self.probe.uuid:
                words.append(f"UUID={self.probe.uuid}")
        if self.partition:
            words.append(f"PARTUUID={self.partition.uuid}")
            if self.partition.label:
                words.append(f"PARTLABEL={self.partition.label}")
        if not self.probe and not self.partition:
            words.append("(no filesystem recognised)")
        return " ".join(words)

    def matches(self, kind: str, value: str) -> bool:
        if kind == "PATH":
            return self.path == value or _same_node(self.path, value)
        if kind == "LABEL":
            return bool(self.probe and self.probe.label == value)
        if kind == "UUID":
            return bool(self.probe and self.probe.uuid and self.probe.uuid.lower() == value.lower())
        if kind == "PARTUUID":
            return bool(self.partition and self.partition.uuid.lower() == value.lower())
        if kind == "PARTLABEL":
            return bool(self.partition and self.partition.label == value)
        return False


def _same_node(a: str, b: str) -> bool:
    try:
        return os.stat(a).st_rdev == os.stat(b).st_rdev
    except OSError:
        return False


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def scan(sysfs: str = "/sys/class/block", dev: str = "/dev") -> list[BlockDevice]:
    """Every block device with a size, probed; partitions carry their GPT entry."""
    devices = []
    tables: dict[str, list[Partition]] = {}
    for name in sorted(os.listdir(sysfs)):
        node = os.path.join(sysfs, name)
        try:
            size = int(_read(os.path.join(node, "size"))) * 512
            rdev = _read(os.path.join(node, "dev"))
        except (OSError, ValueError):
            continue
        if size == 0:
            continue
        path = os.path.join(dev, name)
        try:
            found = probe(path)
        except OSError:
            found = None
        partition = None
        if os.path.exists(os.path.join(node, "partition")):
            number = int(_read(os.path.join(node, "partition")))
            parent = os.path.basename(os.path.dirname(os.path.realpath(node)))
            if parent not in tables:
                tables[parent] = _gpt(sysfs, dev, parent)
            partition = next((p for p in tables[parent] if p.number == number), None)
        devices.append(BlockDevice(name, path, size, rdev, found, partition))
    return devices


def _gpt(sysfs: str, dev: str, disk: str) -> list[Partition]:
    try:
        sector = int(_read(os.path.join(sysfs, disk, "queue", "logical_block_size")))
    except (OSError, ValueError):
        sector = 512
    try:
        return gpt_partitions(os.path.join(dev, disk), sector)
    except OSError:
        return []


def find(
    spec: str,
    timeout: float,
    *,
    sysfs: str = "/sys/class/block",
    dev: str = "/dev",
) -> BlockDevice:
    """Wait up to ``timeout`` seconds for the device ``spec`` names."""
    kind, value = parse_spec(spec)
    deadline = time.monotonic() + timeout
    interval = FIRST_POLL_INTERVAL
    while True:
        devices = scan(sysfs, dev)
        for device in devices:
            if device.matches(kind, value):
                return device
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
        interval = min(interval * 2, POLL_INTERVAL)
    seen = "\n".join("  " + d.describe() for d in devices) or "  (none)"
    raise BootError(
        f"the state device {spec} did not appear within {timeout:g} s. Block devices seen:\n"
        f"{seen}\nCheck overlayroot.state= (or root=) on the kernel command line, that the"
        " disk's driver is in the initramfs, or give slow storage more time with"
        " overlayroot.timeout=SECONDS."
    )
