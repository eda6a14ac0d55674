"""The stage's CPU priority: ahead of the kernel's background work while it assembles the root,
back to where it was before it hands the machine over.

At the time the stage runs the kernel is often still busy beside it: Debian 13's kernel tests
its crypto algorithms in threads of their own (about a second of a TCG guest's CPU) and probes
devices asynchronously. Whatever of that shares the CPU with the stage delays the real init's
start by as much, yet none of it is needed before the real init runs (a module load that needs
an algorithm under test waits for its test, and the stage sleeps meanwhile). The stage
therefore runs at the highest priority (nice -20) and gives it up before anything else runs:
:func:`relax` before the real init's ``exec`` and in the rescue shell's children. The kernel
does the same work afterwards; nothing is skipped.
"""

from __future__ import annotations

import os

HURRIED = -20  # the highest priority a nice value gives; no real-time class (nothing starves)

_before: int | None = None  # the nice value before :func:`hurry`, while hurried


def hurry() -> bool:
    """Run at :data:`HURRIED`; False when the kernel refused (no ``CAP_SYS_NICE``, e.g. in a
    container), and the stage simply runs at the priority it has."""
    global _before
    try:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, HURRIED)
    except OSError:
        return False
    if _before is None:
        _before = before
    return True


def relax() -> None:
    """Back to the nice value before :func:`hurry` (nice is inherited across ``exec`` and
    ``fork``: the real init and everything it starts would keep it). Lowering a priority never
    needs a privilege."""
    global _before
    if _before is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, _before)
    except OSError:
        return
    _before = None


def nice() -> int:
    """The stage's nice value now (for ``overlayroot.debug``)."""
    return os.getpriority(os.PRIO_PROCESS, 0)
