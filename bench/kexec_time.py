"""Boot time of a deployment reached through a kernel switch (kexec) against the same deployment
booted directly under its own kernel, under QEMU.

What it measures
    One known-good deployment (the busybox test root, qemu.rootfs.make_test_root, deployed as
    erofs) that carries kernel B, Debian's 6.12 cloud kernel (qemu.kernel.second_cloud_kernel,
    or $OVERLAYROOT_KERNEL_B(_MODULES)), with our initramfs for B. N boots (default 5) each of:

    kexec   the machine starts kernel A (the harness's, Debian bookworm's 6.1) with our
            initramfs for A; the stage there finds that the deployment's kernel is another,
            hashes B's kernel and initramfs against the manifest, loads them with
            kexec_file_load, remounts the state read-only and starts B; B's stage boots the
            deployment. What every boot costs until ``bless`` promotes B to the boot pair;
    direct  the machine starts kernel B with our initramfs for B, as from the promoted boot
            pair: the same deployment, no switch.

    The figure is the wall-clock time from starting QEMU to the deployment init's uptime marker
    (``OVERLAYROOT-TEST uptime=``, its first action) on the console: the whole boot, firmware
    included (once in both). Guest clocks cannot span the switch whole: B's printk clock starts
    after the purgatory (which checks the sha256 of every loaded segment) and after B's
    decompressor, so the guest figure (kernel A's printk time at ``kexec_core: Starting new
    kernel`` plus the marker's uptime under B; for ``direct`` the marker's uptime) leaves those
    out, and is given for information, with the time our stage took under A (from ``Run /init``
    to the switch: hashing B's files, loading them, remounting the state). TCG runs guest clocks
    at host real time: a busy host lengthens every figure; the table says how busy it was.

How
    Images and the disk are built in a temporary directory once; every boot gets a fresh copy
    of the disk, the two configurations alternate, each boot waits (up to --wait-idle seconds)
    for other QEMU guests to finish, and QEMU is killed once the marker is out. A failed boot's
    console log is kept and its path printed.

    .venv/bin/python -m bench.kexec_time [--runs 5] [--json]

The table goes to stdout (or a JSON object with --json), progress to stderr. Exit status 1 when a
boot failed, 2 when nothing could be measured.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.boot_time import (
    RUN_INIT,
    Stats,
    harness_kernel,
    make_state,
    progress,
    run_boot,
)
from initrd.build import BuildConfig, Compression, build_initramfs
from qemu.accel import choose_accel
from qemu.kernel import Kernel, second_cloud_kernel, second_kernel_from_env
from qemu.machine import DEFAULT_FAILURES
from qemu.paths import cache_dir
from qemu.rootfs import add_kernel, make_test_root

STARTING = re.compile(r"\[\s*(\d+\.\d+)\] kexec_core: Starting new kernel")
CMDLINE = "root=LABEL=or-bench overlayroot.onfail=poweroff overlayroot.timeout=30 printk.time=1"
FAILURES = (*DEFAULT_FAILURES, "overlayroot: error:")
CONFIGS = ("kexec", "direct")


@dataclass
class Boot:
    config: str
    run: int
    ok: bool
    guest_seconds: float | None = None
    first_kernel_seconds: float | None = None
    """kexec: kernel A's printk time when it started B."""
    stage_a_seconds: float | None = None
    """kexec: kernel A's printk time from ``Run /init`` to the switch: our stage under A."""
    wall_seconds: float | None = None
    load1: float = 0.0
    other_qemu: int = 0
    busy_cpus: float | None = None
    log: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Setup:
    name: str
    kernel: Kernel
    initrd: Path


def boot_once(
    accel: str,
    setup: Setup,
    disk_image: Path,
    run: int,
    work: Path,
    logs: Path,
    *,
    timeout: float,
    idle_limit: float,
) -> Boot:
    done = run_boot(
        setup.kernel,
        setup.initrd,
        disk_image,
        work,
        logs / f"{setup.name}-{run}.log",
        cmdline=CMDLINE,
        failures=FAILURES,
        accel=accel,
        timeout=timeout,
        idle_limit=idle_limit,
    )
    boot = Boot(
        config=setup.name,
        run=run,
        ok=False,
        load1=done.load1,
        other_qemu=done.other_qemu,
        log=str(done.log),
        wall_seconds=done.wall_seconds,
        busy_cpus=done.busy_cpus,
        error=done.error,
    )
    if done.marker is None:
        return boot
    uptime = float(done.marker.group(1))
    switch = STARTING.search(done.console)
    if setup.name == "kexec":
        if switch is None:
            boot.error = "the stage did not switch kernels (no 'kexec_core: Starting new kernel')"
            return boot
        boot.first_kernel_seconds = float(switch.group(1))
        run_init = RUN_INIT.search(done.console)
        if run_init is not None:
            boot.stage_a_seconds = round(boot.first_kernel_seconds - float(run_init.group(1)), 3)
        boot.guest_seconds = round(boot.first_kernel_seconds + uptime, 3)
    else:
        if switch is not None:
            boot.error = "the direct boot switched kernels"
            return boot
        boot.guest_seconds = uptime
    boot.ok = True
    return boot


def run_benchmark(args: argparse.Namespace) -> dict[str, object]:
    kernel_a = harness_kernel()
    kernel_b = second_kernel_from_env() or second_cloud_kernel(cache_dir())
    if kernel_a.version == kernel_b.version:
        raise SystemExit(f"bench: both kernels are {kernel_a.version}: set OVERLAYROOT_KERNEL_B")
    accel = choose_accel(kernel_a)
    logs = cache_dir() / "bench-logs" / "kexec_time"
    logs.mkdir(parents=True, exist_ok=True)
    boots: list[Boot] = []
    with tempfile.TemporaryDirectory(prefix="bench-kexec-") as tmp:
        work = Path(tmp)
        images = {}
        for name, k in (("a", kernel_a), ("b", kernel_b)):
            progress(f"building our initramfs for {k.version}")
            images[name] = work / f"initrd-{name}.img"
            build_initramfs(
                BuildConfig(modules_dir=k.modules, output=images[name], compress=Compression.ZSTD)
            )
        root = make_test_root(work / "root", image="bench")
        add_kernel(root, kernel_b.vmlinuz, images["b"], kernel_b.version)
        progress("deploying the root with its kernel")
        disk = make_state(work, root, "kexec", known_good=True)
        setups = {
            "kexec": Setup("kexec", kernel_a, images["a"]),
            "direct": Setup("direct", kernel_b, images["b"]),
        }
        for run in range(1, args.runs + 1):
            for name in CONFIGS:
                progress(f"{name} boot {run}/{args.runs}")
                boot = boot_once(
                    accel,
                    setups[name],
                    disk,
                    run,
                    work,
                    logs,
                    timeout=args.timeout,
                    idle_limit=args.wait_idle,
                )
                if boot.ok and not args.keep_logs and boot.log:
                    Path(boot.log).unlink(missing_ok=True)
                    boot.log = None
                elif not boot.ok:
                    progress(f"{name} boot {run} failed: {boot.error} (log {boot.log})")
                boots.append(boot)
    stats: dict[str, object] = {}
    for name in CONFIGS:
        ok = [b for b in boots if b.config == name and b.ok]
        guest = Stats.of([b.guest_seconds for b in ok if b.guest_seconds is not None])
        wall = Stats.of([b.wall_seconds for b in ok if b.wall_seconds is not None])
        stage = Stats.of([b.stage_a_seconds for b in ok if b.stage_a_seconds is not None])
        stats[name] = {
            "guest": asdict(guest) if guest else None,
            "wall": asdict(wall) if wall else None,
            "stage_a": asdict(stage) if stage else None,
        }
    return {
        "kernel_a": kernel_a.version,
        "kernel_b": kernel_b.version,
        "accel": accel,
        "runs": args.runs,
        "stats": stats,
        "ratio": _ratio(stats),
        "boots": [asdict(b) for b in boots],
    }


def _median(stats: dict[str, object], name: str, what: str) -> float | None:
    entry = stats.get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get(what), dict):
        return None
    value = entry[what]["median"]
    return float(value) if isinstance(value, (int, float)) else None


def _ratio(stats: dict[str, object]) -> dict[str, float | None]:
    result: dict[str, float | None] = {}
    for what in ("guest", "wall"):
        a, b = _median(stats, "kexec", what), _median(stats, "direct", what)
        result[what] = round(a / b, 2) if a is not None and b else None
    return result


def table(report: dict[str, object]) -> str:
    stats = report["stats"]
    assert isinstance(stats, dict)
    lines = [
        f"kernel A {report['kernel_a']} -> kernel B {report['kernel_b']}"
        f" ({report['accel']}, {report['runs']} boots each)",
        "",
        "config   wall median (min-max)    guest median   our stage under A",
    ]
    for name in CONFIGS:
        entry = stats[name]
        guest, wall, stage = entry["guest"], entry["wall"], entry["stage_a"]
        cells = [
            f"{name:<8}",
            f"{wall['median']:6.2f} s ({wall['min']:.2f}-{wall['max']:.2f})" if wall else "   -  ",
            f"{guest['median']:6.2f} s" if guest else "   -  ",
            f"{stage['median']:6.2f} s" if stage else "   -",
        ]
        lines.append("   ".join(cells))
    ratio = report["ratio"]
    assert isinstance(ratio, dict)
    lines += ["", f"kexec / direct: wall {ratio['wall']}, guest {ratio['guest']}"]
    boots = report["boots"]
    assert isinstance(boots, list)
    lines += ["", "boot       guest s   wall s   load1  other QEMU  busy CPUs"]
    for b in boots:
        guest = f"{b['guest_seconds']:.2f}" if b["guest_seconds"] is not None else "FAILED"
        wall = f"{b['wall_seconds']:.2f}" if b["wall_seconds"] is not None else "-"
        lines.append(
            f"{b['config']:<6} {b['run']:>2}  {guest:>8}  {wall:>7}  {b['load1']:>5}"
            f"  {b['other_qemu']:>10}  {b['busy_cpus']}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kexec_time",
        description="Boot time of a deployment reached by a kernel switch (kexec from kernel A"
        " to the deployment's own kernel B) against the same deployment booted"
        " directly under B, as from the promoted boot pair; under QEMU.",
    )
    parser.add_argument("--runs", type=int, default=5, help="boots per configuration (5)")
    parser.add_argument("--json", action="store_true", help="print a JSON object, not a table")
    parser.add_argument(
        "--timeout",
        type=float,
        default=300,
        help="seconds a boot may take to reach the marker (300)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=120,
        help="seconds to wait before each boot for other QEMU guests to end (120)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the console logs of boots that worked too"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    print(json.dumps(report, indent=2) if args.json else table(report))
    boots = report["boots"]
    assert isinstance(boots, list)
    if not any(b["ok"] for b in boots):
        return 2
    return 1 if not all(b["ok"] for b in boots) else 0


if __name__ == "__main__":
    sys.exit(main())
