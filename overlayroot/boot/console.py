"""Messages for the person at the console."""

from __future__ import annotations

import time


class Console:
    """``overlayroot: …`` lines on the console; step times when ``overlayroot.debug`` is on.
    Also remembers what to do when the boot cannot go on (``overlayroot.onfail=``)."""

    def __init__(self) -> None:
        self.debug = False
        self.onfail = "reboot"  # until the command line says otherwise

    def say(self, message: str) -> None:
        print(f"overlayroot: {message}", flush=True)

    def step(self, message: str, at: float | None = None) -> None:
        """With ``overlayroot.debug``, ``message`` stamped with the seconds since the kernel
        started (comparable with its own ``[    4.038633]`` stamps): now, or ``at``, a time
        taken earlier with :func:`now`."""
        if self.debug:
            self.say(f"[{now() if at is None else at:8.3f}] {message}")

    def warn(self, message: str) -> None:
        self.say(f"warning: {message}")

    def error(self, message: str) -> None:
        for i, line in enumerate(message.splitlines() or [""]):
            self.say(("error: " if i == 0 else "       ") + line)


def now() -> float:
    """Seconds since the kernel started (``CLOCK_BOOTTIME``, which needs no /proc)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def describe_bug(e: BaseException) -> str:
    """Where an unexpected exception came from, without importing ``traceback`` (not frozen)."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(
            f"  {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno} in {tb.tb_frame.f_code.co_name}"
        )
        tb = tb.tb_next
    return "\n".join([f"internal error (a bug in overlayroot): {type(e).__name__}: {e}", *frames])
