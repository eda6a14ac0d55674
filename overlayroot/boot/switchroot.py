"""Hand the machine to the assembled root: what busybox's switch_root does, without busybox."""

from __future__ import annotations

import os
import stat

from overlayroot.boot import priority
from overlayroot.core import syscalls

MOVED_MOUNTS = ("/proc", "/sys", "/dev", "/run")


def free_initramfs(top: str, root_dev: int) -> None:
    """Delete the initramfs's files to give its memory back, never crossing into a mount."""
    for entry in os.scandir(top):
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if st.st_dev != root_dev:
            continue
        try:
            if stat.S_ISDIR(st.st_mode):
                free_initramfs(entry.path, root_dev)
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            pass  # a mount point or a busy directory stays; it costs no memory


def switch_root(new_root: str, init: str, argv: list[str]) -> None:
    """Move the API filesystems into ``new_root``, free the initramfs, make ``new_root`` ``/``
    and exec ``init``. Returns only by raising ``OSError``."""
    if os.stat(new_root).st_dev == os.stat("/").st_dev:
        raise OSError(22, "the new root is not a mount point", new_root)
    for path in MOVED_MOUNTS:
        target = new_root + path
        if os.path.isdir(target):
            syscalls.mount(path, target, None, syscalls.MS_MOVE)
        else:
            syscalls.umount(path, syscalls.MNT_DETACH)
    os.chdir(new_root)
    # In the initramfs "/" is rootfs: check, so that a call from the wrong place cannot wipe a
    # real root filesystem.
    if os.path.exists("/init") and os.stat("/").st_dev != os.stat(".").st_dev:
        free_initramfs("/", os.stat("/").st_dev)
    syscalls.mount(".", "/", None, syscalls.MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    priority.relax()  # the real init and all it starts run at the usual priority
    os.execv(init, [init, *argv])
