"""The assembly, for real: erofs/squashfs/dir lowers, the /etc overlay, /var and /home binds."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from overlayroot.commands.staging import deploy
from overlayroot.core import syscalls
from overlayroot.core.errors import BootError
from qemu.mounts import mounts_under
from tests.host.conftest import Env
from tests.trees import make_tree


def mount_options(path: Path) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                return " ".join(fields[5:])
    raise AssertionError(f"{path} is not a mount point")


@pytest.mark.parametrize("fmt", ["erofs", "squashfs", "dir"])
def test_assembles_a_read_only_root_with_writable_etc_var_home(env: Env, fmt: str) -> None:
    env.deploy("v1", fmt)
    env.assemble()
    root = env.sysroot
    assert (root / "etc/release").read_text() == "v1\n"
    with pytest.raises(OSError) as e:
        (root / "newfile").write_text("x")
    assert e.value.errno == errno.EROFS
    (root / "etc/hostname").write_text("edited\n")
    (root / "var/written").write_text("var\n")
    (root / "home/written").write_text("home\n")
    upper = env.state / "overlayroot/etc/v1/upper"
    assert (upper / "hostname").read_text() == "edited\n"
    assert (env.state / "overlayroot/var/written").read_text() == "var\n"
    assert (env.state / "overlayroot/home/written").read_text() == "home\n"
    etc_options = mount_options(root / "etc")
    # The kernel lists these only when they are on (docs/design.md §5: on breaks updates).
    for option in ("index=on", "redirect_dir=on", "metacopy=on", "xino=on", "xino=auto"):
        assert option not in etc_options


def test_an_empty_var_is_seeded_from_the_image_once(env: Env) -> None:
    env.deploy("v1")
    env.assemble()
    var = env.state / "overlayroot/var"
    assert (var / "lib/testdata/seed").read_text() == "from the image\n"
    assert os.readlink(var / "lock") == "../run/lock"
    (var / "lib/testdata/seed").write_text("changed at run time\n")
    for point in reversed(mounts_under(env.sysroot)):
        syscalls.umount(point, syscalls.MNT_DETACH)
    syscalls.mount(str(env.state), str(env.sysroot), None, syscalls.MS_MOVE)
    env.assemble()
    assert (env.sysroot / "var/lib/testdata/seed").read_text() == "changed at run time\n"


def test_booted_says_what_was_booted(env: Env) -> None:
    env.deploy("v1")
    env.deploy("v2", "squashfs")
    booted = env.assemble("overlayroot.etc=transient", "v2").to_dict()
    assert booted["deployment"] == "v2"
    assert booted["device"] == "/dev/test"
    assert booted["lower"] == "squashfs"
    assert booted["etc"] == "transient"
    assert booted["init"] == "/sbin/init"
    assert str(booted["loop"]).startswith("/dev/loop")
    assert booted["manifest"]["sha256"]  # type: ignore[index]


def kernel_mounts_erofs_files(tmp_path: Path) -> bool:
    """Whether this kernel mounts an erofs image from its file (Linux 6.12+,
    EROFS_FS_BACKED_BY_FILE): a real probe."""
    make_tree(tmp_path / "tree")
    image = tmp_path / "probe.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(tmp_path / "tree")], check=True)
    (tmp_path / "mnt").mkdir()
    try:
        syscalls.mount(str(image), str(tmp_path / "mnt"), "erofs", syscalls.MS_RDONLY)
    except OSError as e:
        assert e.errno == errno.ENOTBLK, e
        return False
    syscalls.umount(str(tmp_path / "mnt"))
    return True


def test_an_erofs_image_is_mounted_from_its_file_where_the_kernel_can(
    env: Env, tmp_path: Path
) -> None:
    if not kernel_mounts_erofs_files(tmp_path):
        pytest.skip(f"Linux {os.uname().release} mounts erofs only from a block device")
    env.deploy("v1")
    booted = env.assemble().to_dict()
    assert booted["loop"] is None
    with open("/proc/self/mountinfo") as f:
        root = next(line.split() for line in f if line.split()[4] == str(env.sysroot))
    assert root[root.index("-") + 1 :][:2] == ["erofs", str(booted["image"])]
    assert (env.sysroot / "etc/release").read_text() == "v1\n"


@pytest.fixture
def erofs_files_refused(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kernel before Linux 6.12 (Debian 12's 6.1): ENOTBLK to an erofs image's file, so
    the stage attaches it to a loop device. Returns the sources it refused."""
    mount = syscalls.mount
    refused: list[str] = []

    def old_kernel(
        source: str | None,
        target: str,
        fstype: str | None = None,
        flags: int = 0,
        data: str | None = None,
    ) -> None:
        if fstype == "erofs" and source is not None and not source.startswith("/dev/"):
            refused.append(source)
            raise OSError(errno.ENOTBLK, os.strerror(errno.ENOTBLK), source)
        mount(source, target, fstype, flags, data)

    monkeypatch.setattr(syscalls, "mount", old_kernel)
    return refused


def test_a_kernel_without_erofs_files_gets_a_loop_device(
    env: Env, erofs_files_refused: list[str]
) -> None:
    """Booted for real by the Debian 12 QEMU tests."""
    env.deploy("v1")
    booted = env.assemble().to_dict()
    assert erofs_files_refused == [booted["image"]]
    assert str(booted["loop"]).startswith("/dev/loop")
    assert (env.sysroot / "etc/release").read_text() == "v1\n"


def test_the_image_is_read_with_direct_io(env: Env) -> None:
    """One copy of each block in memory, not two (overlayroot/core/loop.py): the kernel took
    the loop device's direct I/O on the state's ext4."""
    env.deploy("v1", "squashfs")
    loop = str(env.assemble().to_dict()["loop"])
    name = os.path.basename(loop)
    assert Path(f"/sys/block/{name}/loop/dio").read_text().strip() == "1"
    assert Path(f"/sys/block/{name}/ro").read_text().strip() == "1"


def test_transient_etc_forgets_and_readonly_etc_refuses(env: Env) -> None:
    env.deploy("v1")
    env.assemble("overlayroot.etc=transient")
    (env.sysroot / "etc/hostname").write_text("gone after reboot\n")
    assert not (env.state / "overlayroot/etc/v1/upper/hostname").exists()
    for point in reversed(mounts_under(env.sysroot)):
        syscalls.umount(point, syscalls.MNT_DETACH)
    syscalls.umount(str(env.run / "etc-transient"), syscalls.MNT_DETACH)
    syscalls.mount(str(env.state), str(env.sysroot), None, syscalls.MS_MOVE)
    env.assemble("overlayroot.etc=readonly")
    with pytest.raises(OSError) as e:
        (env.sysroot / "etc/hostname").write_text("x")
    assert e.value.errno == errno.EROFS


def test_the_etc_upper_survives_and_belongs_to_its_deployment(env: Env) -> None:
    env.deploy("v1")
    env.deploy("v2")
    env.assemble(deployment="v1")
    (env.sysroot / "etc/mine").write_text("v1 edit\n")
    for point in reversed(mounts_under(env.sysroot)):
        syscalls.umount(point, syscalls.MNT_DETACH)
    syscalls.mount(str(env.state), str(env.sysroot), None, syscalls.MS_MOVE)
    env.assemble(deployment="v2")
    assert not (env.sysroot / "etc/mine").exists()
    assert (env.sysroot / "etc/release").read_text() == "v2\n"


def undone(env: Env) -> None:
    """After a failed assembly the state filesystem is back on sysroot and nothing else is."""
    assert mounts_under(env.sysroot) == [str(env.sysroot)]
    assert (env.sysroot / "overlayroot/deployments").is_dir()


@pytest.mark.parametrize("kernel", ["this", "without erofs files"])
def test_an_image_that_is_not_a_filesystem(
    env: Env, kernel: str, request: pytest.FixtureRequest
) -> None:
    # Whether the image's file or a loop device over it fails to mount, the message is one.
    if kernel == "without erofs files":
        request.getfixturevalue("erofs_files_refused")
    env.deploy("v1")
    image = env.sysroot / "overlayroot/deployments/v1/root.erofs"
    image.write_bytes(b"\0" * 65536)
    with pytest.raises(
        BootError,
        match=r"deployment 'v1': its image .*root.erofs does not mount"
        r" as erofs \(.*\); the image is damaged or not a filesystem",
    ):
        env.assemble()
    undone(env)


def test_no_init_and_no_init_option(env: Env) -> None:
    env.deploy("v1", init=False)
    with pytest.raises(
        BootError,
        match="deployment 'v1' has no executable /sbin/init: the image"
        " needs /sbin/init, or name its init with init=",
    ):
        env.assemble()
    undone(env)
    with pytest.raises(BootError, match="has no executable /bin/nope: fix init="):
        env.assemble("init=/bin/nope")
    undone(env)


def test_init_found_through_an_absolute_symlink_inside_the_image(env: Env) -> None:
    tree = make_tree(env.base / "tree-link", init=False)
    (tree / "lib/systemd").mkdir(parents=True)
    (tree / "lib/systemd/systemd").write_text("#!/bin/sh\n")
    (tree / "lib/systemd/systemd").chmod(0o755)
    os.symlink("/lib/systemd/systemd", tree / "sbin/init")
    deploy(env.sysroot, tree, deployment_id="linked", fmt="dir", created=1)
    assert env.assemble().init == "/sbin/init"


def test_a_lower_without_mount_points(env: Env) -> None:
    tree = make_tree(env.base / "tree-nodirs")
    deploy(env.sysroot, tree, deployment_id="v1", fmt="dir", created=1)
    os.rmdir(env.sysroot / "overlayroot/deployments/v1/root/home")
    os.rmdir(env.sysroot / "overlayroot/deployments/v1/root/proc")
    with pytest.raises(BootError, match=r"deployment 'v1' lacks the mount points /home, /proc"):
        env.assemble()
    undone(env)
