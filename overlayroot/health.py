"""``overlayroot bless``: run the health checks, then mark the booted deployment good.

``overlayroot-bless.service`` runs it once ``boot-complete.target`` is reached. The checks are
greenboot's idea: executables in ``/etc/overlayroot/check.d/required/`` and ``wanted/``, run in
name order, each judged by its exit status.

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

The boot state is saved before the watchdog is stopped: if stopping fails, the reset that
follows boots the same deployment, now known good, without counting.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from overlayroot import bootstate, target, watchdog
from overlayroot.errors import BootError

CHECK_DIR = "/etc/overlayroot/check.d"
KINDS = ("required", "wanted")
TAIL_LINES = 5
REBOOT = ("reboot",)  # systemd's, or busybox's: both ask init for an orderly reboot


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
            f": {tail}" if tail else "")


def tail_of(output: str) -> str:
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    return " / ".join(lines[-TAIL_LINES:])[-400:]


def checks(directory: str) -> list[tuple[str, str]]:
    """``(kind, path)`` of every check, required first, each kind in name order."""
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
            if not os.access(path, os.X_OK):
                print(f"overlayroot: warning: {path} is not executable: not run",
                      file=sys.stderr)
                continue
            found.append((kind, path))
    return found


def run_check(kind: str, path: str) -> Result:
    name = os.path.basename(path)
    try:
        done = subprocess.run([path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as e:
        return Result(kind, name, f"cannot run it: {e.strerror}", "")
    return Result(kind, name, done.returncode, done.stdout)


def run_bless(args: argparse.Namespace) -> int:
    where = target.find(args.sysroot)
    where.require_state()
    booted = where.require_booted("overlayroot bless")
    target.require_root("overlayroot bless", where)
    assert where.booted is not None
    trial = bool(where.booted.get("trial"))

    failed_required = None
    for kind, path in checks(CHECK_DIR):
        result = run_check(kind, path)
        if result.passed:
            print(f"overlayroot: health check {kind}/{result.name}: ok")
        elif kind == "wanted":
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
    where.record("blessed", booted)
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
        new = bootstate.mark_bad(state, booted, reason)
        fallback = bootstate.default(new)
        if fallback is None:
            raise BootError(
                f"{reason}; {booted} is not blessed, and not marked bad either: no other"
                " deployment could boot"
            )
        where.save(new)
    where.record("marked-bad", booted, reason=reason)
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
