"""``overlayroot status`` and ``overlayroot history``: what the boot state and the boot history
say, for people (tables) and for programs (``--json``). Nothing here writes.

The bless is the step most often missing in the field (docs/design.md §1), so a booted deployment
that is on trial and not blessed yet is called out, with how many boots it has left.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from overlayroot.commands import bootpair, target
from overlayroot.core import bootstate, statefile
from overlayroot.core.bootstate import BootState
from overlayroot.core.errors import BootError
from overlayroot.core.layout import Manifest
from overlayroot.core.statefile import GONE_BAD, Event


def describe(
    state: BootState, booted: str | None, manifests: dict[str, dict[str, object]]
) -> list[dict[str, object]]:
    """One record per deployment, default first."""
    default = bootstate.default(state)
    rollback = bootstate.rollback_target(state, booted)
    ranked = bootstate.ranked(state)
    order = ranked + sorted(
        (k for k in state.entries if k not in ranked), key=lambda k: -state.entries[k].priority
    )
    records = []
    for k in order:
        e = state.entries[k]
        manifest = manifests.get(k, {})
        records.append(
            {
                "id": k,
                "booted": k == booted,
                "default": k == default,
                "rollback": k == rollback,
                "once": k == state.once,
                "pinned": e.pinned,
                "bootable": e.bootable,
                "priority": e.priority,
                "tries_left": e.tries_left,
                "successful": e.successful,
                "bad": bad_reason(e),
                "created": manifest.get("created"),
                "size": manifest.get("size"),
                "format": manifest.get("format"),
                "origin": manifest.get("origin"),
                "kernel": _kernel_version(manifest),
            }
        )
    return records


def _kernel_version(manifest: dict[str, object]) -> str | None:
    """The deployment's own kernel release; None when it boots under the running kernel."""
    kernel = manifest.get("kernel")
    return str(kernel.get("version")) if isinstance(kernel, dict) else None


def bad_reason(entry: bootstate.Entry) -> str | None:
    """Why a deployment does not boot by itself any more, if it does not."""
    if entry.bad:
        return entry.bad
    if not entry.successful and entry.tries_left == 0:
        return bootstate.USED_UP
    return None


def marks(record: dict[str, object]) -> str:
    names = [n for n in ("booted", "default", "rollback", "once", "pinned") if record[n]]
    return ",".join(names) or "-"


def tries(record: dict[str, object]) -> str:
    if record["successful"]:
        return "-"
    return "new" if record["tries_left"] is None else str(record["tries_left"])


def size(value: object) -> str:
    return f"{value / 2**20:.1f}M" if isinstance(value, int) else "?"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def booted_notes(
    booted: dict[str, object] | None, records: list[dict[str, object]], damaged: bool
) -> list[str]:
    """What this boot needs the reader to know: an unblessed trial, an uncounted boot, a
    fallback, a recovered state (unless the state is still ``damaged``: that is said anyway)."""
    if booted is None:
        return []
    notes = []
    deployment = booted["deployment"]
    record = next((r for r in records if r["id"] == deployment), None)
    degraded = booted.get("degraded")
    if degraded and record is not None and not record["successful"]:
        notes.append(
            f"DEGRADED BOOT: {deployment} was booted as a last resort, not counted and"
            f" without a watchdog: {degraded}. Fix what fails and run `overlayroot"
            " bless`, or deploy a working image"
        )
    elif record is not None and not record["successful"]:
        if booted.get("trial"):
            left = record["tries_left"]
            notes.append(
                f"the booted deployment {deployment} is on trial and NOT blessed: unless"
                f" `overlayroot bless` runs (overlayroot-bless.service does, after"
                f" boot-complete.target and multi-user.target), it falls back after {left} more"
                " boot(s)"
            )
        else:
            notes.append(
                f"the booted deployment {deployment} is not known good (never"
                " blessed), and this boot was not counted"
            )
    if booted.get("counted") is False:
        notes.append(f"this trial boot was NOT counted: {booted.get('count_error')}")
    failed = booted.get("failed")
    if isinstance(failed, list):
        for failure in failed:
            if isinstance(failure, dict):
                notes.append(
                    f"this boot fell back from {failure.get('deployment')}:"
                    f" {failure.get('reason', 'no reason recorded')}"
                )
    recovery = booted.get("recovery")
    if isinstance(recovery, list) and not damaged:
        for note in recovery:
            notes.append(f"this boot recovered the boot state: {note}")
    repairs = booted.get("repairs")
    if isinstance(repairs, list):
        for note in repairs:
            notes.append(f"this boot repaired the state filesystem: {note}")
    return notes


def run_status(args: argparse.Namespace) -> int:
    where = target.find(args.sysroot)
    where.require_state()
    state, recovery = statefile.load(where.layout)
    notes = [f"the boot state on disk is damaged: {note}" for note in recovery]
    manifests: dict[str, dict[str, object]] = {}
    read: dict[str, Manifest] = {}
    for k in state.entries:
        try:
            read[k] = where.layout.read_manifest(k)
            manifests[k] = dict(read[k].to_dict())
        except BootError as e:
            notes.append(str(e))
    records = describe(state, where.booted_id, manifests)
    pair_dir: Path | None = None
    pair = None
    try:
        pair_dir = bootpair.boot_dir(where, getattr(args, "boot_dir", None))
        pair = bootpair.describe(pair_dir, read)
    except BootError as e:
        notes.append(f"cannot tell what the boot pair holds: {e}")
    notes = [*booted_notes(where.booted, records, bool(recovery)), *notes]
    if args.json:
        print(
            json.dumps(
                {
                    "state": where.where,
                    "generation": state.generation,
                    "booted": where.booted_id,
                    "default": bootstate.default(state),
                    "rollback": bootstate.rollback_target(state, where.booted_id),
                    "once": state.once,
                    "deployments": records,
                    "boot_pair": pair,
                    "notes": notes,
                },
                indent=2,
            )
        )
        return 0
    if not records:
        print(f"no deployments on {where.where}")
    else:
        rows = [
            [
                "ID",
                "MARKS",
                "PRIO",
                "TRIES",
                "GOOD",
                "CREATED",
                "SIZE",
                "FORMAT",
                "KERNEL",
                "ORIGIN",
            ]
        ]
        for r in records:
            kernel = (
                str(r["kernel"]) if r["kernel"] else ("running kernel" if r["id"] in read else "?")
            )
            rows.append(
                [
                    str(r["id"]),
                    marks(r),
                    str(r["priority"]),
                    tries(r),
                    "yes" if r["successful"] else "no",
                    str(r["created"] or "?"),
                    size(r["size"]),
                    str(r["format"] or "?"),
                    kernel,
                    str(r["origin"] or ""),
                ]
            )
        print(table(rows))
        for r in records:
            if r["bad"]:
                print(f"{r['id']}: bad: {r['bad']}")
        if pair_dir is not None and (pair is not None or any(r["kernel"] for r in records)):
            print(bootpair.summary(pair, pair_dir))
    for note in notes:
        print(f"note: {note}")
    return 0


# -- history -----------------------------------------------------------------------------------


def with_outcomes(events: list[dict[str, object]]) -> list[dict[str, object]]:
    """The history with an ``outcome`` for each boot: what the events after it, up to the next
    boot, say became of it."""
    result = []
    boots = [i for i, e in enumerate(events) if e.get("event") == Event.BOOT]
    for i, event in enumerate(events):
        event = dict(event)
        if event.get("event") == Event.BOOT:
            following = [j for j in boots if j > i]
            end = following[0] if following else len(events)
            event["outcome"] = outcome(event, events[i + 1 : end], last=not following)
        result.append(event)
    return result


def outcome(boot: dict[str, object], after: list[dict[str, object]], *, last: bool) -> str:
    deployment = boot.get("deployment")
    for event in after:
        if event.get("deployment") != deployment:
            continue
        if event.get("event") == Event.BLESSED:
            return "blessed"
        if event.get("event") in GONE_BAD:
            return f"marked bad: {event.get('reason')}"
    if last:
        return "the latest boot, not blessed yet" if boot.get("trial") else "the latest boot"
    if boot.get("trial"):
        return "never blessed: crashed, hung, was reset or lost power before the next boot"
    return "not a trial (not tracked)"


def history_line(event: dict[str, object]) -> str:
    kind = event.get("event")
    head = f"{event.get('time', '?')}  {kind:<10}  {event.get('deployment') or '-'}"
    if kind == Event.BOOT:
        details = []
        if event.get("trial"):
            details.append(f"trial, {event.get('tries_left')} tries left after it")
            if event.get("counted") is False:
                details.append(f"NOT counted: {event.get('count_error')}")
        fallback = event.get("fallback_from")
        if isinstance(fallback, list):
            details.append(f"fell back from {', '.join(map(str, fallback))}")
        if event.get("watchdog"):
            details.append(f"watchdog {event.get('watchdog')} s")
        if event.get("degraded"):
            details.append(f"DEGRADED, a last resort: {event.get('degraded')}")
        if event.get("kexec"):
            details.append(f"under its own kernel {event.get('kernel')}, started by kexec")
        details.append(str(event["outcome"]))
        return f"{head}  " + "; ".join(details)
    if kind == "kexec":
        fallback = event.get("fallback_from")
        after = (
            f", falling back from {', '.join(map(str, fallback))}"
            if isinstance(fallback, list)
            else ""
        )
        return (
            f"{head}  switched from kernel {event.get('from_kernel')} to its own kernel"
            f" {event.get('kernel')}{after}"
        )
    if event.get("reason"):
        return f"{head}  {event.get('reason')}"
    return head


def run_history(args: argparse.Namespace) -> int:
    where = target.find(args.sysroot)
    where.require_state()
    events = with_outcomes(statefile.read_history(where.layout))
    if args.count is not None:
        if args.count < 1:
            raise BootError(f"-n {args.count}: give a positive number of entries")
        events = events[-args.count :]
    if args.json:
        print(json.dumps(events, indent=2, sort_keys=True))
    elif not events:
        print(f"no boot history on {where.where} yet")
    else:
        for event in events:
            print(history_line(event))
    return 0
