"""Copy a directory tree with everything a root filesystem's files carry.

One copier for every copy the project makes: a ``dir`` deployment and a carried-forward
``/etc`` upper (``overlayroot deploy``), and the first boot's seeding of an empty persistent
``/var`` or ``/home`` from the image (the boot stage). Owners, modes, set-id bits, xattrs (file
capabilities, SELinux labels, overlayfs' opaque markers), symlinks, device nodes, FIFOs,
hardlinks and times are kept; sockets are skipped (they belong to a running service). It
imports only ``os`` and ``stat``: the boot stage carries it.
"""

from __future__ import annotations

import errno
import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

CHUNK = 1 << 20


def copy_tree(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    mtime: int | None = None,
    report: Callable[[int], None] | None = None,
) -> int:
    """Copy ``source`` to the new directory ``target``; ``mtime`` (UNIX seconds) fixes every
    time instead of keeping them. ``report`` is told the bytes copied so far. Returns the bytes
    copied. Raises ``OSError``; the caller removes a partial copy."""
    links: dict[tuple[int, int], str] = {}
    src_root, dst_root = os.fsdecode(source), os.fsdecode(target)
    directories = [(src_root, dst_root, os.lstat(src_root))]
    stack = [(src_root, dst_root)]
    done = 0
    os.mkdir(dst_root, 0o700)
    while stack:
        src_dir, dst_dir = stack.pop()
        with os.scandir(src_dir) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            src, dst = f"{src_dir}/{name}", f"{dst_dir}/{name}"
            st = os.lstat(src)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                os.mkdir(dst, 0o700)
                stack.append((src, dst))
                directories.append((src, dst, st))
                continue
            if stat.S_ISSOCK(mode):
                continue
            if not stat.S_ISDIR(mode) and st.st_nlink > 1:
                first = links.setdefault((st.st_dev, st.st_ino), dst)
                if first != dst:
                    os.link(first, dst, follow_symlinks=False)
                    continue
            if stat.S_ISREG(mode):
                done = copy_file(src, dst, done, report)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(src), dst)
            else:
                os.mknod(dst, mode, st.st_rdev)
            copy_metadata(src, dst, st, mtime)
    # Directories last and deepest first: filling them changed their times.
    for src, dst, st in reversed(directories):
        copy_metadata(src, dst, st, mtime)
    return done


def copy_file(
    src: str, dst: str, done: int = 0, report: Callable[[int], None] | None = None
) -> int:
    """The contents of ``src`` into the new file ``dst`` (0600 until its metadata is copied);
    returns ``done`` plus the bytes copied."""
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fout = os.open(
            dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            while True:
                try:  # in the kernel, and a reflink where the filesystem can
                    copied = os.copy_file_range(fin, fout, CHUNK)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    chunk = os.read(fin, CHUNK)
                    copied = len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fout, view) :]
                if not copied:
                    break
                done += copied
                if report is not None:
                    report(done)
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return done


def copy_metadata(src: str, dst: str, st: os.stat_result, mtime: int | None) -> None:
    """Owner first (chown clears set-id bits and file capabilities), then mode, xattrs, times."""
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    for attr in os.listxattr(src, follow_symlinks=False):
        os.setxattr(dst, attr, os.getxattr(src, attr, follow_symlinks=False), follow_symlinks=False)
    times = (mtime * 10**9,) * 2 if mtime is not None else (st.st_atime_ns, st.st_mtime_ns)
    os.utime(dst, ns=times, follow_symlinks=False)
