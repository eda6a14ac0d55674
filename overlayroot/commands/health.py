"""``overlayroot bless``: run the health checks, then mark the booted deployment good.

``overlayroot-bless.service`` runs it once ``boot-complete.target`` and ``multi-user.target``
are reached. The checks are greenboot's idea: executables in
``/etc/overlayroot/check.d/required/`` and ``wanted/``, run in name order, each judged by its
exit status.

- Every required check passes: the booted deployment is marked successful (it boots without
  counting from now on, and is a rollback target), the trial boot's watchdog is stopped and the
  history records ``blessed``.
- A required check fails on a *trial* boot: the deployment is marked bad with the check's name
  and the tail of its output, the history records ``marked-bad``, and the machine reboots into
  the fallback (unless ``--no-reboot``). When nothing else could boot, it is left as it is:
  a machine that boots beats one that does not.
- A required check fails on a boot that was not a trial (a known-good deployment, or one chosen
  with ``overlayroot.deployment=``): nothing is marked and nothing reboots — marking it bad
  could leave a machine looping on a pinned deployment, or throw away the last good one for a
  failure the update did not cause. The command fails loudly instead.
- A wanted check that fails is a warning.

Checks run as root, so only root may change them: a check, or a directory on the way to it,
that is not owned by root or that its group or others may write is refused (not run; a refused
required check fails). Each check has a time limit — ``--check-timeout`` (default 60 s), or its
own ``overlayroot-timeout=SECONDS`` in its first lines — after which it and every process it
started are killed and it fails: a hung check must not hold the bless forever.

The boot state is saved before the watchdog is stopped: if stopping fails, the reset that
follows boots the same deployment, now known good, without counting.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import stat
import subprocess
import sys

from overlayroot.commands import target
from overlayroot.core import bootstate, watchdog
from overlayroot.core.errors import BootError
from overlayroot.core.statefile import Event

CHECK_DIR = "/etc/overlayroot/check.d"
KINDS = ("required", "wanted")
TAIL_LINES = 5
REBOOT = ("reboot",)  # systemd's, or busybox's: both ask init for an orderly reboot
DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 86400.0
TIMEOUT_KEY = b"overlayroot-timeout="
HEADER = 1024  # bytes of a check read for its own time limit


class Result:
    __slots__ = ("kind", "name", "output", "status")

    def __init__(self, kind: str, name: str, status: int | str, output: str) -> None:
        self.kind = kind
        self.name = name
        self.status = status  # exit status, or why it could not run
        self.output = output

    @property
    def passed(self) -> bool:
        return self.status == 0

    def describe(self) -> str:
        why = f"exit {self.status}" if isinstance(self.status, int) else self.status
        tail = tail_of(self.output)
        return f"health check {self.kind}/{self.name} failed ({why})" + (
            f": {tail}" if tail else ""
        )


class Check:
    __slots__ = ("kind", "path", "refused", "timeout")

    def __init__(self, kind: str, path: str, timeout: float, refused: str | None) -> None:
        self.kind = kind
        self.path = path
        self.timeout = timeout
        self.refused = refused  # why it must not run, or None


def tail_of(output: str) -> str:
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    return " / ".join(lines[-TAIL_LINES:])[-400:]


def untrusted(path: str, st: os.stat_result) -> str | None:
    """Why root must not run what ``path`` is, or None: not root's, or writable by others (a
    sticky directory such as /tmp excepted: others cannot rename or remove root's entries)."""
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if st.st_mode & 0o022 and not sticky:
        return f"{path} is writable by its group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def untrusted_path(path: str) -> str | None:
    """``untrusted`` for the file at ``path`` (symlinks followed) and every directory above
    it: whoever may change any of them may change what runs."""
    real = os.path.realpath(path)
    parts = real.split("/")
    for end in range(1, len(parts) + 1):
        where = "/".join(parts[:end]) or "/"
        try:
            problem = untrusted(where, os.stat(where))
        except OSError as e:
            return f"cannot check {where}: {e.strerror}"
        if problem:
            return problem
    return None


def time_limit(path: str, default: float) -> float:
    """The check's own ``overlayroot-timeout=SECONDS`` from its first lines, else ``default``."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
    except OSError:
        return default
    at = head.find(TIMEOUT_KEY)
    if at < 0:
        return default
    word = head[at + len(TIMEOUT_KEY) :].split(None, 1)[0:1]
    text = word[0].decode("ascii", "replace") if word else ""
    if text.isascii() and text.replace(".", "", 1).isdigit() and 0 < float(text) <= MAX_TIMEOUT:
        return float(text)
    raise BootError(
        f"{path}: overlayroot-timeout={text!r} is not a number of seconds (0 to {MAX_TIMEOUT:g}]"
    )


def checks(directory: str, default_timeout: float = DEFAULT_TIMEOUT) -> list[Check]:
    """Every check, required first, each kind in name order; a check root must not trust is
    listed as refused."""
    found = []
    for kind in KINDS:
        folder = os.path.join(directory, kind)
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise BootError(f"cannot list the health checks in {folder}: {e.strerror}") from None
        for name in names:
            path = os.path.join(folder, name)
            if name.startswith(".") or not os.path.isfile(path):
                continue
            refused = untrusted_path(path)
            if refused is None and not os.access(path, os.X_OK):
                print(f"overlayroot: warning: {path} is not executable: not run", file=sys.stderr)
                continue
            timeout = default_timeout if refused else time_limit(path, default_timeout)
            found.append(Check(kind, path, timeout, refused))
    return found


def run_check(check: Check) -> Result:
    name = os.path.basename(check.path)
    if check.refused:
        return Result(check.kind, name, f"refused, not run: {check.refused}", "")
    try:
        process = subprocess.Popen(
            [check.path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as e:
        return Result(check.kind, name, f"cannot run it: {e.strerror}", "")
    try:
        output, _ = process.communicate(timeout=check.timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the check and all it started
        output, _ = process.communicate()
        return Result(
            check.kind,
            name,
            f"timed out after {check.timeout:g} s: killed",
            output.decode(errors="replace"),
        )
    return Result(check.kind, name, process.returncode, output.decode(errors="replace"))


def run_bless(args: argparse.Namespace) -> int:
    where = target.find(args.sysroot)
    where.require_state()
    booted = where.require_booted("overlayroot bless")
    target.require_root("overlayroot bless", where)
    assert where.booted is not None
    trial = bool(where.booted.get("trial"))

    failed_required = None
    for check in checks(CHECK_DIR, args.check_timeout):
        result = run_check(check)
        if result.passed:
            print(f"overlayroot: health check {check.kind}/{result.name}: ok")
        elif check.kind == "wanted":
            print(f"overlayroot: warning: {result.describe()}", file=sys.stderr)
        else:
            failed_required = result
            break

    if failed_required is not None:
        return condemn(where, booted, trial, failed_required.describe(), args.no_reboot)

    with target.locked(where.layout):
        state = where.load()
        where.check_known(state, booted)
        if not state.entries[booted].successful:
            where.save(bootstate.bless(state, booted))
        where.record(Event.BLESSED, booted)
    print(f"overlayroot: blessed {booted}: it is known good")
    if where.booted.get("watchdog"):
        try:
            watchdog.disarm()
        except OSError as e:
            raise BootError(
                f"blessed {booted}, but cannot stop the trial boot's watchdog"
                f" ({e.strerror}: {e.filename}): the machine will be reset, and boots {booted}"
                " again, now as known good"
            ) from None
        print("overlayroot: stopped the trial boot's watchdog")
    from overlayroot.commands import bootpair

    try:
        promoted = bootpair.after_bless(where, booted, getattr(args, "boot_dir", None))
    except BootError as e:
        raise BootError(f"blessed {booted}, but the boot pair was not updated: {e}") from None
    if promoted is not None:
        print(f"overlayroot: {promoted}")
    return 0


def condemn(where: target.Target, booted: str, trial: bool, reason: str, no_reboot: bool) -> int:
    """A required check failed: mark the booted deployment bad and reboot into the fallback,
    when that is safe."""
    if not trial:
        raise BootError(
            f"{reason}; {booted} is not blessed. This boot was not a trial (the deployment is"
            " known good, or was chosen with overlayroot.deployment=), so it is not marked bad:"
            " fix it, or `overlayroot rollback`"
        )
    with target.locked(where.layout):
        state = where.load()
        where.check_known(state, booted)
        marked = bootstate.mark_bad_leaving_a_fallback(state, booted, reason)
        if marked is None:
            raise BootError(
                f"{reason}; {booted} is not blessed, and not marked bad either: no other"
                " deployment could boot"
            )
        new, fallback = marked
        where.save(new)
        where.record(Event.MARKED_BAD, booted, reason=reason)
    print(f"overlayroot: error: {reason}", file=sys.stderr)
    print(f"overlayroot: marked {booted} bad; {fallback} boots next", file=sys.stderr)
    if no_reboot:
        return 1
    print("overlayroot: rebooting into the fallback", file=sys.stderr)
    try:
        rebooted = subprocess.run(REBOOT, stdin=subprocess.DEVNULL).returncode
    except OSError as e:
        rebooted = -1
        print(f"overlayroot: cannot run reboot: {e.strerror}", file=sys.stderr)
    if rebooted != 0:
        raise BootError(f"could not reboot: reboot by hand to boot {fallback}")
    return 1
