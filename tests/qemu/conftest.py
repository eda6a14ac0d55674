"""Session fixtures the boot tests share: each is built once per test process, whatever
module asks for it first."""

from __future__ import annotations

from pathlib import Path

import pytest

from initrd.build import BuildConfig, Compression, build_initramfs
from qemu.kernel import Kernel
from qemu.rootfs import build_command_payload


@pytest.fixture(scope="session")
def initramfs(kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our standalone initramfs for the test kernel."""
    out = tmp_path_factory.mktemp("initramfs") / "initrd.img"
    build_initramfs(BuildConfig(modules_dir=kernel.modules, output=out, compress=Compression.ZSTD))
    return out


@pytest.fixture(scope="session")
def command_payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The frozen ``overlayroot`` command, to put into test roots without Python."""
    return build_command_payload(tmp_path_factory.mktemp("overlayroot-command"))
