"""Boot time of our initramfs against a busybox shell floor and Debian's dracut, under QEMU.

What it measures
    For each configuration, N boots (default 5) of the same kernel (the harness's:
    $OVERLAYROOT_KERNEL(_MODULES), else Debian's cloud kernel) and the same busybox test root
    (qemu.rootfs.make_test_root), whose /sbin/init prints ``OVERLAYROOT-TEST uptime=<s>``
    (first field of /proc/uptime) as its very first action:

    trial   our initramfs (initrd.build, zstd, default modules) booting that root deployed as
            erofs on a GPT state disk found by ``root=LABEL=``, on its first (trial) boot: the
            try is written, the image hashed, /var seeded, the watchdog armed;
    blessed the same, the deployment known good (``deploy --known-good``) and /var seeded
            already: a normal boot, with nothing written but the history line;
    floor   bench/floor/init.sh, a busybox shell /init doing the least the same root needs
            (insmod, findfs, mount the state, loop-mount the erofs lower, /etc overlay, /var and
            /home binds, switch_root; no checks, no counting): the floor to measure the stage
            against (the ratios trial/floor and blessed/floor);
    trial-baseline, blessed-baseline
            (with --baseline IMAGE) another initramfs of ours, built by another version (say,
            `overlayroot initrd build` run from main), booted on the same two disks: the
            before and after of a change, against the same floor, in one run;
    dracut  (with --dracut) Debian's dracut generic initramfs, the one the QEMU tests boot
            (``qemu.debian.dracut_initramfs``: ``dracut --no-hostonly --kver <kver> --kmoddir
            <modules> --add-drivers "virtio_blk virtio_pci" --zstd``, no host configuration,
            systemd inside) booting the same root as a plain ext4 root (``root=/dev/vda rw``).

    The figure is guest time from the kernel's ``[ t0] Run /init as init process`` console line
    (printk clock, ``printk.time=1``) to the deployment init's uptime marker: the time the
    initramfs spends, plus the kernel work it waits for. /proc/uptime has 10 ms steps and on
    this kernel under TCG reads about 0.05 s ahead of the printk clock; that bias is the same
    for every configuration.

Two clocks (--clock, both by default)
    host          TCG as usual: guest clocks run at host real time, so a busy host (or one
                  whose CPUs slow down) lengthens the figure as much as the wall clock: the
                  table says how busy the host was during each boot. Single boots of the same
                  image differ by up to 1.8 times; the per-round ratios (each boot against the
                  floor boot of the same round) vary less than the ratio of the medians.
    instructions  QEMU's instruction clock (``-icount shift=0``): guest time advances 1 ns per
                  guest instruction while the guest runs and at real time while it waits for
                  I/O or a timer. Runs repeat to about 10 ms, whatever the host does. It
                  counts the guest's own work only: not the emulator's translation of code
                  (under TCG most of a cold program's start, which hardware does not pay), not
                  caches or instructions per cycle. Closer to what a real CPU does with the
                  same code; still not a real machine.

    Also, per boot and for information only: wall-clock seconds from starting QEMU to the marker
    on the console, the 1-minute load average, how many other QEMU processes were running, and
    the host's busy CPUs during the boot (/proc/stat; our own QEMU keeps about one busy).

How
    Both images are built for that kernel in a temporary directory; every boot gets a fresh
    copy of its disk (so no boot sees what an earlier one wrote: /var seeding, an unclean ext4
    journal), boots of the two configurations alternate, and QEMU is killed once the marker is
    out. Before each boot it waits (up to --wait-idle seconds) for other QEMU guests to finish
    and the host to be nearly idle.
    A failed boot's console log is kept and its path printed; the others are deleted unless
    --keep-logs.

    .venv/bin/python -m bench.boot_time [--runs 5] [--clock host|instructions|both]
        [--baseline IMAGE] [--dracut] [--json]

The table goes to stdout (or a JSON object with --json), progress to stderr. Exit status 1 when a
boot failed, 2 when nothing could be measured.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from initrd.build import BuildConfig, BuildResult, Compression, build_initramfs
from initrd.cpio import Member, write_cpio
from initrd.kmod import decompress, resolve_modules
from overlayroot.commands.staging import deploy
from overlayroot.core import treecopy
from qemu import debian
from qemu.accel import choose_accel
from qemu.disks import copy_for_boot, make_raw_fs_disk, make_state_disk
from qemu.kernel import Kernel, debian_cloud_kernel, kernel_from_env
from qemu.machine import DEFAULT_FAILURES, BootFailure, Machine, Pattern
from qemu.paths import cache_dir
from qemu.rootfs import make_test_root

RUN_INIT = re.compile(r"\[\s*(\d+\.\d+)\] Run /init as init process")
UPTIME_MARKER = re.compile(r"OVERLAYROOT-TEST uptime=(\d+(?:\.\d+)?)")
STARTED = re.compile(r"overlayroot: \[\s*(\d+\.\d+)\] the interpreter started and imported")
STATE_LABEL = "or-bench"
STATE_UUID = "5e1f0a4c-7a2b-4c3d-9e8f-0000000be7c1"
ROOT_LABEL = "bench-root"
ROOT_UUID = "5e1f0a4c-7a2b-4c3d-9e8f-0000000be7c2"
DISK_MB = 96
CREATED = 1_700_000_000
SKIPCPIO = Path("/usr/lib/dracut/skipcpio")
IDLE_BUSY_CPUS = 0.5
OURS = "ours"
TRIAL = "trial"
BLESSED = "blessed"
FLOOR = "floor"
DRACUT = "dracut"
BASELINE = "baseline"
TRIAL_BASELINE = f"{TRIAL}-{BASELINE}"
BLESSED_BASELINE = f"{BLESSED}-{BASELINE}"
FLOOR_INIT = Path(__file__).resolve().parent / "floor" / "init.sh"
FLOOR_MODULES = ("virtio_pci", "virtio_blk", "loop", "erofs", "overlay")
FLOOR_LABEL = "floorstate"
FLOOR_UUID = "5e1f0a4c-7a2b-4c3d-9e8f-0000000be7c4"
BUSYBOX = Path("/bin/busybox")
HOST = "host"
INSTRUCTIONS = "instructions"
CLOCKS = (HOST, INSTRUCTIONS)
RATIO_PAIRS = (
    (TRIAL, FLOOR),
    (BLESSED, FLOOR),
    (TRIAL_BASELINE, FLOOR),
    (BLESSED_BASELINE, FLOOR),
    (TRIAL, TRIAL_BASELINE),
    (BLESSED, BLESSED_BASELINE),
    (TRIAL, DRACUT),
    (BLESSED, DRACUT),
)


@dataclass(frozen=True)
class Image:
    """An initramfs under test and what is known about it."""

    name: str
    path: Path
    size: int
    compression: str
    description: str
    build_seconds: float
    details: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    """One configuration to boot: an initramfs, a disk to copy per boot, a command line."""

    name: str
    image: Image
    disk: Path
    cmdline: str
    failures: tuple[Pattern, ...]


@dataclass
class Boot:
    setup: str
    run: int
    ok: bool
    clock: str = HOST
    """HOST or INSTRUCTIONS (``-icount shift=0``)."""
    run_init: float | None = None
    """printk timestamp of "Run /init as init process"."""
    marker_uptime: float | None = None
    """/proc/uptime as the deployment's init printed it."""
    initramfs_seconds: float | None = None
    """marker_uptime - run_init: the figure."""
    started_seconds: float | None = None
    """Ours: from "Run /init" to ``overlayroot.debug``'s first stamp, when the interpreter had
    started and imported the stage; the rest of the figure is the stage's work."""
    wall_seconds: float | None = None
    """QEMU start to the marker on the console, host time."""
    load1: float = 0.0
    other_qemu: int = 0
    busy_cpus: float | None = None
    """Host CPUs busy on average from QEMU start to the marker, ours included."""
    log: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Stats:
    median: float
    min: float
    max: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats | None:
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))


class BenchUnavailable(RuntimeError):
    """A reference image could not be built: the message says exactly why."""


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def harness_kernel() -> Kernel:
    """The kernel the boot tests use."""
    return kernel_from_env() or debian_cloud_kernel(cache_dir())


def build_ours(kernel: Kernel, work: Path) -> tuple[Image, BuildResult]:
    started = time.monotonic()
    result = build_initramfs(
        BuildConfig(
            modules_dir=kernel.modules, output=work / "overlayroot.img", compress=Compression.ZSTD
        )
    )
    image = Image(
        name=OURS,
        path=result.output,
        size=result.size,
        compression=result.compression,
        description="overlayroot (frozen Python stage)",
        build_seconds=round(time.monotonic() - started, 1),
        details={
            "frozen_modules": result.frozen_modules,
            "kernel_modules": len(result.kernel_modules),
            "libraries": result.libraries,
            "uncompressed_size": result.uncompressed_size,
            "python": result.python,
        },
    )
    return image, result


def build_dracut(kernel: Kernel, work: Path) -> Image:
    """Debian's dracut, generic (not host-only, its systemd initrd), for the harness kernel,
    into `work`: the plain dracut image the QEMU tests boot (`qemu.debian.dracut_initramfs`)."""
    if not (kernel.modules / "modules.dep").exists():
        raise BenchUnavailable(f"{kernel.modules} has no modules.dep: run depmod on it first")
    output = work / "dracut.img"
    started = time.monotonic()
    try:
        debian.dracut_initramfs(kernel, output, systemd=True, overlayroot=False)
    except debian.GeneratorFailed as e:
        raise BenchUnavailable(str(e)) from None
    seconds = round(time.monotonic() - started, 1)
    return Image(
        name=DRACUT,
        path=output,
        size=output.stat().st_size,
        compression=_compression_of(output),
        description=f"dracut {_package_version('dracut-core')} generic",
        build_seconds=seconds,
        details={"systemd": True, "built_by": "qemu.debian.dracut_initramfs"},
    )


def _compression_of(path: Path) -> str:
    """The compressor of the main archive, behind the uncompressed early cpio dracut may put
    first (its own skipcpio finds where the main one starts)."""
    head = path.read_bytes()[:6]
    if head.startswith(b"070701") and SKIPCPIO.exists():
        main = subprocess.run([str(SKIPCPIO), str(path)], capture_output=True, check=True)
        head = main.stdout[:6]
    magics = {
        b"\x28\xb5\x2f\xfd": "zstd",
        b"\x1f\x8b": "gzip",
        b"\xfd7zXZ": "xz",
        b"070701": "none",
    }
    return next((name for magic, name in magics.items() if head.startswith(magic)), "unknown")


def _package_version(package: str) -> str:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else "(version unknown)"


def make_state(work: Path, root: Path, name: str, *, known_good: bool) -> Path:
    """The test root as an erofs deployment on a GPT state disk, on trial or known good."""
    state = work / f"state-content-{name}"
    state.mkdir()
    deploy(state, root, deployment_id="bench", fmt="erofs", created=CREATED, known_good=known_good)
    if known_good:
        # A machine's every boot after its first: /var was seeded from the image already.
        var = state / "overlayroot" / "var"
        var.rmdir()
        treecopy.copy_tree(root / "var", var)
    return make_state_disk(
        work / f"state-{name}.img",
        state,
        size_mb=DISK_MB,
        fs_label=STATE_LABEL,
        fs_uuid=STATE_UUID,
        partlabel="overlayroot state",
        partuuid="c0ffee00-1234-4abc-8def-0000000be7c3",
    )


def build_floor(kernel: Kernel, work: Path, root: Path) -> tuple[Image, Path]:
    """The busybox floor: a gzip cpio of busybox, bench/floor/init.sh as /init and the modules
    it loads (dependencies first), and a plain ext4 disk with the root as deploy/root.erofs."""
    if not BUSYBOX.exists():
        raise BenchUnavailable(f"{BUSYBOX} is missing: apt-get install busybox-static")
    started = time.monotonic()
    modules = resolve_modules(kernel.modules, FLOOR_MODULES).modules
    members = [
        Member.directory(d) for d in ("bin", "dev", "proc", "sys", "run", "lib", "lib/modules")
    ]
    members += [
        Member.char_device("dev/console", 5, 1),
        Member.file("bin/busybox", BUSYBOX.read_bytes(), 0o755),
        Member.file("init", FLOOR_INIT.read_bytes(), 0o755),
        Member.file("modules.order", " ".join(m.name for m in modules).encode() + b"\n"),
        *(Member.file(f"lib/modules/{m.name}.ko", decompress(m.source)) for m in modules),
    ]
    raw = io.BytesIO()
    write_cpio(raw, members)
    image = work / "floor.img"
    image.write_bytes(gzip.compress(raw.getvalue(), compresslevel=9, mtime=0))
    content = work / "floor-content"
    (content / "deploy").mkdir(parents=True)
    subprocess.run(
        ["mkfs.erofs", "--quiet", str(content / "deploy/root.erofs"), str(root)],
        check=True,
        capture_output=True,
    )
    disk = make_raw_fs_disk(work / "floor.disk", content, DISK_MB, FLOOR_LABEL, FLOOR_UUID)
    return Image(
        name=FLOOR,
        path=image,
        size=image.stat().st_size,
        compression="gzip",
        description="busybox shell floor (bench/floor/init.sh)",
        build_seconds=round(time.monotonic() - started, 1),
        details={"kernel_modules": len(modules)},
    ), disk


def other_qemu_processes() -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        count += comm.startswith("qemu-system")
    return count


class CpuMeter:
    """Busy CPUs (in CPUs, not percent) of the whole host since the last reading."""

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]), idle  # without guest time, counted in user already

    def busy(self) -> float:
        total, idle = self._read()
        last_total, last_idle = self._last
        self._last = (total, idle)
        if total == last_total:
            return 0.0
        return (1 - (idle - last_idle) / (total - last_total)) * (os.cpu_count() or 1)


def wait_idle(limit: float) -> int:
    """Wait up to `limit` seconds for no other QEMU guest and under IDLE_BUSY_CPUS busy CPUs;
    return how many other QEMU processes still run."""
    deadline = time.monotonic() + limit
    meter = CpuMeter()
    said = False
    while True:
        time.sleep(2)
        others, busy = other_qemu_processes(), meter.busy()
        if (others == 0 and busy < IDLE_BUSY_CPUS) or time.monotonic() >= deadline:
            return others
        if not said:
            progress(f"host busy ({busy:.1f} CPUs, {others} other QEMU); waiting up to {limit:g} s")
            said = True


@dataclass
class Run:
    """One boot under a benchmark: how busy the host was as it began, and what came out."""

    load1: float
    other_qemu: int
    log: Path
    wall_seconds: float | None = None
    busy_cpus: float | None = None
    console: str = ""
    marker: re.Match[str] | None = None
    """The ``OVERLAYROOT-TEST uptime=`` line, when the boot reached it."""
    error: str | None = None


def run_boot(
    kernel: Kernel,
    initrd: Path,
    disk_image: Path,
    work: Path,
    log: Path,
    *,
    cmdline: str,
    failures: tuple[Pattern, ...],
    accel: str,
    timeout: float,
    idle_limit: float,
    icount: bool = False,
) -> Run:
    """Boot ``initrd`` on a fresh copy of ``disk_image`` (:func:`qemu.disks.copy_for_boot`)
    once the host is idle (up to ``idle_limit`` s), until the deployment's init prints its
    uptime marker; QEMU is killed then; ``icount``: on the instruction clock. What every boot
    benchmark measures from (bench.boot_time, bench.kexec_time)."""
    disk = work / f"{log.stem}-disk.img"
    copy_for_boot(disk_image, disk)
    others = wait_idle(idle_limit)
    run = Run(load1=round(os.getloadavg()[0], 2), other_qemu=others, log=log)
    machine = Machine(
        kernel, initrd, log_path=log, disks=[disk], cmdline=cmdline, accel=accel, icount=icount
    )
    meter = CpuMeter()
    started = time.monotonic()
    try:
        with machine:
            run.marker = machine.wait_for(UPTIME_MARKER, timeout, failure=failures)
            run.wall_seconds = round(time.monotonic() - started, 2)
            run.busy_cpus = round(meter.busy(), 2)
    except BootFailure as failure:
        run.error = failure.reason
    finally:
        disk.unlink(missing_ok=True)
    run.console = machine.console
    return run


def boot_once(
    kernel: Kernel, accel: str, clock: str, setup: Setup, run: int, work: Path, logs: Path,
    *, timeout: float, idle_limit: float,
) -> Boot:  # fmt: skip
    done = run_boot(
        kernel,
        setup.image.path,
        setup.disk,
        work,
        logs / f"{setup.name}-{clock}-{run}.log",
        cmdline=setup.cmdline,
        failures=setup.failures,
        accel=accel,
        timeout=timeout,
        idle_limit=idle_limit,
        icount=clock == INSTRUCTIONS,
    )
    boot = Boot(
        setup=setup.name,
        run=run,
        ok=False,
        clock=clock,
        load1=done.load1,
        other_qemu=done.other_qemu,
        log=str(done.log),
        wall_seconds=done.wall_seconds,
        busy_cpus=done.busy_cpus,
        error=done.error,
    )
    if done.marker is None:
        return boot
    run_init = RUN_INIT.search(done.console)
    if run_init is None:
        boot.error = "no 'Run /init as init process' line with a timestamp (printk.time=1?)"
        return boot
    boot.run_init = float(run_init.group(1))
    boot.marker_uptime = float(done.marker.group(1))
    boot.initramfs_seconds = round(boot.marker_uptime - boot.run_init, 3)
    started = STARTED.search(done.console)
    if started is not None:
        boot.started_seconds = round(float(started.group(1)) - boot.run_init, 3)
    boot.ok = True
    return boot


def setups(
    kernel: Kernel, work: Path, with_dracut: bool, baseline: Path | None = None
) -> tuple[list[Setup], BuildResult, str | None]:
    """The configurations (dracut's only when asked for, and left out with the reason when it
    cannot be built; the baseline's when given)."""
    progress(f"building our initramfs for {kernel.version} (zstd -19)")
    ours, result = build_ours(kernel, work)
    progress(f"  {ours.size} bytes, {result.frozen_modules} frozen modules")
    progress("making the test root and its erofs deployments, on trial and known good")
    root = make_test_root(work / "root", image="bench")
    # overlayroot.debug: the stamp of the interpreter's start (a few console lines more).
    ours_cmdline = (
        f"printk.time=1 root=LABEL={STATE_LABEL} overlayroot.onfail=poweroff"
        " overlayroot.timeout=30 overlayroot.debug"
    )
    ours_failures = (*DEFAULT_FAILURES, "overlayroot: error:")
    found: list[Setup] = [
        Setup(
            TRIAL,
            ours,
            make_state(work, root, TRIAL, known_good=False),
            ours_cmdline,
            ours_failures,
        ),
        Setup(
            BLESSED,
            ours,
            make_state(work, root, BLESSED, known_good=True),
            ours_cmdline,
            ours_failures,
        ),
    ]
    if baseline is not None:
        base = Image(
            name=BASELINE,
            path=baseline,
            size=baseline.stat().st_size,
            compression="-",
            description=f"baseline ({baseline})",
            build_seconds=0.0,
        )
        found += [
            Setup(f"{s.name}-{BASELINE}", base, s.disk, s.cmdline, s.failures) for s in list(found)
        ]
    progress("building the busybox floor and its disk")
    floor, floor_disk = build_floor(kernel, work, root)
    found.append(Setup(FLOOR, floor, floor_disk, "printk.time=1", DEFAULT_FAILURES))
    if not with_dracut:
        return found, result, None
    plain_disk = make_raw_fs_disk(work / "plain.img", root, DISK_MB, ROOT_LABEL, ROOT_UUID)
    progress(f"building dracut's generic initramfs for {kernel.version} (about a minute)")
    try:
        dracut = build_dracut(kernel, work)
    except BenchUnavailable as error:
        progress(f"  no reference: {error}")
        return found, result, str(error)
    progress(f"  {dracut.size} bytes ({dracut.compression}) in {dracut.build_seconds} s")
    found.append(
        Setup(DRACUT, dracut, plain_disk,
              "printk.time=1 root=/dev/vda rw rd.shell=0 rd.emergency=poweroff",
              (*DEFAULT_FAILURES, "Entering emergency mode", "You are in emergency mode")),
    )  # fmt: skip
    return found, result, None


def run_benchmark(args: argparse.Namespace) -> dict[str, object]:
    started = time.monotonic()
    load_start = os.getloadavg()
    kernel = harness_kernel()
    accel = choose_accel(kernel)
    clocks = list(CLOCKS) if args.clock == "both" else [args.clock]
    if accel != "tcg":
        progress(f"note: accel is {accel}, not tcg (OVERLAYROOT_QEMU_ACCEL=tcg forces TCG)")
        if INSTRUCTIONS in clocks:
            progress(f"note: no instruction clock under {accel} (TCG only); host clock only")
            clocks = [HOST]
    logs = cache_dir() / "bench-logs" / time.strftime("%Y%m%dT%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    boots: list[Boot] = []
    with tempfile.TemporaryDirectory(prefix="overlayroot-bench-") as tmp:
        work = Path(tmp)
        configs, ours_result, dracut_error = setups(kernel, work, args.dracut, args.baseline)
        for clock, run in [(c, r) for c in clocks for r in range(1, args.runs + 1)]:
            for setup in configs:
                which = f"[{setup.name}, {clock} clock, {run}/{args.runs}]"
                progress(f"{which} booting")
                boot = boot_once(
                    kernel,
                    accel,
                    clock,
                    setup,
                    run,
                    work,
                    logs,
                    timeout=args.timeout,
                    idle_limit=args.wait_idle,
                )
                boots.append(boot)
                if boot.ok:
                    progress(
                        f"{which} {boot.initramfs_seconds:.2f} s guest,"
                        f" {boot.wall_seconds:.1f} s wall, {boot.busy_cpus} CPUs busy,"
                        f" load {boot.load1}"
                    )
                else:
                    progress(f"{which} FAILED: {boot.error} (console log: {boot.log})")
    for boot in boots:
        if boot.ok and not args.keep_logs and boot.log:
            Path(boot.log).unlink(missing_ok=True)
            boot.log = None
    if not any(logs.iterdir()):
        logs.rmdir()
    return summarize(
        args,
        kernel,
        accel,
        clocks,
        configs,
        ours_result,
        dracut_error,
        boots,
        load_start,
        time.monotonic() - started,
    )


def summarize(
    args: argparse.Namespace, kernel: Kernel, accel: str, clocks: list[str],
    configs: list[Setup], ours: BuildResult, dracut_error: str | None, boots: list[Boot],
    load_start: tuple[float, float, float], seconds: float,
) -> dict[str, object]:  # fmt: skip
    stats: dict[str, dict[str, dict[str, object]]] = {}
    ratios: dict[str, dict[str, float | None]] = {}
    round_ratios: dict[str, dict[str, float | None]] = {}
    for clock in clocks:
        on_clock = [b for b in boots if b.clock == clock]
        stats[clock] = {
            s.name: setup_stats([b for b in on_clock if b.setup == s.name]) for s in configs
        }
        pairs = [(a, b) for a, b in RATIO_PAIRS if a in stats[clock] and b in stats[clock]]
        ratios[clock] = {f"{a}/{b}": ratio(stats[clock], a, b) for a, b in pairs}
        round_ratios[clock] = {f"{a}/{b}": round_ratio(on_clock, a, b) for a, b in pairs}
    return {
        "metric": "guest seconds from the kernel's 'Run /init as init process' (printk clock)"
        " to the deployment init's OVERLAYROOT-TEST uptime marker (/proc/uptime)",
        "kernel": kernel.version,
        "vmlinuz": str(kernel.vmlinuz),
        "accel": accel,
        "clocks": clocks,
        "runs": args.runs,
        "images": {
            s.name: {
                "path_kind": s.image.description,
                "size": s.image.size,
                "compression": s.image.compression,
                "build_seconds": s.image.build_seconds,
                "cmdline": s.cmdline,
                **s.image.details,
            }
            for s in configs
        },
        "frozen_modules": ours.frozen_modules,
        "dracut_error": dracut_error,
        "stats": stats,
        "ratios": ratios,
        "round_ratios": round_ratios,
        "boots": [asdict(b) for b in boots],
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "total_seconds": round(seconds, 1),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.boot_time", *sys.argv[1:]]),
    }


def setup_stats(mine: list[Boot]) -> dict[str, object]:
    """The figures of one configuration's boots on one clock."""
    guest = Stats.of([b.initramfs_seconds for b in mine if b.initramfs_seconds is not None])
    wall = Stats.of([b.wall_seconds for b in mine if b.wall_seconds is not None])
    started = Stats.of([b.started_seconds for b in mine if b.started_seconds is not None])
    rest = Stats.of(
        [
            b.initramfs_seconds - b.started_seconds
            for b in mine
            if b.initramfs_seconds is not None and b.started_seconds is not None
        ]
    )
    busy = [b.busy_cpus for b in mine if b.busy_cpus is not None]
    return {
        "guest_seconds": asdict(guest) if guest else None,
        "started_seconds": asdict(started) if started else None,
        "after_start_seconds": asdict(rest) if rest else None,
        "wall_seconds": asdict(wall) if wall else None,
        "boots": len(mine),
        "failed": sum(not b.ok for b in mine),
        "busy_cpus_median": statistics.median(busy) if busy else None,
    }


def round_ratio(boots: list[Boot], a: str, b: str) -> float | None:
    """The median over rounds of ``a``'s figure over ``b``'s in the same round (boots next to
    each other in time, so what the host does weighs on both alike); None without a round in
    which both booted."""
    figures = {(x.setup, x.run): x.initramfs_seconds for x in boots if x.ok}
    found = [
        first / second
        for run in sorted({x.run for x in boots})
        if (first := figures.get((a, run))) is not None
        and (second := figures.get((b, run)))  # neither None nor 0
    ]
    return round(statistics.median(found), 3) if found else None


def ratio(stats: dict[str, dict[str, object]], a: str, b: str) -> float | None:
    """The ratio of the guest-second medians of configurations ``a`` and ``b``."""
    first, second = stats[a].get("guest_seconds"), stats[b].get("guest_seconds")
    if isinstance(first, dict) and isinstance(second, dict) and second["median"]:
        return round(float(first["median"]) / float(second["median"]), 3)
    return None


def _mib(size: object) -> str:
    return f"{int(size) / 2**20:.2f} MiB" if isinstance(size, int) else "-"


def _stat_cells(value: object) -> str:
    if not isinstance(value, dict):
        return f"{'-':>7} {'-':>7} {'-':>7}"
    return f"{value['median']:7.2f} {value['min']:7.2f} {value['max']:7.2f}"


def table(report: dict[str, object]) -> str:
    images = report["images"]
    stats = report["stats"]
    assert isinstance(images, dict) and isinstance(stats, dict)
    lines = [
        f"boot time: kernel {report['kernel']}, accel {report['accel']}, "
        f"{report['runs']} boots per configuration and clock (alternating)",
        f"load average at start {report['loadavg_start']}, at end {report['loadavg_end']}",
        "",
        f"{'initramfs':<16} {'size':>10} {'bytes':>10}  {'comp.':<6} what",
    ]
    for name, image in images.items():
        what = str(image["path_kind"])
        if name in (TRIAL, BLESSED):
            what += (
                f", {image['frozen_modules']} frozen modules, "
                f"{image['kernel_modules']} kernel modules"
            )
        elif image.get("systemd"):
            what += ", systemd"
        lines.append(
            f"{name:<16} {_mib(image['size']):>10} {image['size']:>10}  "
            f"{image['compression']:<6} {what}"
        )
    if TRIAL in images and DRACUT in images:
        lines.append(
            f"size ratio ours/dracut: {images[TRIAL]['size'] / images[DRACUT]['size']:.3f}"
        )
    ratios, round_ratios = report["ratios"], report["round_ratios"]
    assert isinstance(ratios, dict) and isinstance(round_ratios, dict)
    for clock, on_clock in stats.items():
        lines += [
            "",
            f"{clock} clock: 'Run /init' -> deployment init, guest seconds"
            "    wall seconds (QEMU start -> marker)",
            f"{'':<16} {'median':>7} {'min':>7} {'max':>7} {'ok':>5}    "
            f"{'median':>7} {'min':>7} {'max':>7}   busy CPUs (median)",
        ]
        for name, entry in on_clock.items():
            ok = f"{entry['boots'] - entry['failed']}/{entry['boots']}"
            busy = entry["busy_cpus_median"]
            lines.append(
                f"{name:<16} {_stat_cells(entry['guest_seconds'])} {ok:>5}    "
                f"{_stat_cells(entry['wall_seconds'])}   "
                f"{'-' if busy is None else f'{busy:.2f}'}"
            )
        for name, value in ratios[clock].items():
            per_round = round_ratios[clock][name]
            lines.append(
                f"ratio {name} ({clock} clock): {'-' if value is None else value} of the"
                f" medians, {'-' if per_round is None else per_round} median of the rounds"
            )
        for name, entry in on_clock.items():
            started, rest = entry.get("started_seconds"), entry.get("after_start_seconds")
            if isinstance(started, dict) and isinstance(rest, dict):
                lines.append(
                    f"{name}: the interpreter's start and the stage's imports"
                    f" {started['median']:.2f} s, the stage's work after them"
                    f" {rest['median']:.2f} s (medians)"
                )
    if report["dracut_error"]:
        lines.append(f"no dracut reference: {report['dracut_error']}")
    lines += [
        "",
        f"{'boot':<16} {'clock':<12} {'run':>3} {'Run /init':>9} {'marker':>8} {'guest s':>8} "
        f"{'wall s':>7} {'busy':>5} {'load1':>6} {'qemu':>4}",
    ]
    boots = report["boots"]
    assert isinstance(boots, list)
    for boot in boots:
        if boot["ok"]:
            lines.append(
                f"{boot['setup']:<16} {boot['clock']:<12} {boot['run']:>3} "
                f"{boot['run_init']:>9.3f} "
                f"{boot['marker_uptime']:>8.2f} {boot['initramfs_seconds']:>8.3f} "
                f"{boot['wall_seconds']:>7.1f} {boot['busy_cpus']:>5.2f} "
                f"{boot['load1']:>6.2f} "
                f"{boot['other_qemu']:>4}"
            )
        else:
            lines.append(
                f"{boot['setup']:<16} {boot['clock']:<12} {boot['run']:>3} "
                f"FAILED: {boot['error']}; "
                f"console log {boot['log']}"
            )
    lines += [
        "",
        f"busy: host CPUs busy during the boot, our QEMU included (of "
        f"{os.cpu_count()}); load1: 1-minute load average and qemu: other QEMU",
        "processes, both when the boot started. On the host clock guest time runs at host",
        "real time, so a busy host lengthens guest seconds too; the instruction clock",
        "(-icount shift=0) counts 1 ns per guest instruction, whatever the host does, and",
        "not the emulator's translation. /proc/uptime reads ~0.05 s ahead of the printk",
        "clock (same bias for all).",
        f"total run time {report['total_seconds']} s",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.boot_time",
        description="Median initramfs boot time of our stage (trial and known-good boots)"
        " against a busybox shell floor (and dracut's, with --dracut) under QEMU.",
    )
    parser.add_argument("--runs", type=int, default=5, help="boots per configuration (5)")
    parser.add_argument("--json", action="store_true", help="print a JSON object, not a table")
    parser.add_argument(
        "--clock",
        choices=[*CLOCKS, "both"],
        default="both",
        help="guest clock to time on: host (TCG at host real time, noisy), instructions"
        " (-icount shift=0: 1 ns per guest instruction, repeatable; TCG only) or both (both)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds to wait for one boot's marker (300)"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=120,
        help="seconds to wait before each boot for other QEMU guests to end "
        "and the host to go idle (120)",
    )
    parser.add_argument(
        "--dracut",
        action="store_true",
        help="boot Debian's dracut generic initramfs too (about a minute to"
        " build, and the slowest boots)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="IMAGE",
        help="also boot this initramfs of ours (built by another version, e.g."
        " `overlayroot initrd build` from main) on the same disks, for the ratios"
        " before and after a change in one run",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the console logs of good boots too"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.baseline is not None and not args.baseline.is_file():
        parser.error(
            f"--baseline {args.baseline}: no such file; give an initramfs image built"
            " by `overlayroot initrd build`"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    print(json.dumps(report, indent=2) if args.json else table(report))
    boots = report["boots"]
    assert isinstance(boots, list)
    if not any(b["ok"] for b in boots):
        return 2
    return 1 if any(not b["ok"] for b in boots) else 0


if __name__ == "__main__":
    sys.exit(main())
