"""Files on the state filesystem, read and written as a power cut and a hostile disk allow.

The boot stage and the commands share these, so they import nothing beyond ``os`` and ``stat``.

- :func:`read_regular` reads a file only when it is a regular file (never a FIFO that would
  block the boot, a device, or through a symlink) and only up to a size limit.
- :func:`write_atomically` writes a temporary file of a name no other process uses, fsyncs it,
  renames it over the target and fsyncs the directory: the target holds the old bytes or the
  new ones after a power cut, never a mix.
- :func:`set_aside` renames a damaged path out of the way (``NAME.damaged-N``): kept for a
  person to inspect, never deleted.
- :func:`ensure_dir` makes a path a real directory, setting aside whatever else was there.
"""

from __future__ import annotations

import errno
import os
import stat

# Type-only imports: the boot stage must not pay for importing ``collections``.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import BinaryIO

PathLike = str | os.PathLike[str]


class NotRegular(OSError):
    """The path exists but is not a regular file (a directory, FIFO, device, socket or
    symlink)."""


def fsync_dir(path: PathLike) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "of an unknown type"


def _open_regular(path: PathLike) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:  # the last component is a symlink
            raise NotRegular(e.errno, "it is a symlink", os.fspath(path)) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegular(
            errno.EISDIR, f"it is {kind(st.st_mode)}, not a regular file", os.fspath(path)
        )
    return fd, st


def open_regular(path: PathLike) -> BinaryIO:
    """The regular file at ``path`` opened for reading; raises ``OSError`` (``NotRegular`` for
    a symlink, FIFO, directory or device)."""
    fd, _ = _open_regular(path)
    return os.fdopen(fd, "rb")


def read_regular(path: PathLike, limit: int) -> bytes:
    """The bytes of the regular file at ``path``; raises ``OSError`` (``NotRegular`` for any
    other kind of file, ``EFBIG`` beyond ``limit`` bytes)."""
    fd, st = _open_regular(path)
    try:
        if st.st_size > limit:
            raise OSError(
                errno.EFBIG, f"it is {st.st_size} bytes, more than {limit}", os.fspath(path)
            )
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"it grew beyond {limit} bytes", os.fspath(path))
        return data
    finally:
        os.close(fd)


def write_atomically(
    path: str,
    data: bytes,
    *,
    mode: int = 0o644,
    keep_previous: str | None = None,
    previous_ok: Callable[[bytes], bool] | None = None,
) -> None:
    """Replace ``path`` with ``data``, durably and atomically.

    ``keep_previous``: first make the current file's bytes that name too (a hard link, so
    there is no moment without a copy), but only when ``previous_ok`` accepts them: a damaged
    file must never become the backup. A ``path`` that is not a regular file is set aside."""
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.new-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _remove(tmp)
        raise
    os.close(fd)
    if not regular_or_missing(path):
        set_aside(path)
    elif keep_previous is not None and os.path.lexists(path):
        try:
            good = previous_ok is None or previous_ok(read_regular(path, 1 << 24))
        except OSError:
            good = False
        if good:
            link = f"{keep_previous}.new-{os.getpid()}"
            _remove(link)
            os.link(path, link)
            if not regular_or_missing(keep_previous):
                set_aside(keep_previous)
            os.replace(link, keep_previous)
    os.replace(tmp, path)
    fsync_dir(directory)


def regular_or_missing(path: PathLike) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True


def _remove(path: str) -> None:
    try:  # noqa: SIM105 - contextlib is too dear an import for the boot stage
        os.unlink(path)
    except FileNotFoundError:
        pass


def set_aside(path: PathLike) -> str:
    """Rename ``path`` to the first free ``PATH.damaged-N`` and return that name. Raises
    ``OSError``."""
    base = os.fspath(path)
    for n in range(1, 1000):
        away = f"{base}.damaged-{n}"
        if not os.path.lexists(away):
            os.rename(base, away)
            fsync_dir(os.path.dirname(base) or ".")
            return away
    raise OSError(errno.EEXIST, "too many damaged copies set aside already", base)


def ensure_dir(path: PathLike, mode: int = 0o755) -> str | None:
    """Make ``path`` a directory (not a symlink to one). Whatever else is there is set aside;
    returns where it went, or None when nothing had to move. Raises ``OSError``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    moved = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        moved = set_aside(path)
        st = None
    if st is None:
        os.mkdir(path, mode)
        os.chmod(path, mode)  # whatever the umask
        fsync_dir(os.path.dirname(os.fspath(path)) or ".")
    return moved


def remove_tree(path: PathLike) -> None:
    """Remove ``path`` and everything below it, never following a symlink. Raises
    ``OSError``; a missing ``path`` is nothing to do."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    for top, dirs, names in os.walk(path, topdown=False):
        for name in names:
            os.unlink(os.path.join(top, name))
        for name in dirs:
            child = os.path.join(top, name)
            if os.path.islink(child):
                os.unlink(child)
            else:
                os.rmdir(child)
    os.rmdir(path)
