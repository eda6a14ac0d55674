"""Power cuts that lose unflushed writes, at every flush point of overlayroot's operations
(issue 7, "Keep the promise").

What it does
    For each filesystem (ext4, btrfs, xfs), it records the scenario of qemu/powercut.py: three
    boots of one state disk under QEMU, the disk behind QEMU's ``blklogwrites`` driver, so that
    every write and flush the guest makes is logged: a trial boot (counter write, ``/var`` seeded,
    first-boot sha256), fsynced writes to ``/var`` and ``/home``, ``deploy`` of a ``dir`` tree
    and of an erofs image, ``rollback``, ``bless``, ``gc``, a torn ``boot.json`` and the boot
    that repairs it, ``set-default``, and the first boot of the image deployed from inside.

    Then, on the host, for every cut point of every log (``--every N``: every Nth, plus each
    operation's first and last): the disk as a power cut there leaves it (the pristine disk plus
    the logged writes up to that point; the rest lost, as a volatile disk cache loses them),
    held to the promises of qemu/cutcheck.py: the next boot reaches a good deployment, the boot
    state reads, no cut adds tries, fsynced data is intact, nothing half-staged is bootable,
    the next ``gc`` cleans up. A cut point is a flush (or FUA) entry, or halfway through the
    writes between two flushes ("torn").

    .venv/bin/python -m bench.powercut --fs ext4,btrfs,xfs --every 1 [--json] [--work DIR]

Needs root (loop devices, mounts in a private mount namespace), QEMU, and mkfs for each
filesystem (scripts/setup installs them). The table goes to stdout (a JSON object with --json),
progress to stderr. Exit status 0 when every cut kept every promise, 1 when some did not (each
broken promise is listed with its cut), 2 when the scenario could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from initrd.build import BuildConfig, build_initramfs
from qemu.accel import choose_accel
from qemu.cutcheck import Outcome, enter_private_mount_namespace, simulate
from qemu.kernel import debian_cloud_kernel, kernel_from_env
from qemu.logwrites import LogFormatError
from qemu.machine import BootFailure
from qemu.paths import cache_dir
from qemu.powercut import FILESYSTEMS, MODULES, ScenarioError, record_scenario, require_tools
from qemu.rootfs import build_command_payload


@dataclass
class Row:
    operation: str
    fs: str
    simulated: int = 0
    torn: int = 0
    survived: int = 0
    lost_fsynced_bytes: int = 0
    unbootable: int = 0
    broken: Counter[str] = field(default_factory=Counter)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.powercut",
        description="Simulate power cuts that lose unflushed writes at every flush point of"
        " overlayroot's boot and commands, on ext4, btrfs and xfs, and check each one.",
    )
    parser.add_argument(
        "--fs",
        default=",".join(FILESYSTEMS),
        help=f"comma-separated filesystems (default {','.join(FILESYSTEMS)})",
    )
    parser.add_argument(
        "--every",
        type=int,
        default=1,
        metavar="N",
        help="check every Nth cut point (default 1: all of them)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--work",
        type=Path,
        metavar="DIR",
        help="keep the disks, logs and console logs in DIR (default: a"
        " temporary directory, removed at the end)",
    )
    args = parser.parse_args(argv)
    args.filesystems = [fs for fs in args.fs.split(",") if fs]
    unknown = [fs for fs in args.filesystems if fs not in FILESYSTEMS]
    if unknown or not args.filesystems:
        parser.error(f"--fs {args.fs}: choose among {', '.join(FILESYSTEMS)}")
    if args.every < 1:
        parser.error(f"--every {args.every}: give 1 (every cut point) or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.powercut: run as root: it loop-mounts every cut's disk", file=sys.stderr)
        return 2
    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="powercut-", dir=cache_dir()))
    work.mkdir(parents=True, exist_ok=True)
    try:
        outcomes = run(args.filesystems, args.every, work)
    except (ScenarioError, BootFailure, LogFormatError) as e:
        print(f"bench.powercut: the scenario did not run: {e}", file=sys.stderr)
        return 2
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = tally(outcomes)
    seconds = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(to_json(rows, outcomes, args.every, seconds), indent=2))
    else:
        print(table(rows, outcomes, args.every, seconds))
    return 1 if any(o.violations for o in outcomes) else 0


def run(filesystems: list[str], every: int, work: Path) -> list[Outcome]:
    for fs in filesystems:
        require_tools(fs)
    kernel = kernel_from_env() or debian_cloud_kernel(cache_dir())
    accel = choose_accel(kernel)
    enter_private_mount_namespace()
    say(f"building the initramfs (with {', '.join(MODULES)}) and the frozen command")
    initrd = work / "initrd.img"
    build_initramfs(BuildConfig(modules_dir=kernel.modules, output=initrd, extra_modules=MODULES))
    payload = build_command_payload(work / "command")
    outcomes: list[Outcome] = []
    for fs in filesystems:
        fs_work = work / fs
        fs_work.mkdir(exist_ok=True)
        say(f"{fs}: recording the scenario's three boots under QEMU ({accel})")
        runs = record_scenario(fs_work, fs, kernel, initrd, accel, payload)
        count = [0, 0]

        def progress(outcome: Outcome, count: list[int] = count) -> None:
            count[0] += 1
            if outcome.violations:
                count[1] += 1
                say(f"  {outcome.cut.describe()}: {outcome.violations[0].message}")
            if count[0] % 25 == 0:
                say(f"{outcome.cut.run.fs}: {count[0]} cuts checked, {count[1]} broke a promise")

        outcomes += simulate(runs, fs_work, every, progress)
        say(f"{fs}: {count[0]} cuts checked, {count[1]} broke a promise")
    return outcomes


def tally(outcomes: list[Outcome]) -> list[Row]:
    rows: dict[tuple[str, str], Row] = {}
    for outcome in outcomes:
        cut = outcome.cut
        key = (cut.operation.name, cut.run.fs)
        row = rows.setdefault(key, Row(*key))
        row.simulated += 1
        row.torn += cut.torn
        row.survived += not outcome.violations
        row.lost_fsynced_bytes += outcome.lost_bytes
        row.unbootable += outcome.unbootable
        row.broken.update({str(v.kind) for v in outcome.violations})
    order = {name: n for n, name in enumerate(dict.fromkeys(k[0] for k in rows))}
    return sorted(rows.values(), key=lambda r: (order[r.operation], r.fs))


def table(rows: list[Row], outcomes: list[Outcome], every: int, seconds: float) -> str:
    header = (
        "operation",
        "fs",
        "cuts",
        "torn",
        "survived",
        "lost fsynced bytes",
        "unbootable",
        "promises broken (cuts)",
    )
    lines = [
        header,
        *[
            (
                r.operation,
                r.fs,
                str(r.simulated),
                str(r.torn),
                str(r.survived),
                str(r.lost_fsynced_bytes),
                str(r.unbootable),
                "; ".join(f"{kind} ({n})" for kind, n in sorted(r.broken.items())) or "-",
            )
            for r in rows
        ],
    ]
    total = Row("total", "")
    for r in rows:
        total.simulated += r.simulated
        total.torn += r.torn
        total.survived += r.survived
        total.lost_fsynced_bytes += r.lost_fsynced_bytes
        total.unbootable += r.unbootable
    lines.append(
        (
            "total",
            "",
            str(total.simulated),
            str(total.torn),
            str(total.survived),
            str(total.lost_fsynced_bytes),
            str(total.unbootable),
            "",
        )
    )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = [f"power cuts simulated (every {every} cut point; {seconds} s)", ""]
    for line in lines:
        text.append(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False))
            + "  "
            + line[-1]
        )
    findings = first_of_each(outcomes)
    if findings:
        text += ["", "promises broken (first cut of each kind per operation and filesystem):"]
        text += [f"- {o.cut.describe()}: [{v}] {message}" for o, v, message in findings]
    return "\n".join(text)


def first_of_each(outcomes: list[Outcome]) -> list[tuple[Outcome, str, str]]:
    seen = set()
    found = []
    for outcome in outcomes:
        for violation in outcome.violations:
            key = (outcome.cut.run.fs, outcome.cut.operation.name, violation.kind)
            if key not in seen:
                seen.add(key)
                found.append((outcome, str(violation.kind), violation.message))
    return found


def to_json(
    rows: list[Row], outcomes: list[Outcome], every: int, seconds: float
) -> dict[str, object]:
    return {
        "every": every,
        "seconds": seconds,
        "rows": [
            {
                "operation": r.operation,
                "fs": r.fs,
                "simulated": r.simulated,
                "torn": r.torn,
                "survived": r.survived,
                "lost_fsynced_bytes": r.lost_fsynced_bytes,
                "unbootable": r.unbootable,
                "broken": dict(r.broken),
            }
            for r in rows
        ],
        "violations": [
            {
                "fs": o.cut.run.fs,
                "run": o.cut.run.name,
                "operation": o.cut.operation.name,
                "entry": o.cut.index,
                "torn": o.cut.torn,
                "kind": str(v.kind),
                "message": v.message,
            }
            for o in outcomes
            for v in o.violations
        ],
    }


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
