"""Every shell script under hooks/ passes shellcheck, in the dialect its framework runs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HOOKS = Path(__file__).resolve().parents[2] / "hooks"


def shell_scripts() -> list[Path]:
    return sorted(p for p in HOOKS.rglob("*")
                  if p.is_file() and p.read_bytes().startswith(b"#!") and b"sh" in
                  p.read_bytes().split(b"\n", 1)[0])


def test_the_hooks_are_found() -> None:
    names = {p.relative_to(HOOKS).as_posix() for p in shell_scripts()}
    assert {
        "dracut/90overlayroot/module-setup.sh",
        "dracut/90overlayroot/overlayroot-prepare.sh",
        "initramfs-tools/hooks/overlayroot",
        "initramfs-tools/scripts/local-bottom/overlayroot",
        "mkinitcpio/install/overlayroot",
        "mkinitcpio/hooks/overlayroot",
    } <= names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(HOOKS).as_posix())
def test_shellcheck_is_clean(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "--external-sources", str(script)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
