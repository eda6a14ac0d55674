"""Time to multi-user.target of a real Debian under TCG, through each initramfs (issues 4, 10).

What it measures
    bookworm: the Debian 12 image of qemu.debian (systemd, minbase, the overlayroot command and
    overlayroot-bless.service, the kernel modules its systemd loads: autofs4 and loop), booted
    by the harness kernel:

    standalone       our initramfs (initrd.build, zstd), the root deployed as erofs on a state disk;
    dracut+overlayroot, dracut-shell+overlayroot
                     Debian's dracut (generic) with hooks/dracut, same disk: its systemd initrd,
                     and its shell /init (the systemd modules omitted);
    initramfs-tools+overlayroot
                     Debian's initramfs-tools (MODULES=most) with hooks/initramfs-tools;
    mkinitcpio+overlayroot, mkinitcpio-systemd+overlayroot
                     the real mkinitcpio 41 (qemu.mkinitcpio) with hooks/mkinitcpio, its busybox
                     /init (with ``init=/lib/systemd/systemd``: docs/integrations.md) and its
                     systemd hook, same disk; left out, with a note, where its tarball is not;
    dracut, dracut-shell, initramfs-tools
                     the same generators without our hook, the root as an ordinary ext4 root
                     (no overlay, ``rw``): the baselines, and what our hook costs on each.
                     ``dracut`` (systemd initrd) is the reference of the ratio columns.

    trixie: the Debian 13 image of qemu.trixie, booted by its own 6.12 kernel:

    standalone, initramfs-tools+overlayroot
                     the two images built inside it by its own Python 3.13 (qemu.trixie);
    dracut, dracut-shell, mkinitcpio, mkinitcpio-systemd (+overlayroot)
                     the host's generators (Debian 12's dracut, mkinitcpio 41) for that kernel,
                     with our hook, and dracut's two without (the root as an ordinary ext4
                     root): ``dracut`` is the baseline of the ratios, each plain one that of its
                     generator's hook x.

    Each boot is split, in guest seconds since the kernel started: *kernel* up to its
    ``Run /init as init process`` line, *initramfs* from there to the real init's start
    (systemd's ``UserspaceTimestampMonotonic`` of the booted system), *userspace* from there to
    ``multi-user.target`` (its ``ActiveEnterTimestampMonotonic``); the image's report unit prints
    the timestamps. ``first`` boots get a fresh copy of the disk each (machine id generated,
    /var seeded, a trial boot whose image digest is checked); ``later`` boots a copy of the disk
    as one first boot left it (blessed: no trial, no digest, no watchdog), which is every boot
    of a machine after its deployment's first. Configurations alternate within a run. TCG guest
    clocks run at host real time: a busy host lengthens every figure; compare ratios of one run.
    Each boot records the host's 1-minute load and how many other QEMU guests ran beside it.
    ``--clock instructions`` boots on QEMU's instruction clock instead (``-icount shift=0``:
    1 ns per guest instruction, real time while the guest waits; see bench.boot_time): figures
    that repeat whatever the host does, without the emulator's translation cost, at about twice
    the wall time per boot.

    .venv/bin/python -m bench.integrations [--suites bookworm,trixie] [--boots first,later]
        [--only NAME,...] [--runs 3] [--clock host|instructions] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench.boot_time import CLOCKS, HOST, INSTRUCTIONS, other_qemu_processes
from initrd.build import BuildConfig, Compression, build_initramfs
from overlayroot.commands.staging import deploy
from qemu import debian, mkinitcpio, trixie
from qemu.accel import choose_accel
from qemu.disks import copy_for_boot, make_raw_fs_disk, make_state_disk
from qemu.kernel import Kernel, debian_cloud_kernel, kernel_from_env
from qemu.machine import BootFailure, Machine
from qemu.paths import cache_dir
from qemu.rootfs import build_command_payload

STATE_LABEL = "or-bench"
ROOT_LABEL = "bench-root"
FAILURES = (
    "Kernel panic - not syncing",
    "overlayroot: error:",
    "Entering emergency mode",
    "Traceback (most recent call last)",
)
RUN_INIT = re.compile(r"\[\s*(\d+\.\d+)\] Run /init as init process")
SUITES = ("bookworm", "trixie")
BOOTS = ("first", "later")
PHASES = ("kernel_s", "initramfs_s", "userspace_s", "multi_user_s")
BASELINE = "dracut"


@dataclass(frozen=True)
class Setup:
    suite: str
    name: str
    kernel: Kernel
    initrd: Path
    disk: Path
    cmdline: str

    @property
    def label(self) -> str:
        return f"{self.suite}/{self.name}"


class BenchUnavailable(RuntimeError):
    """The benchmark cannot run as asked here: the message says why."""


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


Build = Callable[[Path], Path]


def bookworm_setups(
    kernel: Kernel, root: Path, work: Path, only: Sequence[str] = ()
) -> list[Setup]:
    progress("bookworm: building the state disk and the ordinary root disk")
    state, plain = suite_disks("bookworm", root, work, "", size_mb=640, serial=1)
    images: list[tuple[str, Build]] = [
        ("standalone", lambda out: _standalone(kernel, out)),
        *dracut_images(kernel),
        ("initramfs-tools+overlayroot", lambda out: debian.initramfs_tools_initramfs(kernel, out)),
        (
            "initramfs-tools",
            lambda out: debian.initramfs_tools_initramfs(kernel, out, overlayroot=False),
        ),
        *mkinitcpio_images(kernel),
    ]
    return built_setups("bookworm", kernel, images, work, "", state, plain, only)


def wanted(suite: str, name: str, only: Sequence[str]) -> bool:
    """Whether ``--only`` (names, or suite/name) keeps this configuration."""
    return not only or name in only or f"{suite}/{name}" in only


def suite_disks(
    suite: str, root: Path, work: Path, prefix: str, *, size_mb: int, serial: int
) -> tuple[Path, Path]:
    """A suite's state disk (``root`` deployed as erofs, the deployment named after the suite)
    and its ordinary root disk (``root`` as a plain ext4 filesystem), in ``work`` with file
    names starting with ``prefix``; ``serial`` makes their UUIDs (the state's, the root's the
    next number)."""
    content = work / f"{prefix}state-content"
    content.mkdir()
    deploy(content, root, deployment_id=suite, fmt="erofs", created=1_700_000_000)
    state = make_state_disk(
        work / f"{prefix}state.img",
        content,
        size_mb=size_mb,
        fs_label=STATE_LABEL,
        fs_uuid=f"5e1f0a4c-7a2b-4c3d-9e8f-0000000be7d{serial}",
        partlabel="overlayroot state",
        partuuid=f"c0ffee00-1234-4abc-8def-0000000be7d{serial}",
    )
    plain = make_raw_fs_disk(
        work / f"{prefix}root.img",
        root,
        size_mb,
        ROOT_LABEL,
        f"5e1f0a4c-7a2b-4c3d-9e8f-0000000be7d{serial + 1}",
    )
    return state, plain


def built_setups(
    suite: str,
    kernel: Kernel,
    images: Sequence[tuple[str, Build]],
    work: Path,
    prefix: str,
    state: Path,
    plain: Path,
    only: Sequence[str],
) -> list[Setup]:
    """Build the wanted ``images`` for ``kernel`` (a mkinitcpio that cannot run is left out,
    saying why) and boot each on its disk: ours (the standalone image, a generator with our
    hook) on the ``state`` disk, the others on the ``plain`` root disk."""
    result = []
    for name, build in images:
        if not wanted(suite, name, only):
            continue
        progress(f"{suite}: building the {name} initramfs for {kernel.version}")
        try:
            initrd = build(work / f"{prefix}{name}.img")
        except mkinitcpio.MkinitcpioUnavailable as e:
            progress(f"left out {suite}/{name}: {e}")
            continue
        ours = name == "standalone" or name.endswith("+overlayroot")
        cmdline = root_cmdline(name, ours)
        if name.startswith("initramfs-tools"):
            cmdline += " panic=-1"  # its failure path is a shell, not a panic: reboot instead
        result.append(Setup(suite, name, kernel, initrd, state if ours else plain, cmdline))
    return result


def trixie_setups(work: Path, only: Sequence[str] = ()) -> list[Setup]:
    """The trixie image's own kernel and the images built inside it, and plain dracut."""
    progress("trixie: building (or finding) the image, then its disks")
    image = trixie.trixie_image()
    root = trixie.deployment_root(image, work / "trixie" / "root")
    state, plain = suite_disks("trixie", root, work, "trixie-", size_mb=768, serial=3)
    on_state = f"root=LABEL={STATE_LABEL} ro"
    found = [
        Setup("trixie", "standalone", image.kernel, image.standalone, state, on_state),
        Setup(
            "trixie",
            "initramfs-tools+overlayroot",
            image.kernel,
            image.initramfs_tools,
            state,
            f"{on_state} panic=-1",
        ),
    ]
    # The host's generators (Debian 12's dracut, and mkinitcpio 41) for the trixie kernel, with
    # our hook and without: the pairs of the hook x column. Not the host's initramfs-tools: it
    # wants the kernel's /boot/config, which the image does not keep.
    host_built = [*dracut_images(image.kernel), *mkinitcpio_images(image.kernel)]
    found += built_setups("trixie", image.kernel, host_built, work, "trixie-", state, plain, only)
    return [s for s in found if wanted("trixie", s.name, only)]


def dracut_images(kernel: Kernel) -> list[tuple[str, Build]]:
    """The host's dracut for ``kernel``, both modes, with our module and without."""
    return [
        ("dracut+overlayroot", lambda out: debian.dracut_initramfs(kernel, out, systemd=True)),
        (
            "dracut",
            lambda out: debian.dracut_initramfs(kernel, out, systemd=True, overlayroot=False),
        ),
        (
            "dracut-shell+overlayroot",
            lambda out: debian.dracut_initramfs(kernel, out, systemd=False),
        ),
        (
            "dracut-shell",
            lambda out: debian.dracut_initramfs(kernel, out, systemd=False, overlayroot=False),
        ),
    ]


def mkinitcpio_images(kernel: Kernel) -> list[tuple[str, Build]]:
    """mkinitcpio 41 for ``kernel`` with our hooks, busybox and systemd (no plain one)."""
    return [
        (
            "mkinitcpio+overlayroot",
            lambda out: mkinitcpio.mkinitcpio_initramfs(kernel, out, mkinitcpio.Variant.BUSYBOX),
        ),
        (
            "mkinitcpio-systemd+overlayroot",
            lambda out: mkinitcpio.mkinitcpio_initramfs(kernel, out, mkinitcpio.Variant.SYSTEMD),
        ),
    ]


def root_cmdline(name: str, ours: bool) -> str:
    """root= for a configuration: the state filesystem for ours, the ordinary root otherwise;
    mkinitcpio's busybox /init is told where systemd is."""
    if not ours:
        return f"root=LABEL={ROOT_LABEL} rw"
    if name == "mkinitcpio+overlayroot":
        return f"root=LABEL={STATE_LABEL} ro init=/lib/systemd/systemd"
    return f"root=LABEL={STATE_LABEL} ro"


def _standalone(kernel: Kernel, output: Path) -> Path:
    build_initramfs(
        BuildConfig(modules_dir=kernel.modules, output=output, compress=Compression.ZSTD)
    )
    return output


def boot_once(
    accel: str,
    icount: bool,
    setup: Setup,
    source: Path,
    work: Path,
    name: str,
    timeout: float,
    keep_disk: Path | None = None,
    analysis: list[str] | None = None,
) -> dict[str, float]:
    """One boot of a fresh copy of ``source`` (:func:`qemu.disks.copy_for_boot`): its phases in
    guest seconds. ``keep_disk``: keep the disk as the boot left it there (the base of the later
    boots). ``analysis``: a list the guest's analysis lines are added to
    (:func:`analysis_lines`; the guest writes them when the command line has
    ``test.analyze=1``, after the boot's figures are taken)."""
    disk = work / f"boot-{name}.img"
    copy_for_boot(source, disk)
    log = work / "logs" / f"{name}.log"
    machine = Machine(
        setup.kernel,
        setup.initrd,
        log_path=log,
        disks=[disk],
        cmdline=setup.cmdline,
        accel=accel,
        icount=icount,
    )
    others = other_qemu_processes()
    try:
        with machine:
            machine.wait_for("OVERLAYROOT-TEST done", timeout, failure=FAILURES)
            others = max(others, other_qemu_processes() - 1)  # not this boot's own
            # The disk is kept only from a clean shutdown: a cut one is no machine's state.
            if keep_disk is not None:
                machine.wait_exit(timeout)
        markers = machine.markers()
        if keep_disk is not None:
            disk.rename(keep_disk)
    finally:
        disk.unlink(missing_ok=True)
    if markers.get("failed"):
        raise BootFailure(f"failed units: {markers['failed']}", log, machine.console)
    if analysis is not None:
        analysis.extend(analysis_lines(machine.console))
    return {
        **phases(markers, machine.console, log),
        "load_1m": os.getloadavg()[0],
        "other_qemu": float(others),
    }


ANALYSIS = re.compile(r"^overlayroot-test-(blame|bless): (.*?)\r?$", re.MULTILINE)


def analysis_lines(console: str) -> list[str]:
    """The guest's analysis (qemu/guest/debian-report.sh, ``test.analyze=1``): each unit's
    activation time (``blame:``) and the bless's journal (``bless:``)."""
    return [f"{m.group(1)}: {m.group(2)}" for m in ANALYSIS.finditer(console)]


def keep_log(log: Path) -> Path:
    """A failed boot's console log, moved out of the work directory (removed at the end) to
    .cache/bench-logs."""
    logs = cache_dir() / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    kept = logs / f"integrations-{time.strftime('%Y%m%d-%H%M%S')}-{log.name}"
    try:
        shutil.copyfile(log, kept)
    except OSError:
        return log
    return kept


def phases(markers: dict[str, str], console: str, log: Path) -> dict[str, float]:
    """The split of one boot; BootFailure when the console lacks what it needs."""
    run_init = RUN_INIT.search(console)
    if run_init is None:
        raise BootFailure("no 'Run /init as init process' line with a timestamp", log, console)
    kernel = float(run_init.group(1))
    userspace = int(markers["userspace_us"]) / 1e6
    multi_user = int(markers["multi_user_us"]) / 1e6
    return {
        "kernel_s": kernel,
        "initramfs_s": userspace - kernel,
        "userspace_s": multi_user - userspace,
        "multi_user_s": multi_user,
    }


def run_benchmark(args: argparse.Namespace) -> dict[str, object]:
    kernel = kernel_from_env() or debian_cloud_kernel(cache_dir())
    accel = choose_accel(kernel)
    if args.clock == INSTRUCTIONS and accel != "tcg":
        raise BenchUnavailable(f"the instruction clock needs TCG; the accel here is {accel}")
    icount = args.clock == INSTRUCTIONS
    work = Path(tempfile.mkdtemp(prefix="bench-integrations.", dir=cache_dir()))
    try:
        configs: list[Setup] = []
        if "bookworm" in args.suites:
            progress("bookworm: building the Debian image")
            command = build_command_payload(work / "overlayroot-command")
            root = debian.debian_image(kernel, work / "debian" / "root", command)
            configs += bookworm_setups(kernel, root, work, args.only)
        if "trixie" in args.suites:
            configs += trixie_setups(work, args.only)
        extra = " ".join(filter(None, (args.append, "test.analyze=1" if args.analyze else "")))
        if extra:
            configs = [replace(s, cmdline=f"{s.cmdline} {extra}") for s in configs]
        times: dict[tuple[str, str], list[dict[str, float]]] = {
            (s.label, boot): [] for s in configs for boot in BOOTS
        }  # the report shows the kinds asked for; a prime boot is a first boot either way
        failed: dict[str, str] = {}  # label -> why and where its console log is
        analyses: dict[str, list[str]] = {}  # label/boot -> the last such boot's analysis

        def attempt(
            setup: Setup, source: Path, boot: str, name: str, keep: Path | None = None
        ) -> bool:
            """One boot; a failure drops the configuration (said, its log kept), not the run."""
            analysis: list[str] | None = [] if args.analyze else None
            try:
                split = boot_once(
                    accel, icount, setup, source, work, name, args.timeout, keep, analysis
                )
            except BootFailure as e:
                kept = keep_log(e.log_path)
                failed[setup.label] = f"{e.reason} (console log: {kept})"
                progress(f"{setup.label}: boot {name} FAILED, left out: {failed[setup.label]}")
                return False
            done = times[(setup.label, boot)]
            done.append(split)
            if analysis is not None:
                analyses[f"{setup.label}/{boot}"] = analysis
            progress(
                f"{setup.label} {boot} boot {len(done)}"
                + (" (its disk kept for the later boots)" if keep is not None else "")
                + ": "
                + ", ".join(f"{k.removesuffix('_s')} {split[k]:.1f}" for k in PHASES)
                + f" (load {split['load_1m']:.1f}, {split['other_qemu']:g} other QEMU)"
            )
            return True

        later_disks: dict[str, Path] = {}
        if "later" in args.boots:
            # One first boot each leaves the disk blessed (and its machine id and /var made).
            for setup in configs:
                later = work / f"later-{setup.label.replace('/', '-')}.img"
                name = f"{setup.label.replace('/', '-')}-first-prime"
                if attempt(setup, setup.disk, "first", name, keep=later):
                    later_disks[setup.label] = later
        for run in range(args.runs):
            for boot in args.boots:
                for setup in configs:
                    if setup.label in failed or len(times[(setup.label, boot)]) >= args.runs:
                        continue
                    source = later_disks[setup.label] if boot == "later" else setup.disk
                    attempt(setup, source, boot, f"{setup.label.replace('/', '-')}-{boot}-{run}")
        configs = [s for s in configs if s.label not in failed]
        return {
            "accel": accel,
            "clock": args.clock,
            "runs": args.runs,
            "configurations": [
                {
                    "suite": s.suite,
                    "name": s.name,
                    "kernel": s.kernel.version,
                    "boot": boot,
                    "initramfs_bytes": s.initrd.stat().st_size,
                    "boots": times[(s.label, boot)],
                    "median": {
                        phase: statistics.median(t[phase] for t in times[(s.label, boot)])
                        for phase in PHASES
                    },
                }
                for s in configs
                for boot in args.boots
            ],
            "failed": failed,
            **({"analysis": analyses} if args.analyze else {}),
        }
    finally:
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def table(report: dict[str, object]) -> str:
    """Medians per configuration and boot kind, with ratios against plain dracut (the same
    suite and boot kind), and our hook's cost on its generator (``X+overlayroot`` against
    ``X``, same suite and boot kind) where both ran."""
    configurations = report["configurations"]
    assert isinstance(configurations, list)
    loads = [b["load_1m"] for c in configurations for b in c.get("boots", []) if "load_1m" in b]
    others = [
        b["other_qemu"] for c in configurations for b in c.get("boots", []) if "other_qemu" in b
    ]
    lines = [
        f"{report['accel']}, {report.get('clock', HOST)} clock, {report['runs']} boots each;"
        " medians in guest seconds; x: ratio"
        f" to plain {BASELINE} (same suite, same boot kind); hook x: to the same generator"
        " without our hook",
    ]
    if loads:
        lines.append(
            f"host load (1 min) during the boots: median {statistics.median(loads):.1f},"
            f" max {max(loads):.1f}; other QEMU guests beside a boot: max {max(others):g}"
        )
    lines.append(
        f"{'suite/initramfs':<40} {'boot':<6} {'size':>8} {'kernel':>7} {'initrd':>7}"
        f" {'user':>7} {'multi-user':>10} {'initrd x':>8} {'total x':>8} {'hook x':>7}"
    )
    medians = {(c["suite"], c["name"], c["boot"]): c["median"] for c in configurations}
    for c in configurations:
        m = c["median"]
        b = medians.get((c["suite"], BASELINE, c["boot"]))
        plain = medians.get((c["suite"], c["name"].removesuffix("+overlayroot"), c["boot"]))
        cells = [
            f"{m['initramfs_s'] / b['initramfs_s']:>8.2f}" if b else f"{'':>8}",
            f"{m['multi_user_s'] / b['multi_user_s']:>8.2f}" if b else f"{'':>8}",
            f"{m['multi_user_s'] / plain['multi_user_s']:>7.2f}"
            if plain and c["name"].endswith("+overlayroot")
            else f"{'':>7}",
        ]
        lines.append(
            (
                f"{c['suite'] + '/' + c['name']:<40} {c['boot']:<6}"
                f" {c['initramfs_bytes'] / 2**20:>4.1f} MiB {m['kernel_s']:>7.1f}"
                f" {m['initramfs_s']:>7.1f} {m['userspace_s']:>7.1f}"
                f" {m['multi_user_s']:>10.1f} " + " ".join(cells)
            ).rstrip()
        )
    failed = report.get("failed") or {}
    assert isinstance(failed, dict)
    lines += [f"{label}: FAILED, left out: {why}" for label, why in sorted(failed.items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.integrations",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="boots per configuration and boot kind (3)"
    )
    parser.add_argument(
        "--suites",
        type=_words(SUITES),
        default=list(SUITES),
        help=f"Debian releases to boot, comma-separated ({','.join(SUITES)})",
    )
    parser.add_argument(
        "--boots",
        type=_words(BOOTS),
        default=list(BOOTS),
        help=f"first boots of a deployment, later (blessed) boots, or both ({','.join(BOOTS)})",
    )
    parser.add_argument(
        "--only",
        type=lambda v: v.split(","),
        default=[],
        help="only these configurations, by name or suite/name, comma-separated"
        " (e.g. standalone,dracut)",
    )
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default=HOST,
        help="guest clock: host (TCG at host real time; noisy) or instructions (-icount"
        " shift=0: 1 ns per guest instruction, repeatable, about twice the wall time) (host)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per boot (600)")
    parser.add_argument("--json", action="store_true", help="print a JSON object, not a table")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument(
        "--append",
        default="",
        metavar="ARGS",
        help="kernel arguments added to every configuration's command line"
        " (e.g. overlayroot.debug, for the stage's timed steps on the console; with --keep)",
    )
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="also show where systemd's part of each configuration's last boot went (each"
        " unit's activation time, the bless's journal; taken in the guest after the figures)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print(
            "bench.integrations: run as root (mmdebstrap, deploy and dracut need it)",
            file=sys.stderr,
        )
        return 2
    try:
        report = run_benchmark(args)
    except (
        BenchUnavailable,
        BootFailure,
        debian.DebianUnavailable,
        debian.GeneratorFailed,
        trixie.TrixieUnavailable,
    ) as e:
        print(f"bench.integrations: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else table(report) + analysis_text(report))
    return 1 if report["failed"] else 0


def analysis_text(report: dict[str, object]) -> str:
    """``--analyze``'s part of the table output: each boot's systemd-analyze lines."""
    analyses = report.get("analysis")
    if not isinstance(analyses, dict):
        return ""
    return "".join(
        f"\n{label}: systemd-analyze\n" + "".join(f"  {line}\n" for line in lines)
        for label, lines in analyses.items()
    )


def _words(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        words = value.split(",")
        bad = [w for w in words if w not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(bad)}: not one of {', '.join(allowed)}")
        return [w for w in allowed if w in words]

    return parse


if __name__ == "__main__":
    sys.exit(main())
