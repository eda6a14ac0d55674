"""Shared pieces of the boot tests: our initramfs for the test kernel, and state disks."""

from __future__ import annotations

from pathlib import Path

import pytest

from initrd.build import BuildConfig, Compression, build_initramfs
from overlayroot.commands.staging import deploy
from qemu.disks import make_state_disk
from qemu.kernel import Kernel
from qemu.rootfs import make_test_root

FS_LABEL = "or-state"
FS_UUID = "5e1f0a4c-7a2b-4c3d-9e8f-0123456789ab"
PARTLABEL = "overlayroot state"
PARTUUID = "c0ffee00-1234-4abc-8def-0000000000a1"
CREATED = 1_700_000_000
# Every boot test powers off on failure, so a failed boot ends QEMU at once.
BASE = f"console=ttyS0 root=LABEL={FS_LABEL} overlayroot.onfail=poweroff overlayroot.timeout=10"


@pytest.fixture(scope="session")
def initramfs(kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our standalone initramfs for the test kernel, built once per session."""
    out = tmp_path_factory.mktemp("initramfs") / "initrd.img"
    build_initramfs(BuildConfig(modules_dir=kernel.modules, output=out, compress=Compression.ZSTD))
    return out


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
