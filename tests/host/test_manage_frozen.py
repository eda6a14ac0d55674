"""The frozen ``overlayroot`` command (what the QEMU test roots carry) runs every command in a
root with no Python of its own: a chroot with only the payload, busybox and a state directory.
A module a command imports lazily and the payload lacks shows up here, not at a QEMU boot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from overlayroot.commands.staging import deploy
from overlayroot.core import bootstate, statefile
from overlayroot.core.layout import StateLayout
from qemu.rootfs import build_command_payload, make_test_root
from tests.trees import make_tree


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    base = tmp_path_factory.mktemp("frozen")
    payload = build_command_payload(base / "payload")
    root = make_test_root(base / "root", command=payload)
    state = StateLayout(root / "state")
    (root / "state").mkdir()
    deploy(root / "state", make_tree(base / "tree-v1"), deployment_id="v1", fmt="dir")
    current, _ = statefile.load(state)
    statefile.save(state, bootstate.bless(current, "v1"))
    (Path(state.etc_upper("v1")) / "local.conf").write_text("mine\n")
    make_tree(root / "tree-v2")
    (root / "run/overlayroot").mkdir(parents=True)
    (root / "run/overlayroot/booted.json").write_text(
        json.dumps({"deployment": "v1", "state": "/state", "trial": True, "watchdog": None})
    )
    return root


COMMANDS = (  # in order: each may depend on the ones before
    "--version",
    "status",
    "status --json",
    "deploy --format dir --id v2 /tree-v2",
    "etc diff",
    "etc diff v2 --json",
    "bless",
    "set-default --once v1",
    "set-default v2",
    "rollback",  # fails: v2 was never blessed; a user error, frozen too
    "pin v2",
    "unpin v2",
    "mark-bad v2 --reason test",
    "history",
    "history --json -n 3",
    "gc --keep 1 --dry-run",
    "gc --keep 1",
)


def test_every_command_runs_frozen(root: Path) -> None:
    chroot = shutil.which("chroot") or "chroot"
    for command in COMMANDS:
        result = subprocess.run(
            [chroot, str(root), "/usr/bin/overlayroot", *command.split()],
            capture_output=True,
            text=True,
            env={"PATH": "/bin:/usr/bin"},
        )
        expected = 1 if command == "rollback" else 0
        assert result.returncode == expected, f"{command}: {result.stdout}{result.stderr}"
        assert "Traceback" not in result.stderr, command
        if command == "etc diff":
            assert result.stdout == "A /etc/local.conf\n"
        if command.startswith("deploy"):
            assert "/etc carried forward from v1" in result.stdout


def test_install_command_puts_a_working_command_into_a_root_without_python(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    from overlayroot import __version__
    from overlayroot.commands import cli

    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").mkdir()
    assert cli.main(["install-command", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"root": str(root), "command": "/usr/bin/overlayroot", "kept": []}
    assert not (root / "init").exists() and not (root / "dev").exists()
    ran = subprocess.run(
        ["chroot", str(root), "/usr/bin/overlayroot", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert __version__ in ran.stdout
    ran = subprocess.run(
        ["chroot", str(root), "/usr/bin/overlayroot", "status"], capture_output=True, text=True
    )
    assert ran.returncode == 1 and "overlayroot: error:" in ran.stderr  # ran, found no state


def test_install_command_keeps_what_the_image_has_unless_told_to_replace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from overlayroot.commands import cli

    root = tmp_path / "root"
    python = Path(os.path.realpath("/usr/bin/python3"))
    own = root / python.relative_to("/")
    own.parent.mkdir(parents=True)
    own.write_text("the image's own\n")
    assert cli.main(["install-command", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"installed /usr/bin/overlayroot into {root}; kept ")
    assert own.read_text() == "the image's own\n"
    assert cli.main(["install-command", str(root), "--replace", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == []
    assert own.read_bytes() == python.read_bytes()


def test_install_command_into_a_missing_root_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from overlayroot.commands import cli

    assert cli.main(["install-command", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err == (
        f"overlayroot: error: {tmp_path / 'nope'} is not a directory: give the root of the"
        " image to install the command into\n"
    )
