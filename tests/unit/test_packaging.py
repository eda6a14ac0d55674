"""What ``pip install .`` puts into an environment."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qemu.wheel import build_wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel") / "out")


def test_the_wheel_installs_only_our_own_top_level_packages(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {
        name.split("/")[0]
        for name in names
        if not name.split("/")[0].endswith((".dist-info", ".data"))
    }
    # Not `qemu`: that is QEMU's own library's namespace (qemu.qmp), which ours would break.
    assert top == {"overlayroot", "initrd"}


def test_the_wheel_registers_no_pytest_plugin(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    entry_points = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
    text = "".join(archive.read(n).decode() for n in entry_points)
    assert "pytest11" not in text
    assert "overlayroot = overlayroot.commands.cli:main" in text


def test_the_runtime_needs_only_cffi_and_the_builder_brings_its_own(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    requires = [
        line.split(":", 1)[1].strip()
        for line in archive.read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    runtime = [r for r in requires if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].strip() for r in runtime] == ["cffi"]
    assert any(r.startswith("construct") and 'extra == "build"' in r for r in requires)


def test_installing_next_to_qemus_own_library_leaves_it_working(
    wheel: Path, tmp_path: Path
) -> None:
    """`pip install` of our wheel into an environment that has QEMU's Python library
    (qemu-qmp, from PyPI): `import qemu.qmp` still works, and so does our command."""
    # Nothing of this checkout on the path: its folder qemu/ would hide the installed qemu.qmp.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = [
        str(venv / "bin/python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    got = subprocess.run([*pip, "qemu.qmp"], capture_output=True, text=True, env=env)
    if got.returncode != 0 and "No matching distribution" not in got.stderr:
        pytest.skip(f"PyPI is not reachable to install qemu.qmp: {got.stderr.strip()[-300:]}")
    assert got.returncode == 0, got.stderr
    installed = subprocess.run(
        [*pip, "--no-deps", str(wheel)], capture_output=True, text=True, env=env
    )
    assert installed.returncode == 0, installed.stderr
    ran = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import qemu.qmp, overlayroot.commands.cli; print(qemu.qmp.QMPClient.__name__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert (ran.returncode, ran.stdout) == (0, "QMPClient\n"), ran.stderr
    version = subprocess.run(
        [str(venv / "bin/overlayroot"), "--version"], capture_output=True, text=True, env=env
    )
    assert version.returncode == 0 and "overlayroot" in version.stdout, version.stderr
