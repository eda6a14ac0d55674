"""Shared pieces of the boot tests of the busybox test root: state disks made on the host, the
scripts the roots carry, and readers of what a boot reported (the fixtures are in conftest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from overlayroot.commands.staging import deploy
from overlayroot.core import bootstate, statefile
from overlayroot.core.layout import StateLayout
from qemu.disks import make_state_disk, partition_offset, read_file
from qemu.machine import Machine
from qemu.rootfs import make_test_root

FS_LABEL = "or-state"
FS_UUID = "5e1f0a4c-7a2b-4c3d-9e8f-0123456789ab"
PARTLABEL = "overlayroot state"
PARTUUID = "c0ffee00-1234-4abc-8def-0000000000a1"
CREATED = 1_700_000_000
# Every boot test powers off on failure, so a failed boot ends QEMU at once.
BASE = f"console=ttyS0 root=LABEL={FS_LABEL} overlayroot.onfail=poweroff overlayroot.timeout=10"


def state_content(base: Path, deployments: list[tuple[str, str, Path]]) -> Path:
    """A state filesystem's tree with ``(id, format, tree)`` deployed in order, each one
    second newer than the last."""
    state = base / "state-content"
    state.mkdir()
    for offset, (deployment_id, fmt, tree) in enumerate(deployments):
        deploy(state, tree, deployment_id=deployment_id, fmt=fmt, created=CREATED + offset)
    return state


def disk_from(base: Path, content: Path) -> Path:
    """A GPT disk whose one partition holds ``content`` as an ext4 filesystem."""
    return make_state_disk(
        base / "state.img",
        content,
        size_mb=96,
        fs_label=FS_LABEL,
        fs_uuid=FS_UUID,
        partlabel=PARTLABEL,
        partuuid=PARTUUID,
    )


def state_disk(base: Path, deployments: list[tuple[str, str, Path]]) -> Path:
    return disk_from(base, state_content(base, deployments))


def make_root(base: Path, name: str = "test", *, with_init: bool = True) -> Path:
    return make_test_root(base / f"root-{name}", with_init=with_init, image=name)


BOOT_TIMEOUT = 180  # seconds of TCG time from power-on to the test init's last word
CMDLINE = f"{BASE} overlayroot.tries=2"
BROKEN = ("Traceback", "internal error")

# Scripts every test root carries; `test.run=NAME` runs one. Markers are one line each.
REPORT = """\
echo "OVERLAYROOT-TEST status=$(overlayroot status --json | tr -d '\\n')"
echo "OVERLAYROOT-TEST history=$(overlayroot history --json | tr -d '\\n')"
overlayroot status
overlayroot history
"""
SCRIPTS = {
    "report": REPORT,
    # Boot 1 of the update story: edit /etc, bless, deploy the update from inside.
    "update": """\
echo carried > /etc/local.conf
overlayroot deploy --id v2 /run/overlayroot/state/updates/v2.erofs
echo "OVERLAYROOT-TEST deploy=$?"
"""
    + REPORT,
    # Boot 2: the update is on trial; after the bless, roll back.
    "check-update": """\
echo "OVERLAYROOT-TEST local_conf=$(cat /etc/local.conf)"
echo v2-only > /etc/v2.conf
echo "OVERLAYROOT-TEST etc_diff=$(overlayroot etc diff | tr '\\n' ' ')"
"""
    + REPORT
    + """\
overlayroot rollback
echo "OVERLAYROOT-TEST rollback=$?"
""",
    # Boot 3: back on v1, with v1's own /etc.
    "after-rollback": """\
echo "OVERLAYROOT-TEST local_conf=$(cat /etc/local.conf)"
echo "OVERLAYROOT-TEST v2_conf=$(cat /etc/v2.conf 2>/dev/null)"
"""
    + REPORT,
    "once": """\
overlayroot set-default --once v2
echo "OVERLAYROOT-TEST once=$?"
"""
    + REPORT,
}


class Disk:
    """A state disk made on the host: deploy, bless, mark bad offline, then boot it."""

    def __init__(self, base: Path, payload: Path) -> None:
        self.base = base
        self.payload = payload
        self.content = base / "state-content"
        self.content.mkdir()
        self.layout = StateLayout(self.content)
        self.count = 0
        self.path = base / "state.img"
        self.offset = 0

    def root(self, name: str, fail: str | None = None) -> Path:
        return make_test_root(
            self.base / f"root-{name}", image=name, fail=fail, command=self.payload, scripts=SCRIPTS
        )

    def deploy(self, name: str, fail: str | None = None) -> None:
        deploy(
            self.content, self.root(name, fail), deployment_id=name, created=CREATED + self.count
        )
        self.count += 1

    def change(self, apply: Any, *args: object) -> None:
        state, _ = statefile.load(self.layout)
        statefile.save(self.layout, apply(state, *args))

    def bless(self, name: str) -> None:
        self.change(bootstate.bless, name)
        statefile.append_history(self.layout, "blessed", name)

    def make(self) -> Path:
        make_state_disk(
            self.path,
            self.content,
            size_mb=320,
            fs_label=FS_LABEL,
            fs_uuid=FS_UUID,
            partlabel=PARTLABEL,
            partuuid=PARTUUID,
        )
        self.offset = partition_offset(self.path)
        return self.path

    def read(self, path: str) -> bytes:
        return read_file(self.path, self.offset, path)

    def state(self) -> bootstate.BootState:
        return bootstate.BootState.from_json(self.read("/overlayroot/boot.json").decode())


def booted(m: Machine) -> str:
    return str(json.loads(m.markers()["booted_json"])["deployment"])


def status(m: Machine) -> dict[str, Any]:
    data = json.loads(m.markers()["status"])
    assert isinstance(data, dict)
    return data


def rows(m: Machine) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in status(m)["deployments"]}


def history(m: Machine) -> list[dict[str, Any]]:
    data = json.loads(m.markers()["history"])
    assert isinstance(data, list)
    return data
