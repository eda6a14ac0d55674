"""Arm the watchdog for a trial boot; disarm it once the deployment is blessed.

The stage opens the watchdog, sets its timeout and closes it without the magic 'V': the timer
keeps running, so a deployment that hangs before it is blessed is reset, and the reset counts
as a failed try. ``overlayroot bless`` writes the 'V' that stops it.
"""

from __future__ import annotations

import os

from overlayroot.core import syscalls

DEVICE = "/dev/watchdog"
WDIOC_SETTIMEOUT = 0xC0045706  # _IOWR('W', 6, int)


def arm(timeout: int, device: str = DEVICE) -> int:
    """Start the watchdog with ``timeout`` seconds; returns the timeout the driver accepted.
    (The stage loads the listed software watchdog, softdog, first when there is none.)"""
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        value = syscalls.new("int *")
        value[0] = timeout  # type: ignore[index]
        syscalls.ioctl_ptr(fd, WDIOC_SETTIMEOUT, value, device)
        os.write(fd, b"\0")  # a keep-alive, so the new timeout starts now
        return int(value[0])  # type: ignore[index]
    finally:
        os.close(fd)


def disarm(device: str = DEVICE) -> None:
    """Stop the watchdog (the 'magic close'). Raises OSError, e.g. when none is running."""
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"V")
    finally:
        os.close(fd)
