"""Every shell script of the project passes shellcheck, in the dialect it runs in: the hooks
(their frameworks' shells), the guest side of the QEMU harness (qemu/guest/, busybox sh and
Debian's dash) and the benchmark's floor /init."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOOKS = REPO / "hooks"
PLACES = (HOOKS, REPO / "qemu" / "guest", REPO / "bench" / "floor")


def is_shell(path: Path) -> bool:
    head = path.read_bytes().split(b"\n", 1)[0]
    return (
        (head.startswith(b"#!") and b"sh" in head)
        or path.suffix == ".sh"
        or head.startswith(b"# shellcheck shell=")
    )


def shell_scripts() -> list[Path]:
    return sorted(p for place in PLACES for p in place.rglob("*") if p.is_file() and is_shell(p))


def test_the_hooks_are_found() -> None:
    names = {p.relative_to(HOOKS).as_posix() for p in shell_scripts() if HOOKS in p.parents}
    assert {
        "dracut/90overlayroot/module-setup.sh",
        "dracut/90overlayroot/overlayroot-prepare.sh",
        "initramfs-tools/hooks/overlayroot",
        "initramfs-tools/scripts/local-bottom/overlayroot",
        "mkinitcpio/install/overlayroot",
        "mkinitcpio/hooks/overlayroot",
    } <= names


def test_the_harness_and_bench_scripts_are_found() -> None:
    names = {p.relative_to(REPO).as_posix() for p in shell_scripts()}
    assert {
        "qemu/guest/common.sh",
        "qemu/guest/busybox-init.sh",
        "qemu/guest/debian-report.sh",
        "qemu/guest/with-kernel.sh",
        "qemu/guest/chroot.sh",
        "bench/floor/init.sh",
    } <= names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck_is_clean(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(
        ["shellcheck", "--external-sources", "--source-path=SCRIPTDIR", str(script)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout
