"""Where the harness keeps what it downloads, builds and logs."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """`$OVERLAYROOT_CACHE`, or `<repo>/.cache` (gitignored)."""
    configured = os.environ.get("OVERLAYROOT_CACHE")
    path = Path(configured) if configured else REPO_ROOT / ".cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_entry(final: Path) -> Iterator[Path]:
    """A staging directory beside ``final`` to fill. When the block ends without an error it
    becomes ``final``, marked ``.complete`` and replacing an older one, in one rename: a crash
    leaves no half entry. When another process publishes the same entry between the removal
    and the rename, the rename fails and that entry stands."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield staging
        (staging / ".complete").touch()
        if final.exists():
            shutil.rmtree(final)
        try:
            staging.rename(final)
        except OSError:
            if not (final / ".complete").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
