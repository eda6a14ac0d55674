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

from overlayroot import bootstate, statefile
from overlayroot.deploy import deploy
from overlayroot.layout import StateLayout
from qemu.rootfs import build_command_payload, make_test_root
from tests.host.conftest import make_tree


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
    (root / "run/overlayroot/booted.json").write_text(json.dumps(
        {"deployment": "v1", "state": "/state", "trial": True, "watchdog": None}))
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
        result = subprocess.run([chroot, str(root), "/usr/bin/overlayroot", *command.split()],
                                capture_output=True, text=True, env={"PATH": "/bin:/usr/bin"})
        expected = 1 if command == "rollback" else 0
        assert result.returncode == expected, f"{command}: {result.stdout}{result.stderr}"
        assert "Traceback" not in result.stderr, command
        if command == "etc diff":
            assert result.stdout == "A /etc/local.conf\n"
        if command.startswith("deploy"):
            assert "/etc carried forward from v1" in result.stdout
