"""This checkout's wheel, for the tests of what `pip install` puts into an environment and for
images that install overlayroot the way a distribution does (qemu/trixie.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from qemu.paths import REPO_ROOT

# What goes into the wheel (pyproject.toml's packages, and the files its metadata reads).
SOURCES = ("pyproject.toml", "README.md", "overlayroot", "initrd")


class WheelBuildFailed(RuntimeError):
    """pip could not build the wheel: the message has the tail of its output."""


def build_wheel(out: Path) -> Path:
    """The wheel, built into ``out`` (which must not exist) from a copy of :data:`SOURCES`:
    setuptools leaves a ``build/`` directory in the tree it builds, and a stale one would leak
    into the next wheel."""
    out.mkdir()
    source = out / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(
                REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(REPO_ROOT / name, source / name)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        cwd=out,
    )
    if result.returncode != 0:
        raise WheelBuildFailed(f"pip wheel failed:\n{result.stderr[-2000:]}")
    (wheel,) = out.glob("overlayroot-*.whl")
    return wheel
