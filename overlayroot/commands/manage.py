"""The commands that change which deployment boots: ``rollback``, ``mark-bad``, ``set-default``,
``pin`` / ``unpin``, and ``gc``, which removes old deployments.

Each one takes the state lock, reads ``boot.json`` (recovering it if need be), applies one
function of :mod:`overlayroot.core.bootstate` and writes the result atomically. The policy lives in
``bootstate``; what is here is checking what the user asked for and saying what happened.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Callable

from overlayroot.commands import target
from overlayroot.core import bootstate, files
from overlayroot.core.bootstate import BootState
from overlayroot.core.errors import BootError
from overlayroot.core.layout import Manifest
from overlayroot.core.statefile import Event

Change = Callable[[target.Target, BootState], BootState]


def change(
    args: argparse.Namespace,
    command: str,
    apply: Change,
    event: tuple[str, str, dict[str, object]] | None = None,
) -> tuple[target.Target, BootState]:
    """Run ``apply`` on the boot state under the lock, save what it returns and add ``event``
    (name, deployment, fields) to the history, still under the lock."""
    where = target.find(args.sysroot)
    where.require_state()
    target.require_root(f"overlayroot {command}", where)
    with target.locked(where.layout):
        saved = where.save(apply(where, where.load()))
        if event is not None:
            name, deployment, fields = event
            where.record(name, deployment, **fields)
        return where, saved


def run_rollback(args: argparse.Namespace) -> int:
    said: list[str] = []

    def apply(where: target.Target, state: BootState) -> BootState:
        booted = where.booted_id
        goal = bootstate.rollback_target(state, booted)
        if goal is None:
            others = [k for k in state.entries if k != booted]
            raise BootError(
                f"no deployment to roll back to on {where.where}: none"
                + (f" besides the booted {booted}" if booted else "")
                + " is known good (blessed)"
                + (
                    f"; the others ({', '.join(sorted(others))}) were never blessed: boot one"
                    " with `overlayroot set-default ID`"
                    if others
                    else ""
                )
            )
        said.append(f"rolled back: {goal} boots next (the default was {bootstate.default(state)})")
        return bootstate.set_default(state, goal)

    change(args, "rollback", apply)
    print(*said)
    return 0


def run_mark_bad(args: argparse.Namespace) -> int:
    deployment_id, reason = args.id, args.reason

    def apply(where: target.Target, state: BootState) -> BootState:
        where.check_known(state, deployment_id)
        marked = bootstate.mark_bad_leaving_a_fallback(state, deployment_id, reason)
        if marked is None:
            raise BootError(
                f"marking {deployment_id} bad would leave nothing bootable on {where.where}:"
                " deploy or choose another deployment first"
            )
        return marked[0]

    _, state = change(
        args, "mark-bad", apply, (Event.MARKED_BAD, deployment_id, {"reason": reason})
    )
    print(f"marked {deployment_id} bad: {reason}; the default is {bootstate.default(state)}")
    return 0


def run_set_default(args: argparse.Namespace) -> int:
    deployment_id, once = args.id, args.once

    def apply(where: target.Target, state: BootState) -> BootState:
        where.check_known(state, deployment_id)
        if once:
            return bootstate.set_once(state, deployment_id)
        return bootstate.set_default(state, deployment_id)

    _, state = change(args, "set-default", apply)
    if once:
        print(f"{deployment_id} boots next time only; then {bootstate.default(state)} again")
    else:
        entry = state.entries[deployment_id]
        trial = "" if entry.successful else ", on trial (not known good yet)"
        print(f"{deployment_id} is the default{trial}")
    return 0


def run_pin(args: argparse.Namespace) -> int:
    return _pin(args, True)


def run_unpin(args: argparse.Namespace) -> int:
    return _pin(args, False)


def _pin(args: argparse.Namespace, pinned: bool) -> int:
    deployment_id = args.id

    def apply(where: target.Target, state: BootState) -> BootState:
        where.check_known(state, deployment_id)
        return bootstate.pin(state, deployment_id, pinned)

    change(args, "pin" if pinned else "unpin", apply)
    print(f"{deployment_id} is {'pinned: gc keeps it' if pinned else 'no longer pinned'}")
    return 0


# -- gc ----------------------------------------------------------------------------------------


def protected(state: BootState, booted: str | None) -> dict[str, str]:
    """The deployments gc must keep whatever their age, and why."""
    keep: dict[str, str] = {}
    for name, which in (
        ("booted", booted),
        ("default", bootstate.default(state)),
        ("rollback", bootstate.rollback_target(state, booted)),
        ("next boot", state.once),
    ):
        if which is not None and which in state.entries:
            keep.setdefault(which, name)
    for k, entry in state.entries.items():
        if entry.pinned:
            keep.setdefault(k, "pinned")
    return keep


def doomed(state: BootState, created: dict[str, str], booted: str | None, keep: int) -> list[str]:
    """What ``gc --keep N`` removes: beyond the newest ``keep``, none of the protected ones."""
    newest_first = sorted(state.entries, key=lambda k: (created.get(k, ""), k), reverse=True)
    safe = protected(state, booted)
    return [k for k in newest_first[keep:] if k not in safe]


def run_gc(args: argparse.Namespace) -> int:
    if args.keep < 1:
        raise BootError(f"--keep {args.keep}: keep at least 1 deployment")
    where = target.find(args.sysroot)
    where.require_state()
    if not args.dry_run:
        target.require_root("overlayroot gc", where)
    layout = where.layout
    with contextlib.nullcontext() if args.dry_run else target.locked(layout):
        state = where.load()
        created = {k: _created(where, k) for k in state.entries}
        going = doomed(state, created, where.booted_id, args.keep)
        safe = protected(state, where.booted_id)
        leftovers = _leftovers(where)
        for k in sorted(safe):
            print(f"keeping {k} ({safe[k]})")
        if args.dry_run:
            for k in going:
                print(f"would remove {k}")
            for path in leftovers:
                print(f"would remove {path}, left by an interrupted command")
            return 0
        # Out of sight first: renamed to a dot name, a deployment is no longer one (for the
        # boot stage and bootstate.sync), so a crash from here on cannot boot half of it.
        hidden: list[str] = []
        for k in going:
            away = os.path.join(layout.deployments, f".removing-{k}")
            try:
                os.rename(layout.deployment_dir(k), away)
            except OSError as e:
                raise BootError(
                    f"cannot remove {layout.deployment_dir(k)}: {e.strerror}"
                    f"{target.advice(e.errno)}"
                ) from None
            hidden.append(away)
        if going:
            files.fsync_dir(layout.deployments)
        new = state
        for k in going:
            new = new.without(k)
        where.save(new)
        for path in [*hidden, *leftovers]:
            shutil.rmtree(path, ignore_errors=True)
        for k in going:
            shutil.rmtree(layout.etc_dir(k), ignore_errors=True)
            print(f"removed {k}")
        for path in leftovers:
            print(f"removed {path}, left by an interrupted command")
    if not going:
        print(f"nothing to remove: {len(state.entries)} deployments, keeping {args.keep}")
    return 0


def _created(where: target.Target, deployment_id: str) -> str:
    try:
        manifest: Manifest = where.layout.read_manifest(deployment_id)
    except BootError as e:
        print(f"overlayroot: warning: {e}", file=sys.stderr)
        return ""
    return manifest.created


def _leftovers(where: target.Target) -> list[str]:
    """What interrupted deploys and gc runs left: their staging and removal directories. An
    ``/etc`` upper without a deployment is not one of them: a pipeline may have put it there
    for a deployment still to come."""
    layout = where.layout
    found = []
    for parent in (layout.deployments, layout.etc):
        try:
            names = os.listdir(parent)
        except FileNotFoundError:
            continue
        found += [
            os.path.join(parent, name)
            for name in sorted(names)
            if name.startswith((".staging-", ".removing-"))
        ]
    return found
