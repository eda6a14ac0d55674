"""What is mounted below a path, for the harness and the host tests that mount for real."""

from __future__ import annotations

from pathlib import Path


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, innermost (newest) last."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(f"{path}/"):
                found.append(point)
    return found
