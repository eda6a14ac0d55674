"""The deployment trees tests build: one minimal root, which tests that need more add to."""

from __future__ import annotations

import os
from pathlib import Path

from overlayroot.core import layout


def make_tree(root: Path, *, init: bool = True) -> Path:
    """A minimal deployment tree: the mount points every root needs, a little /etc and /var
    (a seed file, a log dir, the Debian /var/lock symlink) and, unless ``init=False``, an
    init that prints hello."""
    for d in (*layout.MOUNT_POINTS, "var/lib/testdata", "tmp", "sbin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/hostname").write_text("image\n")
    (root / "var/lib/testdata/seed").write_text("from the image\n")
    (root / "var/log").mkdir()
    os.symlink("../run/lock", root / "var/lock")
    if init:
        (root / "sbin/init").write_text("#!/bin/sh\necho hello\n")
        (root / "sbin/init").chmod(0o755)
    return root
