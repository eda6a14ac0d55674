"""Read-only loop devices, set up by ioctl: LOOP_CTL_GET_FREE then LOOP_CONFIGURE (Linux 5.8+),
or LOOP_SET_FD and LOOP_SET_STATUS64 on older kernels.

LOOP_CONFIGURE asks for direct I/O: the loop device then reads the image's blocks straight from
the state filesystem instead of through a second copy in the page cache (the image file's, under
the loop device's own), which saves the copy of every block read and half the memory it holds.
The kernel turns it off by itself where the backing file cannot do it (a filesystem without
O_DIRECT, a block size that does not fit); ``/sys/block/loopN/loop/dio`` says which it chose."""

from __future__ import annotations

import errno
import os

from overlayroot.core import syscalls

CONTROL = "/dev/loop-control"
_ATTEMPTS = 8  # another process can take the free device between GET_FREE and CONFIGURE


class LoopDevice:
    """An attached loop device. It detaches by itself once the last user (our fd, a mount) lets
    go (LO_FLAGS_AUTOCLEAR): mount it, then :meth:`close` it."""

    __slots__ = ("fd", "path")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LoopDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(backing: str) -> LoopDevice:
    """Attach ``backing`` read-only to a free loop device."""
    file_fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
    try:
        control = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(_ATTEMPTS):
                number = syscalls.ioctl_int(control, syscalls.LOOP_CTL_GET_FREE, 0, CONTROL)
                path = f"/dev/loop{number}"
                loop_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _configure(loop_fd, file_fd, path, backing)
                except OSError as e:
                    os.close(loop_fd)
                    if e.errno == errno.EBUSY:
                        continue
                    raise
                return LoopDevice(path, loop_fd)
            raise OSError(errno.EBUSY, "no free loop device after retries", backing)
        finally:
            os.close(control)
    finally:
        os.close(file_fd)


def _configure(loop_fd: int, file_fd: int, path: str, backing: str) -> None:
    info = syscalls.new("struct loop_info64 *")
    # READ_ONLY and DIRECT_IO only count for LOOP_CONFIGURE; for LOOP_SET_FD the O_RDONLY
    # backing fd makes the device read-only, and it reads through the page cache.
    info.lo_flags = (  # type: ignore[attr-defined]
        syscalls.LO_FLAGS_READ_ONLY | syscalls.LO_FLAGS_AUTOCLEAR | syscalls.LO_FLAGS_DIRECT_IO
    )
    name = os.fsencode(backing)[-63:]
    info.lo_file_name[0 : len(name)] = name  # type: ignore[attr-defined]
    config = syscalls.new("struct loop_config *")
    config.fd = file_fd  # type: ignore[attr-defined]
    config.info = info[0]  # type: ignore[index, attr-defined]
    try:
        syscalls.ioctl_ptr(loop_fd, syscalls.LOOP_CONFIGURE, config, path)
        return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    syscalls.ioctl_int(loop_fd, syscalls.LOOP_SET_FD, file_fd, path)
    try:
        syscalls.ioctl_ptr(loop_fd, syscalls.LOOP_SET_STATUS64, info, path)
    except OSError:
        syscalls.ioctl_int(loop_fd, syscalls.LOOP_CLR_FD, 0, path)
        raise
