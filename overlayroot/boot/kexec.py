"""Switch the boot to a deployment's own kernel: check it, load it, leave the state clean, start it.

The boot stage calls these once the deployment's try is on disk (:mod:`overlayroot.boot.prepare`):

1. :func:`check` hashes the kernel and the initramfs against the manifest's sha256, at every
   switch (some 40 MB, against a root image's hundreds): a kernel that was damaged after its
   deployment was blessed would otherwise crash every boot of a deployment that no longer
   counts its boots;
2. :func:`load` hands both to ``kexec_file_load(2)`` with the command line for that kernel; the
   running kernel refuses a file that is not a kernel for this machine (ENOEXEC), and under
   lockdown one whose signature it cannot check (EPERM, EKEYREJECTED);
3. :func:`restart` makes the state filesystem clean on disk (a kexec is a reboot without the
   firmware: what is not written is lost, as in a power cut) and starts the loaded kernel.

Every failure is a :class:`~overlayroot.errors.BootError` that names the deployment, the file
and the reason, for the console and the history: the caller marks the deployment bad and tries
the next candidate in the same boot.
"""

from __future__ import annotations

import errno
import os

from overlayroot.core import digest, syscalls
from overlayroot.core.errors import BootError
from overlayroot.core.layout import Manifest, StateLayout

# What the kernel's refusal means, for a user who has never loaded a kernel by hand.
ADVICE = {
    errno.ENOEXEC: "it is not a kernel this machine can start (another architecture, or not a"
    " kernel image at all)",
    errno.EPERM: "the running kernel refuses to load another kernel (lockdown or Secure Boot"
    " without a signature it trusts, or kernel.kexec_load_disabled=1)",
    errno.EKEYREJECTED: "its signature was rejected (lockdown or Secure Boot accepts only"
    " kernels signed by a key the running kernel trusts)",
    errno.EBADMSG: "its signature could not be checked (lockdown or Secure Boot accepts only"
    " signed kernels)",
    errno.ENOSYS: "the running kernel cannot load another kernel (built without CONFIG_KEXEC_FILE)",
    errno.EINVAL: "the running kernel refused the load (a command line longer than it accepts,"
    " or an initramfs it cannot use)",
    errno.ENOMEM: "there is not enough memory to hold the kernel and its initramfs",
    errno.EBUSY: "another kernel load is in progress",
}


def check(layout: StateLayout, manifest: Manifest) -> None:
    """The deployment's kernel and initramfs against their sha256 in the manifest."""
    kernel = manifest.kernel
    assert kernel is not None
    for what, path, expected in (
        ("kernel", layout.kernel_path(manifest), kernel.vmlinuz_sha256),
        ("initramfs", layout.initramfs_path(manifest), kernel.initramfs_sha256),
    ):
        try:
            actual = digest.file_sha256(str(path))
        except OSError as e:
            raise BootError(
                f"deployment {manifest.id!r}: cannot read its {what} {path}: {e.strerror}"
            ) from None
        if actual != expected:
            raise BootError(
                f"deployment {manifest.id!r}: its {what} {path} fails its digest check (sha256"
                f" {actual[:16]}…, manifest says {expected[:16]}…): the file is damaged;"
                " deploy it again"
            )


def load(layout: StateLayout, manifest: Manifest, cmdline: str) -> None:
    """Load the deployment's kernel and initramfs for :func:`restart`."""
    kernel = manifest.kernel
    assert kernel is not None
    path = str(layout.kernel_path(manifest))
    initrd = str(layout.initramfs_path(manifest))
    fds: list[int] = []
    try:
        for name in (path, initrd):
            try:
                fds.append(os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW))
            except OSError as e:
                raise BootError(
                    f"deployment {manifest.id!r}: cannot open {name}: {e.strerror}"
                ) from None
        try:
            syscalls.kexec_file_load(fds[0], fds[1], cmdline)
        except OSError as e:
            why = ADVICE.get(e.errno or 0, e.strerror or "unknown error")
            raise BootError(
                f"deployment {manifest.id!r}: its kernel {kernel.version} ({path}) cannot be"
                f" loaded: {why} [kexec_file_load: {e.strerror}]"
            ) from None
    finally:
        for fd in fds:
            os.close(fd)


def restart(sysroot: str, command: int) -> None:
    """Leave the state filesystem mounted on ``sysroot`` clean on disk and reboot with
    ``command``: ``syscalls.RB_KEXEC`` starts the loaded kernel, ``syscalls.RB_AUTOBOOT``
    goes through the firmware and the bootloader. Returns only when the reboot fails, with the
    state filesystem writable again, by raising a BootError.

    Remounting read-only writes everything back and marks the filesystem clean, like an
    unmount, and works where an unmount would not (a framework's hook runs with the root
    mounted by systemd, which it cannot unmount). The ``sync`` before covers a remount that
    fails (a file open for writing): then the journal is what keeps it consistent, as after
    a power cut at that point."""
    syscalls.sync()
    try:
        syscalls.mount(None, sysroot, None, syscalls.MS_REMOUNT | syscalls.MS_RDONLY)
        read_only = True
    except OSError:
        read_only = False
    syscalls.sync()
    try:
        syscalls.reboot(command)
        error = "reboot(2) returned"
    except OSError as e:
        error = f"reboot(2) failed: {e.strerror}"
    if read_only:
        try:
            syscalls.mount(None, sysroot, None, syscalls.MS_REMOUNT)
        except OSError as e:
            error += f"; and the state filesystem stays read-only: {e.strerror}"
    raise BootError(error)
