"""Deploy time of a Debian root with its own kernel against without, for issue 9.

What it measures
    The Debian bookworm tree of qemu.debian (systemd, minbase), with the harness kernel (Debian's
    cloud kernel) added the Debian way: ``/boot/vmlinuz-<version>`` and its modules in
    ``/usr/lib/modules/<version>``. Each run deploys it as an erofs image into a fresh state
    directory (no loop device, no mount), in three configurations, alternating:

    no kernel        ``deploy --no-kernel``: the baseline, what deploy cost before issue 9;
    kernel, built    the kernel stored with the deployment, its initramfs built by our builder
                     from the root's modules (the root has no ``/boot/initrd.img-<version>``);
    kernel, copied   the same root with the initramfs the builder made in the first run put at
                     ``/boot/initrd.img-<version>``: deploy copies it.

    The figure is the wall time of ``overlayroot.commands.staging.deploy`` (the median of the
    runs), and each configuration's ratio to the baseline's median of the same run. The trees
    are hardlinked copies of the cached root, made before the clock starts.

    sudo .venv/bin/python -m bench.deploy_kernel [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from overlayroot.commands.staging import KernelChoice, deploy
from qemu import debian
from qemu.kernel import debian_cloud_kernel, kernel_from_env
from qemu.paths import cache_dir

CONFIGURATIONS = ("no kernel", "kernel, built", "kernel, copied")
EPOCH = 1_700_000_000


def make_root(base: Path, work: Path, vmlinuz: Path, modules: Path, version: str) -> Path:
    """A hardlinked copy of ``base`` (on the same filesystem as ``work``) with the kernel."""
    root = work / "root"
    subprocess.run(["cp", "-al", str(base), str(root)], check=True)
    boot = root / "boot"
    boot.mkdir(exist_ok=True)
    shutil.copy(vmlinuz, boot / f"vmlinuz-{version}")
    shutil.copytree(modules, root / "usr/lib/modules" / version, symlinks=True)
    return root


def run_benchmark(args: argparse.Namespace) -> dict[str, object]:
    kernel = kernel_from_env() or debian_cloud_kernel()
    base = debian.debian_base()
    work_parent = cache_dir() / "bench"
    work_parent.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir=work_parent) as tmp:
        work = Path(tmp)
        root = make_root(base, work, kernel.vmlinuz, kernel.modules, kernel.version)
        initrd = root / "boot" / f"initrd.img-{kernel.version}"
        built: Path | None = None
        for run in range(args.runs):
            for name in CONFIGURATIONS:
                if name == "kernel, copied":
                    assert built is not None
                    shutil.copy(built, initrd)
                elif initrd.exists():
                    initrd.unlink()
                sysroot = work / f"state-{run}-{CONFIGURATIONS.index(name)}"
                sysroot.mkdir()
                choice = KernelChoice(skip=name == "no kernel")
                started = time.perf_counter()
                manifest, final = deploy(
                    sysroot, root, deployment_id="v1", created=EPOCH, kernel=choice
                )
                seconds[name].append(time.perf_counter() - started)
                if name == "kernel, built" and built is None:
                    built = work / "built-initramfs.img"
                    shutil.copy(final / "initramfs.img", built)
                    sizes["initramfs"] = built.stat().st_size
                    sizes["vmlinuz"] = (final / "vmlinuz").stat().st_size
                if name == "no kernel":
                    sizes["image"] = manifest.size
                shutil.rmtree(sysroot)
    baseline = statistics.median(seconds["no kernel"])
    return {
        "kernel": kernel.version,
        "runs": args.runs,
        "bytes": sizes,
        "configurations": {
            name: {
                "median_s": round(statistics.median(values), 3),
                "ratio": round(statistics.median(values) / baseline, 2),
                "runs_s": [round(v, 3) for v in values],
            }
            for name, values in seconds.items()
        },
    }


def table(report: dict[str, object]) -> str:
    configurations = report["configurations"]
    assert isinstance(configurations, dict)
    lines = [
        f"deploy of the Debian root as erofs, kernel {report['kernel']},"
        f" median of {report['runs']} runs; sizes {report['bytes']}",
        f"{'configuration':<16} {'median s':>9} {'ratio':>6}",
    ]
    for name, figures in configurations.items():
        lines.append(f"{name:<16} {figures['median_s']:>9.3f} {figures['ratio']:>6.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.deploy_kernel",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--runs", type=int, default=5, help="deploys per configuration (5)")
    parser.add_argument("--json", action="store_true", help="print a JSON object, not a table")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if os.geteuid() != 0:
        print(
            "bench.deploy_kernel: run as root (the Debian tree has files of other owners)",
            file=sys.stderr,
        )
        return 2
    report = run_benchmark(args)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
