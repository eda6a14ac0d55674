"""The few system calls Python's ``os`` lacks, through cffi in out-of-line ABI mode.

Every failure becomes an ``OSError`` that names the path or device, like ``os`` does.
"""

from __future__ import annotations

import os

from overlayroot.core._syscalls_ffi import ffi

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

RB_AUTOBOOT = 0x01234567
RB_POWER_OFF = 0x4321FEDC
RB_KEXEC = 0x45584543  # LINUX_REBOOT_CMD_KEXEC: start the kernel kexec_file_load loaded
KEXEC_FILE_UNLOAD = 1
KEXEC_FILE_NO_INITRAMFS = 4

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16

CLONE_NEWNS = 0x00020000

_FINIT_MODULE = {"x86_64": 313, "aarch64": 273, "riscv64": 273, "armv7l": 379, "i686": 350}
_KEXEC_FILE_LOAD = {"x86_64": 320, "aarch64": 294, "riscv64": 294}
_UNSHARE = {"x86_64": 272, "aarch64": 97, "riscv64": 97, "armv7l": 337, "i686": 310}

_lib = ffi.dlopen(None)


def _check(result: int, *names: str | None) -> int:
    if result < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err), *names)
    return result


def _c(text: str | None) -> object:
    return ffi.NULL if text is None else text.encode()


def mount(
    source: str | None,
    target: str,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2). The error names the source and the target: ``'/dev/loop0' -> '/sysroot'``."""
    result = _lib.mount(_c(source), _c(target), _c(fstype), flags, _c(data))
    if result < 0:
        err = ffi.errno
        if source and source != "none" and not flags & (MS_REMOUNT | MS_PRIVATE):
            raise OSError(err, os.strerror(err), source, None, target)
        raise OSError(err, os.strerror(err), target)


def umount(target: str, flags: int = 0) -> None:
    _check(_lib.umount2(target.encode(), flags), target)


def sync() -> None:
    _lib.sync()


def reboot(command: int) -> None:
    """reboot(2): does not return when it works."""
    _check(_lib.reboot(command))


# finit_module(2) flag: the file is compressed (.ko.xz, .ko.zst, .ko.gz); the kernel decompresses
# it (CONFIG_MODULE_DECOMPRESS, Linux 5.17 and later; EOPNOTSUPP without).
MODULE_INIT_COMPRESSED_FILE = 4


def finit_module(fd: int, name: str, params: str = "", flags: int = 0) -> None:
    number = _FINIT_MODULE.get(os.uname().machine)
    if number is None:
        raise OSError(38, f"finit_module: unknown syscall number on {os.uname().machine}", name)
    args = (ffi.cast("long", fd), ffi.new("char[]", params.encode()), ffi.cast("long", flags))
    _check(_lib.syscall(number, *args), name)


def kexec_file_load(kernel_fd: int, initrd_fd: int, cmdline: str, flags: int = 0) -> None:
    """kexec_file_load(2): load a kernel (and its initramfs, ``initrd_fd``; -1 with
    ``KEXEC_FILE_NO_INITRAMFS``) to be started by ``reboot(RB_KEXEC)``. The kernel checks the
    file is a kernel for this machine (ENOEXEC if not) and, under lockdown, its signature
    (EPERM, EKEYREJECTED)."""
    machine = os.uname().machine
    number = _KEXEC_FILE_LOAD.get(machine)
    if number is None:
        raise OSError(38, f"kexec_file_load: no such system call on {machine}")
    text = ffi.new("char[]", cmdline.encode())  # the length the kernel takes counts the NUL
    _check(
        _lib.syscall(
            number,
            ffi.cast("long", kernel_fd),
            ffi.cast("long", initrd_fd),
            ffi.cast("unsigned long", len(text)),
            text,
            ffi.cast("unsigned long", flags),
        )
    )


def unshare(flags: int) -> None:
    """unshare(2), e.g. ``CLONE_NEWNS`` for mounts no other process sees (Python 3.11's ``os``
    has no ``unshare``)."""
    number = _UNSHARE.get(os.uname().machine)
    if number is None:
        raise OSError(38, f"unshare: unknown syscall number on {os.uname().machine}")
    _check(_lib.syscall(number, ffi.cast("long", flags)))


def ioctl_int(fd: int, request: int, arg: int, name: str) -> int:
    """An ioctl whose argument is a plain integer; returns its non-negative result."""
    return _check(_lib.ioctl(fd, request, ffi.cast("unsigned long", arg)), name)


def ioctl_ptr(fd: int, request: int, arg: object, name: str) -> int:
    """An ioctl whose argument is a pointer to a cffi struct made by :func:`new`."""
    return _check(_lib.ioctl(fd, request, arg), name)


def new(ctype: str) -> object:
    """A zeroed C object, e.g. ``new("struct loop_config *")``."""
    return ffi.new(ctype)
