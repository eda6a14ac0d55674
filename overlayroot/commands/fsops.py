"""File operations of ``overlayroot deploy``, durable and with progress: copying a file or a tree
(``treecopy``: xattrs and hard links kept), fixing mtimes for reproducible builds, fsyncs, and
OSError turned into a ``BootError`` that names the path."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from overlayroot.commands import target
from overlayroot.core import (
    digest,
    treecopy,
)
from overlayroot.core.errors import BootError

DIR_MODE = 0o755
# An image holds the root's secrets (/etc/shadow, host keys): root alone may read it.
IMAGE_MODE = 0o600
# A kernel and its initramfs are no secret (and /boot's are world-readable).
KERNEL_MODE = 0o644


def copy_file(source: Path, target: Path, progress: Progress, mode: int = IMAGE_MODE) -> None:
    total = source.stat().st_size
    with (
        progress.task(f"copying {source.name}", total) as report,
        open(source, "rb") as src,
        open(target, "xb") as dst,
    ):
        done = 0
        while chunk := src.read(digest.CHUNK):
            dst.write(chunk)
            done += len(chunk)
            report(done)
    os.chmod(target, mode)


def copy_tree(source: Path, target: Path, *, mtime: int | None, progress: Progress) -> None:
    """Copy keeping owners, modes, xattrs, symlinks, devices and hardlinks; mtimes too unless
    ``mtime`` fixes them all."""
    with progress.task(f"copying {source}", None) as report:
        treecopy.copy_tree(source, target, mtime=mtime, report=report)


def fix_mtimes(root: Path, mtime: int) -> None:
    """Every mtime (and atime) under ``root``, symlinks included, set to ``mtime``."""
    times = (mtime * 10**9,) * 2
    for directory, dirs, names in os.walk(root, topdown=False):
        for name in (*names, *dirs):
            os.utime(os.path.join(directory, name), ns=times, follow_symlinks=False)
    os.utime(root, ns=times)


def tree_size(root: Path) -> int:
    """Bytes of the regular files in a tree, each hardlinked file counted once."""
    seen: set[int] = set()
    total = 0
    for directory, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def make_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0755 whatever the umask; keep it if it exists."""
    missing = []
    for directory in (path, *path.parents):
        if directory.is_dir():
            break
        missing.append(directory)
    for directory in reversed(missing):
        os.mkdir(directory)
        os.chmod(directory, DIR_MODE)


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def converting_os_errors(doing: str) -> Iterator[None]:
    """Turn an ``OSError`` into a ``BootError`` that says what was being done."""
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        advice = target.advice(
            e.errno,
            again="deploy again",
            root="run as root (owners and device nodes must be kept)",
            otherwise="check the path and try again",
        )
        raise BootError(f"{doing}: {e.strerror}{where}{advice}") from None


def last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "no output"


class Progress:
    """One updating status line on a terminal; silent when ``stream`` is not one."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream

    @classmethod
    def for_stream(cls, stream: TextIO) -> Progress:
        return cls(stream if stream.isatty() else None)

    def note(self, message: str) -> None:
        print(f"overlayroot: {message}", file=self.stream or sys.stderr)

    @contextlib.contextmanager
    def task(self, what: str, total: int | None) -> Iterator[Callable[[int], None]]:
        stream = self.stream
        if stream is None:
            yield lambda done: None
            return
        start = last = time.monotonic()

        def report(done: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < 0.2:
                return
            last = now
            amount = f"{done / 2**20:.0f}" + (f"/{total / 2**20:.0f}" if total else "")
            stream.write(f"\r\033[K{what}: {amount} MiB")
            stream.flush()

        stream.write(f"\r\033[K{what}…")
        stream.flush()
        yield report
        stream.write(f"\r\033[K{what}: done in {time.monotonic() - start:.1f} s\n")
        stream.flush()
