"""Where the harness keeps what it downloads, builds and logs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """`$OVERLAYROOT_CACHE`, or `<repo>/.cache` (gitignored)."""
    configured = os.environ.get("OVERLAYROOT_CACHE")
    path = Path(configured) if configured else REPO_ROOT / ".cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_complete(final: Path) -> bool:
    """Whether the cache entry ``final`` was published whole (see :func:`build_once`)."""
    return (final / ".complete").exists()


@contextlib.contextmanager
def entry_lock(final: Path) -> Iterator[None]:
    """Hold the lock of the cache entry ``final``: an exclusive ``flock`` on the file
    ``.<name>.lock`` beside it, waited for as long as another process holds it. The kernel
    lets go of it when its holder ends, however it ends."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_once(final: Path, fill: Callable[[Path], object]) -> Path:
    """The cache entry ``final``, built on first use: ``fill`` fills a staging directory beside
    it, which becomes ``final``, marked ``.complete``, in one rename, so a crash leaves no half
    entry. The build runs under :func:`entry_lock`: a second process that wants the same entry
    meanwhile waits for the first and then uses its entry. A failed ``fill`` leaves nothing (its
    error goes to the caller) and the next call tries again; an incomplete ``final`` (left by
    an older harness) is replaced."""
    if is_complete(final):
        return final
    with entry_lock(final):
        if is_complete(final):
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            fill(staging)
            (staging / ".complete").touch()
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final
