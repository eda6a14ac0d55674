"""``overlayroot deploy`` without external tools: the ``dir`` format, checks and error paths."""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from overlayroot.commands import deploy, fsops, images, sources, staging, target
from overlayroot.core import digest, layout, treecopy
from overlayroot.core.errors import BootError
from tests import trees

EPOCH = 1_700_000_000


def make_tree(root: Path) -> Path:
    """The shared minimal tree (tests.trees), and what these tests look for."""
    trees.make_tree(root)
    (root / "etc" / "hostname").write_text("test\n")
    (root / "usr" / "bin").mkdir(parents=True)
    tool = root / "usr" / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\necho hi\n")
    tool.chmod(0o4755)
    os.link(tool, root / "usr" / "bin" / "tool-link")
    (root / "bin").symlink_to("usr/bin")
    (root / "dev" / "fifo").parent.mkdir(exist_ok=True)
    os.mkfifo(root / "dev" / "fifo")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


@pytest.fixture
def sysroot(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


def test_parse_created_accepts_rfc3339_and_unix_seconds() -> None:
    assert deploy.parse_created("2023-11-14T22:13:20Z", None) == EPOCH
    assert deploy.parse_created("2023-11-14T23:13:20+01:00", None) == EPOCH
    assert deploy.parse_created(f"@{EPOCH}", None) == EPOCH


def test_parse_created_falls_back_to_source_date_epoch_then_none() -> None:
    assert deploy.parse_created(None, str(EPOCH)) == EPOCH
    assert deploy.parse_created("@5", str(EPOCH)) == 5
    assert deploy.parse_created(None, None) is None
    assert deploy.parse_created(None, "") is None


@pytest.mark.parametrize("text", ["yesterday", "@-1", "@1.5", "1969-12-31T00:00:00Z"])
def test_parse_created_rejects_what_is_not_a_time(text: str) -> None:
    with pytest.raises(BootError, match=r"--created .* is not a time"):
        deploy.parse_created(text, None)


def test_bad_source_date_epoch_is_named() -> None:
    with pytest.raises(BootError, match="SOURCE_DATE_EPOCH"):
        deploy.parse_created(None, "soon")


def test_default_id_is_the_utc_time_and_a_valid_id() -> None:
    assert staging.default_id(EPOCH) == "20231114.221320"
    layout.check_id(staging.default_id(EPOCH))


def test_erofs_uuid_depends_only_on_the_id() -> None:
    assert images.erofs_uuid("a") == images.erofs_uuid("a")
    assert images.erofs_uuid("a") != images.erofs_uuid("b")


def test_detect_image_reads_the_superblock_magic(tmp_path: Path) -> None:
    erofs = tmp_path / "e"
    erofs.write_bytes(bytes(1024) + struct.pack("<I", 0xE0F5E1E2) + bytes(100))
    squashfs = tmp_path / "s"
    squashfs.write_bytes(b"hsqs" + bytes(100))
    assert sources.detect_image(erofs) == "erofs"
    assert sources.detect_image(squashfs) == "squashfs"


@pytest.mark.parametrize("content", [b"", b"hsq", bytes(1030), b"\x7fELF" + bytes(2000)])
def test_detect_image_refuses_anything_else(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.img"
    path.write_bytes(content)
    with pytest.raises(
        BootError, match=f"{re.escape(str(path))} is not an erofs or squashfs image"
    ):
        sources.detect_image(path)


def test_dir_deployment_is_laid_out_with_manifest_and_persistent_dirs(
    tree: Path, sysroot: Path
) -> None:
    manifest, where = staging.deploy(sysroot, tree, deployment_id="one", fmt="dir")
    state = layout.StateLayout(sysroot)
    assert where == Path(state.deployment_dir("one"))
    assert state.read_manifest("one") == manifest
    assert manifest.format == "dir" and manifest.image == "root"
    assert manifest.origin == str(tree)
    assert manifest.sha256 == digest.tree_sha256(where / "root")
    assert manifest.sha256 == digest.tree_sha256(tree)
    assert manifest.blake2b is None  # a tree is not checked at boot
    # The bytes of its regular files: the hostname, the setuid tool, the seed and the init.
    assert manifest.size == len("test\n") + len("#!/bin/sh\necho hi\n") + len(
        "from the image\n"
    ) + len("#!/bin/sh\necho hello\n")
    for directory in (
        state.etc_upper("one"),
        state.etc_work("one"),
        state.var,
        state.home,
    ):
        assert os.path.isdir(directory)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o755
    assert state.deployment_ids() == ["one"]
    assert os.listdir(state.deployments) == ["one"]


def test_dir_copy_keeps_modes_links_hardlinks_and_special_files(tree: Path, sysroot: Path) -> None:
    _, where = staging.deploy(sysroot, tree, deployment_id="one", fmt="dir")
    root = where / "root"
    tool = root / "usr" / "bin" / "tool"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o4755
    assert tool.stat().st_ino == (root / "usr" / "bin" / "tool-link").stat().st_ino
    assert os.readlink(root / "bin") == "usr/bin"
    assert stat.S_ISFIFO((root / "dev" / "fifo").lstat().st_mode)
    assert tool.stat().st_mtime == (tree / "usr" / "bin" / "tool").stat().st_mtime


def test_created_fixes_the_manifest_time_and_every_mtime(tree: Path, sysroot: Path) -> None:
    manifest, where = staging.deploy(sysroot, tree, fmt="dir", created=EPOCH)
    assert manifest.id == "20231114.221320"
    assert manifest.created == "2023-11-14T22:13:20Z"
    for directory, dirs, files in os.walk(where / "root"):
        for name in [*dirs, *files]:
            assert os.lstat(os.path.join(directory, name)).st_mtime == EPOCH
    assert os.lstat(where / "root").st_mtime == EPOCH


def test_tree_digest_ignores_mtimes_but_not_content_modes_or_names(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    before = digest.tree_sha256(tree)
    os.utime(tree / "etc" / "hostname", (1, 1))
    assert digest.tree_sha256(tree) == before
    (tree / "etc" / "hostname").write_text("other\n")
    changed = digest.tree_sha256(tree)
    assert changed != before
    (tree / "etc" / "hostname").chmod(0o600)
    assert digest.tree_sha256(tree) != changed
    (tree / "etc" / "hostname").rename(tree / "etc" / "hostnam")
    assert digest.tree_sha256(tree) not in (before, changed)


def test_missing_mount_points_are_named_with_the_source(tmp_path: Path, sysroot: Path) -> None:
    tree = make_tree(tmp_path / "t")
    (tree / "run").rmdir()
    (tree / "home").rmdir()
    (tree / "home").symlink_to("var/home")
    with pytest.raises(
        BootError, match=f"{re.escape(str(tree))} lacks the mount points .*: home, run"
    ):
        staging.deploy(sysroot, tree, fmt="dir")
    assert not (sysroot / "overlayroot").exists()


def test_missing_source_is_refused(tmp_path: Path, sysroot: Path) -> None:
    with pytest.raises(BootError, match=f"source {tmp_path / 'nope'} does not exist"):
        staging.deploy(sysroot, tmp_path / "nope")


def test_source_that_is_neither_dir_nor_file_is_refused(sysroot: Path) -> None:
    with pytest.raises(BootError, match="/dev/null is neither a directory nor an image file"):
        staging.deploy(sysroot, Path("/dev/null"))


def test_sysroot_that_is_not_a_directory_is_refused(tree: Path, tmp_path: Path) -> None:
    not_dir = tmp_path / "file"
    not_dir.write_text("")
    for sysroot in (not_dir, tmp_path / "missing"):
        with pytest.raises(BootError, match=f"sysroot {sysroot} is not a directory"):
            staging.deploy(sysroot, tree, fmt="dir")


def test_invalid_id_is_refused(tree: Path, sysroot: Path) -> None:
    with pytest.raises(BootError, match=re.escape("invalid deployment id '../x'")):
        staging.deploy(sysroot, tree, deployment_id="../x", fmt="dir")


def test_existing_id_is_refused_and_left_alone(tree: Path, sysroot: Path) -> None:
    first, where = staging.deploy(sysroot, tree, deployment_id="one", fmt="dir")
    with pytest.raises(BootError, match=f"deployment 'one' already exists at {where}"):
        staging.deploy(sysroot, tree, deployment_id="one", fmt="dir")
    assert layout.StateLayout(sysroot).read_manifest("one") == first


def test_image_format_mismatch_is_refused(tmp_path: Path, sysroot: Path) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(b"hsqs" + bytes(100))
    with pytest.raises(BootError, match="is a squashfs image, but --format erofs was given"):
        staging.deploy(sysroot, image, fmt="erofs")


def test_missing_mkfs_tool_says_what_to_install(
    tree: Path, sysroot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BootError, match=r"mkfs.erofs not found: .*apt-get install erofs-utils"):
        staging.deploy(sysroot, tree, deployment_id="one")
    with pytest.raises(BootError, match=r"mksquashfs not found: .*apt-get install squashfs-tools"):
        staging.deploy(sysroot, tree, deployment_id="one", fmt="squashfs")
    assert os.listdir(layout.StateLayout(sysroot).deployments) == []


def test_disk_full_leaves_nothing_staged(
    tree: Path, sysroot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy_file = treecopy.copy_file
    calls = 0

    def copy_file(
        src: str, dst: str, done: int = 0, report: Callable[[int], None] | None = None
    ) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)
        return real_copy_file(src, dst, done, report)

    monkeypatch.setattr(treecopy, "copy_file", copy_file)
    with pytest.raises(BootError, match=r"No space left on device .*; free space"):
        staging.deploy(sysroot, tree, deployment_id="one", fmt="dir")
    assert os.listdir(layout.StateLayout(sysroot).deployments) == []


def test_interrupt_leaves_nothing_staged(
    tree: Path, sysroot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(digest, "image_digests", interrupted)
    with pytest.raises(KeyboardInterrupt):
        staging.deploy(sysroot, tree, deployment_id="one", fmt="dir")
    assert os.listdir(layout.StateLayout(sysroot).deployments) == []


def test_leftover_staging_directory_is_replaced(tree: Path, sysroot: Path) -> None:
    leftover = sysroot / "overlayroot" / "deployments" / ".staging-one"
    (leftover / "root").mkdir(parents=True)
    (leftover / "root" / "junk").write_text("half")
    _, where = staging.deploy(sysroot, tree, deployment_id="one", fmt="dir")
    assert not leftover.exists()
    assert not (where / "root" / "junk").exists()


def test_a_concurrent_deploy_is_refused(
    tree: Path, sysroot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = layout.StateLayout(sysroot)
    Path(state.deployments).mkdir(parents=True)
    monkeypatch.setattr(target, "LOCK_WAIT", 0.0)
    with (
        target.locked(state),
        pytest.raises(
            BootError,
            match=r"another overlayroot command \(pid \d+: .*\) is changing"
            f" the state on {sysroot}: wait for it",
        ),
    ):
        staging.deploy(sysroot, tree, deployment_id="one", fmt="dir")


def test_existing_etc_upper_is_kept(tree: Path, sysroot: Path) -> None:
    upper = Path(layout.StateLayout(sysroot).etc_upper("one"))
    upper.mkdir(parents=True)
    (upper / "hostname").write_text("kept\n")
    staging.deploy(sysroot, tree, deployment_id="one", fmt="dir")
    assert (upper / "hostname").read_text() == "kept\n"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_shown_on_a_terminal_only() -> None:
    tty = FakeTTY()
    progress = fsops.Progress.for_stream(tty)
    with progress.task("hashing root.erofs", 2 << 20) as report:
        report(1 << 20)
    assert "hashing root.erofs" in tty.getvalue()
    assert tty.getvalue().endswith("s\n")
    pipe = io.StringIO()
    with fsops.Progress.for_stream(pipe).task("hashing", 10) as report:
        report(5)
    assert pipe.getvalue() == ""
