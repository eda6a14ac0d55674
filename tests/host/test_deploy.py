"""``overlayroot deploy`` with the real mkfs.erofs and mksquashfs; images are loop-mounted in a
private mount namespace and compared with their source."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from overlayroot.commands import images, staging
from overlayroot.core import digest, layout
from overlayroot.core.errors import BootError
from tests import trees

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: owners, devices, loop mounts"),
]

EPOCH = 1_700_000_000
# A file capability (cap_net_raw+ep, VFS_CAP_REVISION_2): chown clears it, so copies must set
# it after the owner.
CAPABILITY = bytes.fromhex("0000000200200000000000000000000000000000")


def make_tree(root: Path) -> Path:
    """The shared minimal tree (tests.trees), and what these tests look for."""
    trees.make_tree(root)
    (root / "etc" / "hostname").write_text("test\n")
    (root / "etc" / "shadow").write_text("root:*:1::::::\n")
    os.chown(root / "etc" / "shadow", 0, 42)
    (root / "etc" / "shadow").chmod(0o640)
    (root / "usr" / "bin").mkdir(parents=True)
    ping = root / "usr" / "bin" / "ping"
    ping.write_bytes(os.urandom(300_000))
    os.setxattr(ping, "security.capability", CAPABILITY)
    os.link(ping, root / "usr" / "bin" / "ping-link")
    (root / "bin").symlink_to("usr/bin")
    home = root / "home" / "user"
    home.mkdir()
    os.chown(home, 1000, 1000)
    home.chmod(0o700)
    os.mknod(root / "dev" / "null", 0o20666, os.makedev(1, 3))
    (root / "dev" / "null").chmod(0o666)
    (root / "var" / "sticky").mkdir(mode=0o1777)
    (root / "var" / "sticky").chmod(0o1777)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


def new_sysroot(tmp_path: Path, name: str = "state") -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def mounted_digest(image: Path, tmp_path: Path) -> str:
    """``tree_sha256`` of the image, loop-mounted read-only in a private mount namespace."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir(exist_ok=True)
    script = (
        'mount -o ro,loop "$1" "$2" && exec "$3" -c'
        ' "import sys; from overlayroot.core.digest import tree_sha256;'
        ' print(tree_sha256(sys.argv[1]))"'
        ' "$2"'
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", image, mountpoint, sys.executable],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def mounted_mtime(image: Path, path: str, tmp_path: Path) -> int:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir(exist_ok=True)
    result = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount -o ro,loop "$1" "$2" && stat -c %Y "$2/$3"',
            "sh",
            image,
            mountpoint,
            path,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blake2b_file(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=32).hexdigest()


@pytest.mark.parametrize("fmt", ["erofs", "squashfs"])
def test_image_deployment_mounts_as_the_source_tree(tree: Path, tmp_path: Path, fmt: str) -> None:
    sysroot = new_sysroot(tmp_path)
    manifest, where = staging.deploy(sysroot, tree, deployment_id="one", fmt=fmt)
    image = where / layout.FORMATS[fmt].image
    assert layout.StateLayout(sysroot).read_manifest("one") == manifest
    assert (manifest.id, manifest.format, manifest.image) == ("one", fmt, image.name)
    assert manifest.size == image.stat().st_size
    assert manifest.sha256 == sha256_file(image)
    assert manifest.blake2b == blake2b_file(image)
    assert manifest.origin == str(tree)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest.created)
    assert sorted(os.listdir(where)) == ["manifest.json", image.name]
    assert mounted_digest(image, tmp_path) == digest.tree_sha256(tree)


def test_erofs_image_passes_fsck_and_carries_the_derived_uuid(tree: Path, tmp_path: Path) -> None:
    _, where = staging.deploy(new_sysroot(tmp_path), tree, deployment_id="one")
    image = where / "root.erofs"
    subprocess.run(["fsck.erofs", image], check=True, capture_output=True)
    superblock = subprocess.run(
        ["dump.erofs", "-s", image], check=True, capture_output=True, text=True
    ).stdout
    assert images.erofs_uuid("one") in superblock


def test_squashfs_image_lists_the_source(tree: Path, tmp_path: Path) -> None:
    _, where = staging.deploy(new_sysroot(tmp_path), tree, deployment_id="one", fmt="squashfs")
    listing = subprocess.run(
        ["unsquashfs", "-lln", where / "root.squashfs"], check=True, capture_output=True, text=True
    ).stdout
    assert re.search(r"^-rw-r----- 0/42 .* squashfs-root/etc/shadow$", listing, re.M)
    assert re.search(r"^crw-rw-rw- 0/0 +1, *3 .* squashfs-root/dev/null$", listing, re.M)


@pytest.mark.parametrize("fmt", ["erofs", "squashfs"])
def test_same_tree_created_and_id_give_identical_images(
    tree: Path, tmp_path: Path, fmt: str
) -> None:
    images = []
    for name in ("a", "b"):
        _, where = staging.deploy(
            new_sysroot(tmp_path, name), tree, deployment_id="one", fmt=fmt, created=EPOCH
        )
        images.append(where / layout.FORMATS[fmt].image)
        # A rebuilt tree has new mtimes; a reproducible image must not see them.
        os.utime(tree / "etc" / "hostname", (EPOCH + 7, EPOCH + 7))
    assert filecmp.cmp(images[0], images[1], shallow=False)
    assert mounted_mtime(images[0], "etc/hostname", tmp_path) == EPOCH


@pytest.mark.parametrize("fmt", ["erofs", "squashfs"])
def test_without_created_file_mtimes_are_kept(tree: Path, tmp_path: Path, fmt: str) -> None:
    os.utime(tree / "etc" / "hostname", (EPOCH, EPOCH))
    _, where = staging.deploy(new_sysroot(tmp_path), tree, deployment_id="one", fmt=fmt)
    assert mounted_mtime(where / layout.FORMATS[fmt].image, "etc/hostname", tmp_path) == EPOCH


def test_dir_deployment_keeps_the_capability(tree: Path, tmp_path: Path) -> None:
    manifest, where = staging.deploy(new_sysroot(tmp_path), tree, deployment_id="one", fmt="dir")
    ping = where / "root" / "usr" / "bin" / "ping"
    assert os.getxattr(ping, "security.capability") == CAPABILITY
    assert manifest.sha256 == digest.tree_sha256(tree)


@pytest.mark.parametrize("fmt", ["erofs", "squashfs"])
def test_image_source_is_detected_and_copied_as_is(tree: Path, tmp_path: Path, fmt: str) -> None:
    built = tmp_path / f"built.{fmt}"
    if fmt == "erofs":
        subprocess.run(["mkfs.erofs", "--quiet", built, tree], check=True)
    else:
        subprocess.run(["mksquashfs", tree, built, "-quiet", "-no-progress"], check=True)
    manifest, where = staging.deploy(new_sysroot(tmp_path), built, deployment_id="one")
    assert manifest.format == fmt
    assert filecmp.cmp(built, where / manifest.image, shallow=False)
    assert manifest.sha256 == sha256_file(built)
    assert manifest.blake2b == blake2b_file(built)
    assert manifest.origin == str(built)


def test_a_python_without_blake2_deploys_with_sha256_only(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digest, "HAS_BLAKE2B", False)
    manifest, where = staging.deploy(new_sysroot(tmp_path), tree, deployment_id="one")
    image = where / manifest.image
    assert manifest.sha256 == sha256_file(image)
    assert manifest.blake2b is None
    assert "blake2b" not in json.loads((where / "manifest.json").read_text())


@pytest.mark.parametrize("fmt", ["erofs", "squashfs"])
def test_image_without_mount_points_is_refused(tmp_path: Path, fmt: str) -> None:
    bare = tmp_path / "bare"
    (bare / "etc").mkdir(parents=True)
    (bare / "var").mkdir()
    (bare / "run").symlink_to("var/run")
    built = tmp_path / f"bare.{fmt}"
    if fmt == "erofs":
        subprocess.run(["mkfs.erofs", "--quiet", built, bare], check=True)
    else:
        subprocess.run(["mksquashfs", bare, built, "-quiet", "-no-progress"], check=True)
    sysroot = new_sysroot(tmp_path)
    with pytest.raises(
        BootError, match=f"{re.escape(str(built))} lacks the mount points .*: home, run, proc,"
    ):
        staging.deploy(sysroot, built)
    assert not (sysroot / "overlayroot").exists()


def test_corrupt_image_with_a_valid_magic_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "broken.erofs"
    image.write_bytes(bytes(1024) + (0xE0F5E1E2).to_bytes(4, "little") + os.urandom(8000))
    with pytest.raises(BootError, match=r"looks like erofs but dump\.erofs cannot read it"):
        staging.deploy(new_sysroot(tmp_path), image)


def run_cli_on_tiny_tmpfs(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``overlayroot deploy`` onto a 1 MiB tmpfs, then list what is left in deployments/."""
    state = new_sysroot(tmp_path)
    script = (
        'state="$1"; shift; mount -t tmpfs -o size=1m tmpfs "$state" || exit 99;'
        ' "$@" --sysroot "$state"; rc=$?;'
        ' echo "left: $(ls -A "$state/overlayroot/deployments" || echo "(no listing)")"; exit $rc'
    )
    command = [sys.executable, "-m", "overlayroot", "deploy", *args]
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(state), *command],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("fmt", ["erofs", "squashfs", "dir"])
def test_disk_full_fails_cleanly_and_leaves_nothing_staged(tmp_path: Path, fmt: str) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "usr" / "big").write_bytes(os.urandom(3 << 20))
    result = run_cli_on_tiny_tmpfs(tmp_path, "--format", fmt, "--id", "one", str(tree))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("overlayroot: error: ")
    assert "Traceback" not in result.stderr
    assert "free space" in result.stderr
    assert "left: \n" in result.stdout
