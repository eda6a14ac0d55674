"""The initramfs-tools hook and local-bottom script, with initramfs-tools' functions as stand-ins.

The QEMU tests build a real image with mkinitramfs; these check the scripts' contracts quickly:
prereqs, what the build hook adds, failing the build when the builder fails, and the boot script
sending a failure to initramfs-tools' panic.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HOOKS = Path(__file__).resolve().parents[2] / "hooks" / "initramfs-tools"
BUILD_HOOK = HOOKS / "hooks" / "overlayroot"
BOTTOM = HOOKS / "scripts" / "local-bottom" / "overlayroot"
BUILDER = Path(sys.executable).parent / "overlayroot"
PREPARE = "/usr/lib/overlayroot/prepare"
HOOK_FUNCTIONS = "/usr/share/initramfs-tools/hook-functions"
FUNCTIONS = "/scripts/functions"


def with_standins(script: Path, tmp_path: Path, replacements: dict[str, str]) -> Path:
    """A copy of ``script`` with the paths it sources or runs pointed at stand-ins."""
    text = script.read_text()
    for path, standin in replacements.items():
        assert text.count(path) == 1, path
        text = text.replace(path, standin)
    copy = tmp_path / script.name
    copy.write_text(text)
    copy.chmod(0o755)
    return copy


@pytest.mark.parametrize("script", [BUILD_HOOK, BOTTOM], ids=["hook", "local-bottom"])
def test_prereqs_are_none(script: Path) -> None:
    proc = subprocess.run([str(script), "prereqs"], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""


def run_build_hook(tmp_path: Path, builder: str) -> tuple[int, list[str], Path]:
    log, destdir = tmp_path / "log", tmp_path / "destdir"
    destdir.mkdir()
    (destdir / "lib").symlink_to("usr/lib")
    functions = tmp_path / "hook-functions"
    functions.write_text('manual_add_modules() { echo "manual_add_modules $*" >> "$LOG"; }\n')
    hook = with_standins(BUILD_HOOK, tmp_path, {HOOK_FUNCTIONS: str(functions)})
    env = dict(
        os.environ,
        LOG=str(log),
        DESTDIR=str(destdir),
        OVERLAYROOT_COMMAND=builder,
        TMPDIR=str(tmp_path),
    )
    proc = subprocess.run([str(hook)], env=env, capture_output=True, text=True)
    return proc.returncode, log.read_text().splitlines() if log.exists() else [], destdir


def test_build_hook_copies_the_stage_and_adds_the_modules(tmp_path: Path) -> None:
    if not os.access(BUILDER, os.X_OK):
        pytest.skip(f"{BUILDER} is not installed (pip install -e .)")
    status, calls, destdir = run_build_hook(tmp_path, str(BUILDER))
    assert status == 0
    assert calls == ["manual_add_modules overlay loop erofs squashfs softdog"]
    assert os.access(destdir / PREPARE.lstrip("/"), os.X_OK)
    assert (destdir / "usr/lib/python311.zip").is_file()
    assert (destdir / "lib").is_symlink()
    assert not (destdir / "init").exists()
    assert not list(tmp_path.glob("overlayroot-payload.*")), "payload left behind"


def test_build_hook_fails_mkinitramfs_when_the_builder_fails(tmp_path: Path) -> None:
    status, calls, destdir = run_build_hook(tmp_path, "/bin/false")
    assert status == 1
    assert calls == []
    assert not (destdir / PREPARE.lstrip("/")).exists()
    assert not list(tmp_path.glob("overlayroot-payload.*"))


def run_local_bottom(tmp_path: Path, prepare_status: int) -> list[str]:
    log = tmp_path / "log"
    functions = tmp_path / "functions"
    functions.write_text(
        'panic() { echo "panic $*" >> "$LOG"; }\nmodprobe() { echo "modprobe $*" >> "$LOG"; }\n'
    )
    stub = tmp_path / "prepare"
    stub.write_text(
        '#!/bin/sh\necho "prepare $*" >> "$LOG"\n'
        'echo "hash seed ${PYTHONHASHSEED-unset}" >> "$LOG"\n'
        f"exit {prepare_status}\n"
    )
    stub.chmod(0o755)
    script = with_standins(BOTTOM, tmp_path, {FUNCTIONS: str(functions), PREPARE: str(stub)})
    # initramfs-tools' /init exports rootmnt and runs local-bottom scripts as programs.
    subprocess.run([str(script)], env=dict(os.environ, LOG=str(log), rootmnt="/root"), check=True)
    return log.read_text().splitlines()


def test_local_bottom_prepares_rootmnt(tmp_path: Path) -> None:
    calls = run_local_bottom(tmp_path, 0)
    # No modprobe process: the stage loads its modules from the image's modules.dep.
    assert calls[0] == "prepare /root"
    # No wait for the kernel's random pool (initrd/build.py, prepare_script).
    assert calls[calls.index("prepare /root") + 1] == "hash seed 0"
    assert not any(c.startswith("panic") for c in calls)


def test_local_bottom_panics_when_prepare_fails(tmp_path: Path) -> None:
    calls = run_local_bottom(tmp_path, 1)
    assert calls[-1] == "panic overlayroot could not assemble the root; the reason is above"
