"""The state filesystem a command works on, what was booted from it, and the lock on it.

In a system booted by overlayroot, the stage left the state filesystem mounted at
``/run/overlayroot/state`` and said what it booted in ``/run/overlayroot/booted.json``; every
command works there by default. ``--sysroot DIR`` names a state filesystem mounted elsewhere (an
offline disk, an image being built); what was booted counts only when ``DIR`` is the same
directory the running system booted from.

Every change to the boot state happens under an exclusive ``flock`` on ``overlayroot/.lock``, so
two commands (a deploy and the bless unit, say) cannot interleave their read-modify-write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import sys
import time
from collections.abc import Iterator

from overlayroot.core import files, statefile
from overlayroot.core.bootstate import BootState
from overlayroot.core.errors import BootError
from overlayroot.core.layout import StateLayout
from overlayroot.core.safejson import parse_json

BOOTED = "/run/overlayroot/booted.json"
LOCK = ".lock"
LOCK_WAIT = 10.0  # seconds to wait for another command before giving up
BOOTED_LIMIT = 1 << 20


class Target:
    """A state filesystem, and ``booted.json`` when the running system booted from it."""

    __slots__ = ("booted", "layout")

    def __init__(self, layout: StateLayout, booted: dict[str, object] | None) -> None:
        self.layout = layout
        self.booted = booted

    @property
    def booted_id(self) -> str | None:
        return None if self.booted is None else str(self.booted["deployment"])

    @property
    def where(self) -> str:
        return str(self.layout.root)

    def require_state(self) -> None:
        if not self.layout.exists():
            raise BootError(
                f"{self.where} holds no overlayroot state (no {self.layout.deployments}):"
                " give the mounted state filesystem with --sysroot, or deploy one first"
            )

    def require_booted(self, command: str) -> str:
        if self.booted_id is None:
            raise BootError(
                f"{command} acts on the booted deployment, and {self.where} is not the state"
                f" filesystem this system booted from (no {BOOTED} naming it)"
            )
        return self.booted_id

    def check_known(self, state: BootState, deployment_id: str) -> str:
        if deployment_id not in state.entries:
            known = ", ".join(sorted(state.entries)) or "none"
            raise BootError(
                f"no deployment {deployment_id!r} on {self.where}; deployments there: {known}"
            )
        return deployment_id

    def load(self) -> BootState:
        """The boot state, recovered if need be; recovery notes go to stderr."""
        state, notes = statefile.load(self.layout)
        for note in notes:
            print(f"overlayroot: warning: {note}", file=sys.stderr)
        return state

    def save(self, state: BootState) -> BootState:
        try:
            return statefile.save(self.layout, state)
        except OSError as e:
            raise BootError(
                f"cannot write {self.layout.file(statefile.STATE)}: {e.strerror}; nothing was"
                f" changed{advice(e.errno)}"
            ) from None

    def record(self, event: str, deployment: str | None, **fields: object) -> None:
        """A line of the boot history; a failure is a warning, the state change stands. Call
        it holding the lock: trimming the history rewrites it."""
        try:
            statefile.append_history(self.layout, event, deployment, **fields)
        except OSError as e:
            print(
                f"overlayroot: warning: cannot add to the boot history"
                f" {self.layout.file(statefile.HISTORY)}: {e.strerror}",
                file=sys.stderr,
            )


def advice(
    code: int | None, *, again: str = "try again", root: str = "run as root", otherwise: str = ""
) -> str:
    """What to do about an ``OSError`` of errno ``code``, as ``"; …"`` to append to the
    message (``otherwise`` when there is no better advice, or nothing)."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"; free space on the state filesystem and {again}"
    if code in (errno.EACCES, errno.EPERM):
        return f"; {root}"
    if code == errno.EROFS:
        return "; remount the state filesystem read-write"
    return f"; {otherwise}" if otherwise else ""


def read_booted(path: str = BOOTED) -> dict[str, object] | None:
    try:
        data = parse_json(files.read_regular(path, BOOTED_LIMIT))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else str(e)
        raise BootError(f"cannot read {path}, which says what was booted: {why}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("deployment"), str)
        or not (isinstance(data.get("state"), str))
    ):
        raise BootError(f"{path} does not say which deployment was booted from where")
    return data


def find(sysroot: str | None) -> Target:
    """The state filesystem at ``sysroot``, else the one the running system booted from."""
    booted = read_booted(BOOTED)
    if sysroot is None:
        if booted is None:
            raise BootError("no state filesystem: not booted by overlayroot and no --sysroot given")
        return Target(StateLayout(str(booted["state"])), booted)
    if booted is not None and not _same_dir(sysroot, str(booted["state"])):
        booted = None
    return Target(StateLayout(sysroot), booted)


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def require_root(command: str, target: Target) -> None:
    if os.geteuid() != 0:
        raise BootError(f"{command} changes the boot state on {target.where}: run it as root")


@contextlib.contextmanager
def locked(layout: StateLayout, wait: float | None = None) -> Iterator[None]:
    """Hold ``overlayroot/.lock``; wait up to ``wait`` seconds (default LOCK_WAIT) for it.

    The file is root's alone (0600): ``flock`` works on a descriptor opened read-only, so a
    lock file others can open is one any user could hold to block every bless. It names its
    holder while held, and nothing once released."""
    path = layout.file(LOCK)
    try:
        if not files.regular_or_missing(path):
            moved = files.set_aside(path)  # a lock is a plain file, nothing else
            print(
                f"overlayroot: warning: {path} was not a regular file: set it aside as {moved}",
                file=sys.stderr,
            )
        fd = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600
        )
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)  # a lock file made before this rule
    except OSError as e:
        raise BootError(f"cannot open the lock {path}: {e.strerror}{advice(e.errno)}") from None
    try:
        deadline = time.monotonic() + (LOCK_WAIT if wait is None else wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BootError(
                        f"another overlayroot command ({_holder(fd)}) is changing the state on"
                        f" {layout.root}: wait for it to finish and try again"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {_command_line()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """Who holds the lock, as the file says; a holder that is gone is no answer."""
    text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    if not text:
        return "a process that did not say who it is"
    words = text.split()
    pid = words[1].rstrip(":") if len(words) > 1 and words[0] == "pid" else ""
    if pid.isascii() and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
        return f"a process that did not say who it is; the file still names pid {pid}, gone"
    return text


def _command_line() -> str:
    return " ".join(["overlayroot", *sys.argv[1:]]) if sys.argv else "overlayroot"
