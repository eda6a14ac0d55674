"""Host tests: real mounts, loop devices and mkfs tools, in a private mount namespace.

The whole test process enters its own mount namespace once, with every mount private, so
nothing a test mounts is seen by the host, and it all goes away with the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayroot import syscalls

CLONE_NEWNS = 0x00020000
_entered = False
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of this directory is a host test (``-m host`` selects them, ``-m 'not host'``
    leaves them out)."""
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.host)


def enter_private_mount_namespace() -> None:
    global _entered
    if _entered:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "unshare(CLONE_NEWNS)")
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    _entered = True


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, innermost (newest) last."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(f"{path}/"):
                found.append(point)
    return found


@pytest.fixture
def mount_ns(tmp_path: Path) -> Iterator[Path]:
    """A private mount namespace, and every mount below ``tmp_path`` undone afterwards."""
    if os.geteuid() != 0:
        pytest.skip("host mount tests need root (they mount loop devices and overlays)")
    enter_private_mount_namespace()
    yield tmp_path
    for point in reversed(mounts_under(tmp_path)):
        with contextlib.suppress(OSError):
            syscalls.umount(point, syscalls.MNT_DETACH)


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup installs them)")


def make_tree(root: Path, *, init: bool = True) -> Path:
    """A minimal deployment tree: the mount points, some /etc and /var content, an init."""
    for d in ("etc", "var/lib/testdata", "home", "run", "proc", "sys", "dev", "tmp", "sbin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/hostname").write_text("image\n")
    (root / "var/lib/testdata/seed").write_text("from the image\n")
    (root / "var/log").mkdir()
    os.symlink("../run/lock", root / "var/lock")
    if init:
        (root / "sbin/init").write_text("#!/bin/sh\necho hello\n")
        (root / "sbin/init").chmod(stat.S_IMODE(0o755))
    return root


def mkfs_ext4(image: Path, size_mb: int = 64, label: str = "state") -> None:
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, str(image)], check=True)
