"""The Debian test root carries the modules its systemd loads after the switch (qemu.debian)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from qemu import debian
from qemu.kernel import debian_cloud_kernel, kernel_from_env

pytestmark = pytest.mark.skipif(
    shutil.which("depmod") is None or shutil.which("modprobe") is None,
    reason="needs kmod's depmod and modprobe (apt-get install kmod)",
)


def test_root_carries_every_root_module_indexed(tmp_path: Path) -> None:
    # Every name of ROOT_MODULES, not only the first: modprobe takes the words after the first
    # as that module's options unless told --all (loop was left out that way).
    kernel = kernel_from_env() or debian_cloud_kernel()
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "lib").symlink_to("usr/lib")  # merged /usr, as mmdebstrap makes the root
    debian._add_modules(tmp_path, kernel)
    target = tmp_path / "usr" / "lib" / "modules" / kernel.version
    copied = {
        name.split(".", 1)[0] for _, _, names in os.walk(target) for name in names if ".ko" in name
    }
    assert set(debian.ROOT_MODULES) <= copied
    dep = (target / "modules.dep").read_text()
    for name in debian.ROOT_MODULES:
        assert f"/{name}.ko" in dep, name
