"""Where the harness keeps what it downloads, builds and logs."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """`$OVERLAYROOT_CACHE`, or `<repo>/.cache` (gitignored)."""
    configured = os.environ.get("OVERLAYROOT_CACHE")
    path = Path(configured) if configured else REPO_ROOT / ".cache"
    path.mkdir(parents=True, exist_ok=True)
    return path
