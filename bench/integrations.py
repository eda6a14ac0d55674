"""Time to multi-user.target of a real Debian under TCG, through each initramfs, for issue 4.

What it measures
    The Debian bookworm image of qemu.debian (systemd, minbase, the overlayroot command and
    overlayroot-bless.service), booted by the harness kernel:

    standalone       our initramfs (initrd.build, zstd), the root deployed as erofs on a state disk;
    dracut+overlayroot  Debian's dracut (systemd initrd, generic) with hooks/dracut, same disk;
    dracut           the same dracut without our module, the root as an ordinary ext4 root
                     (no overlay, ``rw``): what the integration costs on top of dracut;
    mkinitcpio+overlayroot, mkinitcpio-systemd+overlayroot
                     the real mkinitcpio 41 (qemu.mkinitcpio) with hooks/mkinitcpio, its busybox
                     /init (with ``init=/lib/systemd/systemd``: docs/integrations.md) and its
                     systemd hook, same disk; left out, with a note, where its tarball is not.

    The figure is systemd's own ``ActiveEnterTimestampMonotonic`` of multi-user.target (seconds
    since the kernel started), which the image's report unit prints; the size is the initramfs
    file. Every boot gets a fresh copy of its disk, so each is a first boot (machine id
    generated, /var seeded, a trial boot whose image digest is checked) and the configurations
    alternate. TCG guest clocks run at host real time: a busy host lengthens every figure.

    .venv/bin/python -m bench.integrations [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from initrd.build import BuildConfig, Compression, build_initramfs
from overlayroot.commands.deploy import deploy
from qemu import debian, mkinitcpio
from qemu.accel import choose_accel
from qemu.disks import make_raw_fs_disk, make_state_disk
from qemu.kernel import Kernel, debian_cloud_kernel, kernel_from_env
from qemu.machine import BootFailure, Machine
from qemu.paths import cache_dir
from qemu.rootfs import build_command_payload

STATE_LABEL = "or-bench"
ROOT_LABEL = "bench-root"
FAILURES = ("Kernel panic - not syncing", "overlayroot: error:", "Entering emergency mode",
            "Traceback (most recent call last)")


@dataclass(frozen=True)
class Setup:
    name: str
    initrd: Path
    disk: Path
    cmdline: str


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def setups(kernel: Kernel, root: Path, work: Path) -> list[Setup]:
    progress("building the state disk and the ordinary root disk")
    content = work / "state-content"
    content.mkdir()
    deploy(content, root, deployment_id="bookworm", fmt="erofs", created=1_700_000_000)
    state = make_state_disk(work / "state.img", content, size_mb=640, fs_label=STATE_LABEL,
                            fs_uuid="5e1f0a4c-7a2b-4c3d-9e8f-0000000be7d1",
                            partlabel="overlayroot state",
                            partuuid="c0ffee00-1234-4abc-8def-0000000be7d1")
    plain = make_raw_fs_disk(work / "root.img", root, 640, ROOT_LABEL,
                             "5e1f0a4c-7a2b-4c3d-9e8f-0000000be7d2")
    images: list[tuple[str, Callable[[Path], Path]]] = [
        ("standalone", lambda out: _standalone(kernel, out)),
        ("dracut+overlayroot", lambda out: debian.dracut_initramfs(kernel, out, systemd=True)),
        ("dracut", lambda out: debian.dracut_initramfs(kernel, out, systemd=True,
                                                        overlayroot=False)),
        ("mkinitcpio+overlayroot", lambda out: mkinitcpio.mkinitcpio_initramfs(
            kernel, out, mkinitcpio.Variant.BUSYBOX)),
        ("mkinitcpio-systemd+overlayroot", lambda out: mkinitcpio.mkinitcpio_initramfs(
            kernel, out, mkinitcpio.Variant.SYSTEMD)),
    ]
    result = []
    for name, build in images:
        progress(f"building the {name} initramfs")
        try:
            initrd = build(work / f"{name}.img")
        except mkinitcpio.MkinitcpioUnavailable as e:
            progress(f"left out {name}: {e}")
            continue
        if name == "dracut":
            result.append(Setup(name, initrd, plain, f"root=LABEL={ROOT_LABEL} rw"))
        elif name == "mkinitcpio+overlayroot":
            result.append(Setup(name, initrd, state,
                                f"root=LABEL={STATE_LABEL} ro init=/lib/systemd/systemd"))
        else:
            result.append(Setup(name, initrd, state, f"root=LABEL={STATE_LABEL} ro"))
    return result


def _standalone(kernel: Kernel, output: Path) -> Path:
    build_initramfs(BuildConfig(modules_dir=kernel.modules, output=output,
                                compress=Compression.ZSTD))
    return output


def boot_once(kernel: Kernel, accel: str, setup: Setup, work: Path, run: int,
              timeout: float) -> float:
    disk = work / f"boot-{setup.name}-{run}.img"
    shutil.copyfile(setup.disk, disk)
    log = work / "logs" / f"{setup.name}-{run}.log"
    machine = Machine(kernel, setup.initrd, log_path=log, disks=[disk], cmdline=setup.cmdline,
                      accel=accel)
    try:
        with machine:
            machine.wait_for("OVERLAYROOT-TEST done", timeout, failure=FAILURES)
        markers = machine.markers()
    finally:
        disk.unlink(missing_ok=True)
    if markers.get("failed"):
        raise BootFailure(f"failed units: {markers['failed']}", log, machine.console)
    return int(markers["multi_user_us"]) / 1e6


def run_benchmark(args: argparse.Namespace) -> dict[str, object]:
    kernel = kernel_from_env() or debian_cloud_kernel(cache_dir())
    accel = choose_accel(kernel)
    work = Path(tempfile.mkdtemp(prefix="bench-integrations.", dir=cache_dir()))
    try:
        progress("building the Debian image")
        command = build_command_payload(work / "overlayroot-command")
        root = debian.debian_image(kernel, work / "debian" / "root", command)
        configs = setups(kernel, root, work)
        times: dict[str, list[float]] = {s.name: [] for s in configs}
        for run in range(args.runs):
            for setup in configs:
                seconds = boot_once(kernel, accel, setup, work, run, args.timeout)
                progress(f"{setup.name} boot {run + 1}: multi-user.target at {seconds:.1f} s")
                times[setup.name].append(seconds)
        return {
            "kernel": kernel.version,
            "accel": accel,
            "runs": args.runs,
            "configurations": [
                {"name": s.name, "initramfs_bytes": s.initrd.stat().st_size,
                 "multi_user_s": times[s.name],
                 "median_s": statistics.median(times[s.name])}
                for s in configs
            ],
        }
    finally:
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def table(report: dict[str, object]) -> str:
    lines = [f"kernel {report['kernel']}, {report['accel']}, {report['runs']} boots each",
             f"{'initramfs':<30} {'size':>9} {'median':>8}  boots (s to multi-user.target)"]
    configurations = report["configurations"]
    assert isinstance(configurations, list)
    for c in configurations:
        boots = " ".join(f"{t:.1f}" for t in c["multi_user_s"])
        lines.append(f"{c['name']:<30} {c['initramfs_bytes'] / 2**20:>5.1f} MiB"
                     f" {c['median_s']:>7.1f}s  {boots}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.integrations", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="boots per configuration (3)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per boot (600)")
    parser.add_argument("--json", action="store_true", help="print a JSON object, not a table")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.integrations: run as root (mmdebstrap, deploy and dracut need it)",
              file=sys.stderr)
        return 2
    try:
        report = run_benchmark(args)
    except (BootFailure, debian.DebianUnavailable, debian.GeneratorFailed) as e:
        print(f"bench.integrations: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
