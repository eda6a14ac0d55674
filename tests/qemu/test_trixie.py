"""Issue 10: Debian 13 (trixie) built the way an image pipeline builds it (qemu.trixie) boots
with its own kernel (6.12) through the initramfs images made inside it by its own Python 3.13:
our standalone image and initramfs-tools with our hooks.

Each boot reports from a unit after multi-user.target and the bless (qemu.debian's report
script), as the bookworm tests of test_integrations.py do, and powers off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from overlayroot.commands.fsops import Progress
from overlayroot.commands.images import build_image
from overlayroot.commands.staging import deploy
from qemu import trixie
from qemu.disks import make_state_disk
from qemu.plugin import MachineFactory
from qemu.rootfs import make_test_root
from tests.qemu.debianboot import BOOT_TIMEOUT, boot_debian, check_blessed, check_read_only_system
from tests.qemu.stage import CREATED, FS_LABEL, FS_UUID

# Minutes each, and the first builds the image (minutes more on a clean clone; one worker runs
# both: tests/workers.py).
pytestmark = pytest.mark.slow

DEPLOYMENT = "trixie"
UPDATE = "update"
# tries=1: a trial that crashes once is given up on, so the fallback takes one failed boot.
CMDLINE = f"root=LABEL={FS_LABEL} ro overlayroot.tries=1"


@pytest.fixture(scope="session")
def image() -> trixie.TrixieImage:
    try:
        return trixie.trixie_image()
    except trixie.TrixieUnavailable as e:
        pytest.skip(f"the trixie image cannot be built here: {e}")


@pytest.fixture(scope="session")
def trixie_root(image: trixie.TrixieImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trixie.deployment_root(image, tmp_path_factory.mktemp("trixie") / "root")


def trixie_disk(base: Path, root: Path) -> Path:
    """A state disk with the trixie root deployed as erofs, and beside it, for the booted system
    to deploy itself (``test.deploy=update``), a bad update: a root whose init exits."""
    content = base / "state-content"
    content.mkdir()
    deploy(content, root, deployment_id=DEPLOYMENT, fmt="erofs", created=CREATED)
    updates = content / "updates"
    updates.mkdir()
    bad = make_test_root(base / "update-root", image=UPDATE, fail="exit")
    build_image(bad, updates / f"{UPDATE}.erofs", "erofs", UPDATE, CREATED, Progress(None))
    return make_state_disk(
        base / "state.img",
        content,
        size_mb=768,
        fs_label=FS_LABEL,
        fs_uuid=FS_UUID,
        partlabel="overlayroot state",
        partuuid="c0ffee00-1234-4abc-8def-0000000000a2",
    )


def check_own_kernel(markers: dict[str, str], image: trixie.TrixieImage) -> None:
    assert markers["kernel"] == image.kernel.version
    assert markers["kernel"].startswith("6.12.")


def test_trixie_through_the_standalone_image_is_blessed_and_falls_back_from_a_bad_update(
    machine: MachineFactory,
    image: trixie.TrixieImage,
    trixie_root: Path,
    tmp_path: Path,
) -> None:
    """Boot 1: trixie's trial reaches multi-user.target read-only with no failed unit, is
    blessed, writes into /etc, /var and /home, and deploys an update from inside. Boot 2: the
    update's trial crashes (its init exits: the kernel panics). Boot 3: the update has used its
    one try; the machine is back on trixie by itself, with the state boot 1 wrote."""
    disk = trixie_disk(tmp_path, trixie_root)
    cmdline = f"{CMDLINE} overlayroot.onfail=poweroff"

    first = boot_debian(
        machine,
        image.standalone,
        disk,
        f"{cmdline} test.write=token-1 test.deploy={UPDATE}",
        "write",
        kernel=image.kernel,
    )
    check_own_kernel(first, image)
    check_read_only_system(first, DEPLOYMENT)
    booted = json.loads(first["booted_json"])
    assert booted["trial"] is True
    # Linux 6.12 mounts the erofs image from its file: no loop module, no loop device.
    assert {"erofs", "overlay", "softdog"} <= set(booted["modules"])
    assert "loop" not in booted["modules"]
    assert booted["loop"] is None
    check_blessed(first, DEPLOYMENT)
    assert (first["write_etc"], first["write_var"], first["write_home"]) == ("ok", "ok", "ok")
    assert first["write_root"] == "Read-only file system"
    assert first["deploy"] == "0"

    m = machine(
        initrd=image.standalone, disks=[disk], cmdline=cmdline, name="update", kernel=image.kernel
    )
    with m:
        m.wait_for(
            "OVERLAYROOT-TEST failing=exit",
            BOOT_TIMEOUT,
            failure=("OVERLAYROOT-TEST done", "overlayroot: error:"),
        )
        m.wait_exit(120)
    assert "trial boot of update: 0 tries left after this one" in m.console
    assert "Attempted to kill init" in m.console

    third = boot_debian(
        machine, image.standalone, disk, f"{cmdline} test.read=1", "fallback", kernel=image.kernel
    )
    check_read_only_system(third, DEPLOYMENT)
    assert json.loads(third["booted_json"])["trial"] is False
    check_blessed(third, DEPLOYMENT)
    assert (third["etc_token"], third["var_token"], third["home_token"]) == (
        "token-1",
        "token-1",
        "token-1",
    )
    status: dict[str, Any] = json.loads(third["status"])
    records = {r["id"]: r for r in status["deployments"]}
    assert records[UPDATE]["bad"] == (
        "used up its tries without being blessed (it crashed, hung or was reset)"
    )
    assert not records[UPDATE]["bootable"]


def test_trixie_through_initramfs_tools_built_inside_the_image(
    machine: MachineFactory,
    image: trixie.TrixieImage,
    trixie_root: Path,
    tmp_path: Path,
) -> None:
    """initramfs-tools' image, made by update-initramfs inside the image with our hooks: the
    trial reaches multi-user.target read-only with no failed unit and is blessed. (One boot:
    the later boots and the fallback are the standalone test's, and the bookworm tests boot
    initramfs-tools twice.)"""
    disk = trixie_disk(tmp_path, trixie_root)
    first = boot_debian(
        machine,
        image.initramfs_tools,
        disk,
        f"{CMDLINE} panic=-1 test.write=token-1",
        "write",
        kernel=image.kernel,
    )
    check_own_kernel(first, image)
    check_read_only_system(first, DEPLOYMENT)
    booted = json.loads(first["booted_json"])
    assert booted["trial"] is True
    # The stage loaded its modules from initramfs-tools' modules.dep, Debian 13's .ko.xz
    # decompressed by the kernel; Linux 6.12 mounts the erofs image from its file: no loop.
    assert {"erofs", "overlay", "softdog"} <= set(booted["modules"])
    assert "loop" not in booted["modules"]
    assert booted["loop"] is None
    check_blessed(first, DEPLOYMENT)
    assert (first["write_etc"], first["write_var"], first["write_home"]) == ("ok", "ok", "ok")
    assert first["write_root"] == "Read-only file system"
