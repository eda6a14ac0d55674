"""``overlayroot deploy`` of roots with a kernel of their own (issue 9), with the real tools:
erofs and squashfs images, tar archives, and an initramfs built by our builder from a real
Debian kernel's modules."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from overlayroot.commands import images, staging
from overlayroot.core import layout
from overlayroot.core.errors import BootError
from tests.host.conftest import require_tools
from tests.kernelfakes import add_kernel
from tests.unit.test_deploy import make_tree

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: owners and devices in the trees"),
]

EPOCH = 1_700_000_000
VERSION = "6.1.0-27-cloud-amd64"
CACHE = Path(__file__).resolve().parents[2] / ".cache/kernels"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sysroot(mount_ns: Path) -> Path:
    """A state directory; deploy loop-mounts image sources, in this private mount namespace."""
    path = mount_ns / "state"
    path.mkdir()
    return path


def kernel_tree(tmp_path: Path) -> Path:
    tree = make_tree(tmp_path / "tree")
    add_kernel(tree, VERSION)
    kargs = tree / "usr/lib/bootc/kargs.d"
    kargs.mkdir(parents=True)
    (kargs / "10-console.toml").write_text('kargs = ["console=ttyS0"]\n')
    return tree


def image_of(tree: Path, fmt: str, path: Path) -> Path:
    if fmt == "erofs":
        require_tools("mkfs.erofs", "fsck.erofs")
        subprocess.run(["mkfs.erofs", "--quiet", str(path), str(tree)], check=True)
    else:
        require_tools("mksquashfs", "unsquashfs")
        subprocess.run(["mksquashfs", str(tree), str(path), "-quiet", "-no-progress"], check=True)
    return path


@pytest.mark.parametrize("how", ["mounted", "extracted"])
@pytest.mark.parametrize("fmt", ["erofs", "squashfs"])
def test_an_image_source_keeps_its_kernel(
    tmp_path: Path, sysroot: Path, fmt: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounts = []
    real_mount = images.mount_image

    def mount_image(image: Path, fmt: str) -> Path | None:
        mounts.append(image)
        return real_mount(image, fmt) if how == "mounted" else None

    monkeypatch.setattr(staging, "mount_image", mount_image)
    tree = kernel_tree(tmp_path)
    image = image_of(tree, fmt, tmp_path / f"root.{fmt}")
    manifest, final = staging.deploy(
        sysroot,
        image,
        deployment_id="v1",
        created=EPOCH,
        kernel=staging.KernelChoice(kargs=["quiet"]),
    )
    assert manifest.kernel is not None
    assert (manifest.kernel.version, manifest.kernel.kargs) == (VERSION, ["console=ttyS0", "quiet"])
    source = tree / "usr/lib/modules" / VERSION
    assert (final / "vmlinuz").read_bytes() == (source / "vmlinuz").read_bytes()
    assert (final / "initramfs.img").read_bytes() == (source / "initramfs.img").read_bytes()
    assert manifest.kernel.initramfs_sha256 == sha(final / "initramfs.img")
    assert sorted(os.listdir(final)) == [
        "initramfs.img",
        "manifest.json",
        f"root.{fmt}",
        "vmlinuz",
    ]  # no scratch left
    assert mounts == [image]
    with open("/proc/self/mounts") as f:
        assert "overlayroot-kernel-" not in f.read()  # unmounted again


@pytest.mark.parametrize("fmt", ["erofs", "squashfs"])
def test_an_image_without_a_kernel_deploys_as_before(
    tmp_path: Path, sysroot: Path, fmt: str
) -> None:
    image = image_of(make_tree(tmp_path / "tree"), fmt, tmp_path / f"root.{fmt}")
    manifest, final = staging.deploy(sysroot, image, deployment_id="v1", created=EPOCH)
    assert manifest.kernel is None
    assert sorted(os.listdir(final)) == ["manifest.json", f"root.{fmt}"]


def test_an_image_whose_tool_is_missing_is_refused_unless_no_kernel(
    tmp_path: Path, sysroot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = image_of(kernel_tree(tmp_path), "squashfs", tmp_path / "root.squashfs")
    monkeypatch.setattr(staging, "mount_image", lambda image, fmt: None)  # no loop devices
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name: None if name == "unsquashfs" else real_which(name)
    )
    with pytest.raises(
        BootError,
        match=r"^unsquashfs not found: it looks for a kernel in"
        rf" squashfs images; apt-get install squashfs-tools, or give --no-kernel"
        rf" to deploy {image} without one$",
    ):
        staging.deploy(sysroot, image, deployment_id="v1", created=EPOCH)
    assert os.listdir(sysroot / "overlayroot/deployments") == []
    manifest, _ = staging.deploy(
        sysroot, image, deployment_id="v1", created=EPOCH, kernel=staging.KernelChoice(skip=True)
    )
    assert manifest.kernel is None


def test_a_tar_source_keeps_its_kernel(tmp_path: Path, sysroot: Path) -> None:
    require_tools("tar", "mkfs.erofs")
    tree = kernel_tree(tmp_path)
    archive = tmp_path / "root.tar"
    subprocess.run(["tar", "--create", f"--file={archive}", f"--directory={tree}", "."], check=True)
    for fmt in ("erofs", "dir"):
        manifest, final = staging.deploy(
            sysroot, archive, deployment_id=f"v-{fmt}", fmt=fmt, created=EPOCH
        )
        assert manifest.kernel is not None and manifest.kernel.version == VERSION
        assert sha(final / "vmlinuz") == manifest.kernel.vmlinuz_sha256
        assert sorted(os.listdir(final)) == [
            "initramfs.img",
            "manifest.json",
            layout.FORMATS[fmt].image,
            "vmlinuz",
        ]


def test_a_real_debian_kernel_without_initramfs_gets_one_from_our_builder(
    tmp_path: Path, sysroot: Path
) -> None:
    """Debian's convention, /boot/vmlinuz-<version> and its modules, no initrd.img: deploy
    builds the initramfs with the image's modules, and it carries their list by release."""
    packages = sorted(CACHE.glob("linux-image-*"))
    if not packages or not (packages[0] / ".complete").exists():
        pytest.skip("no Debian kernel in .cache/kernels (scripts/setup fetches it)")
    require_tools("zstd", "mkfs.erofs")
    version = packages[0].name.removeprefix("linux-image-")
    tree = make_tree(tmp_path / "tree")
    (tree / "boot").mkdir()
    shutil.copy(packages[0] / "boot" / f"vmlinuz-{version}", tree / "boot")
    shutil.copytree(
        packages[0] / "lib/modules" / version, tree / "usr/lib/modules" / version, symlinks=True
    )
    manifest, final = staging.deploy(sysroot, tree, deployment_id="v1", created=EPOCH)
    assert manifest.kernel is not None and manifest.kernel.version == version
    assert sha(final / "initramfs.img") == manifest.kernel.initramfs_sha256
    listing = subprocess.run(
        f"zstd -dc {final / 'initramfs.img'} | cpio -it --quiet",
        shell=True,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert f"usr/lib/overlayroot/modules.d/{version}.list" in listing
    assert "init" in listing
    # /lib is a link to usr/lib in the image, as on the host.
    assert any(p.startswith(f"usr/lib/modules/{version}/") and p.endswith(".ko") for p in listing)


def test_mount_image_gives_none_for_what_does_not_mount_and_leaves_nothing(
    mount_ns: Path,
) -> None:
    bogus = mount_ns / "bogus.erofs"
    bogus.write_bytes(b"\0" * 8192)
    places = (Path("/run"), Path(tempfile.gettempdir()))
    before = {p for place in places for p in place.glob("overlayroot-kernel-*")}
    assert images.mount_image(bogus, "erofs") is None
    assert {p for place in places for p in place.glob("overlayroot-kernel-*")} == before
