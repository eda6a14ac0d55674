"""What ``overlayroot deploy`` is given: a directory tree, a tar archive of one, or an erofs or
squashfs image, recognised by its superblock (``blkid``), and whether it holds the mount points
every deployment's root needs (``layout.MOUNT_POINTS``)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from overlayroot.commands.fsops import Progress, converting_os_errors, last_lines
from overlayroot.core import (
    blkid,
    layout,
)
from overlayroot.core.errors import BootError

# The directories the read-only lower must provide as mount points (docs/design.md §5).
# dracut's shell init keeps root= mounted only if it looks like a root (proc, sys and dev, or a
# dynamic loader), and with overlayroot root= is the state filesystem: without these it is
# unmounted before the pre-pivot hook can assemble the root (docs/integrations.md).
ROOT_LOOKALIKE = ("proc", "sys", "dev")
# Tar archives: "ustar" in the header of the first member, or a compressed stream (that tar
# cannot read if it is not an archive: it says so).
TAR_MAGICS = (
    (257, b"ustar"),
    (0, b"\x1f\x8b"),
    (0, b"\xfd7zXZ\x00"),
    (0, b"\x28\xb5\x2f\xfd"),
    (0, b"BZh"),
)


def detect_image(path: Path) -> str:
    """``erofs`` or ``squashfs``, from the superblock (``blkid``'s table)."""
    try:
        found = blkid.probe(str(path))
    except OSError as e:
        raise BootError(f"cannot read {path}: {e.strerror}") from None
    if found is not None and found.fstype in layout.IMAGE_FORMATS:
        return found.fstype
    raise BootError(
        f"{path} is not an erofs or squashfs image, nor a tar archive: give a directory tree, a"
        " tar archive of one, or an image made with mkfs.erofs or mksquashfs"
    )


def is_tar(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise BootError(f"cannot read {path}: {e.strerror}") from None
    return any(head[offset : offset + len(magic)] == magic for offset, magic in TAR_MAGICS)


def extract_tar(archive: Path, tree: Path, progress: Progress) -> None:
    """Unpack ``archive`` into the new directory ``tree`` with owners, modes and xattrs (file
    capabilities, SELinux labels), as GNU tar does it; it also undoes any compression."""
    if not shutil.which("tar"):
        raise BootError("tar not found: it unpacks tar archives; apt-get install tar")
    with converting_os_errors(f"creating {tree}"):
        os.mkdir(tree, 0o755)
    with progress.task(f"unpacking {archive.name}", None):
        result = subprocess.run(
            [
                "tar",
                "--extract",
                f"--file={archive}",
                f"--directory={tree}",
                "--numeric-owner",
                "--same-owner",
                "--same-permissions",
                "--xattrs",
                "--xattrs-include=*",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
        )
    if result.returncode != 0:
        output = result.stderr + result.stdout
        hint = (
            "free space on the state filesystem"
            if "space" in output.lower()
            else "check that it is a tar archive, and GNU tar"
        )
        raise BootError(
            f"tar failed to unpack {archive} (exit {result.returncode}):"
            f" {last_lines(output)}; {hint}"
        )


def check_mount_points(source: Path, present: Callable[[str], bool]) -> None:
    missing = [name for name in layout.MOUNT_POINTS if not present(name)]
    if missing:
        raise BootError(
            f"{source} lacks the mount points the read-only root needs: {', '.join(missing)}"
            " (create them as empty directories, not symlinks, in the source)"
        )


def tree_has_dir(source: Path) -> Callable[[str], bool]:
    def present(name: str) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(source / name).st_mode)
        except OSError:
            return False

    return present


def image_top_dirs(image: Path, fmt: str) -> set[str] | None:
    """Directories at the top of an image, listed by the format's own tool; None when the tool
    is not installed (copying an image needs no tool, so this check is best effort)."""
    if fmt == "erofs":
        command = ["dump.erofs", "--ls", "--path=/", str(image)]
    else:
        command = ["unsquashfs", "-lln", "-max-depth", "1", str(image)]
    if not shutil.which(command[0]):
        return None
    result = subprocess.run(command, capture_output=True, text=True, errors="replace")
    if result.returncode != 0:
        raise BootError(
            f"{image} looks like {fmt} but {command[0]} cannot read it:"
            f" {last_lines(result.stderr or result.stdout)}"
        )
    found = set()
    for line in result.stdout.splitlines():
        if fmt == "erofs":
            # "       NID TYPE  FILENAME"; type 2 is a directory (EROFS_FT_DIR).
            fields = line.split(None, 2)
            if len(fields) == 3 and fields[0].isdigit() and fields[1] == "2":
                found.add(fields[2])
        elif line.startswith("d") and "squashfs-root/" in line:
            found.add(line.split("squashfs-root/", 1)[1])
    return found


def inspect_source(source: Path, fmt: str | None) -> tuple[str, str]:
    """The format to write and what the source is: ``tree``, ``tar`` or ``image`` (to copy)."""
    if not os.path.lexists(source):
        raise BootError(
            f"source {source} does not exist: give a directory tree or an erofs/squashfs image"
        )
    if source.is_dir():
        check_mount_points(source, tree_has_dir(source))
        return fmt or "erofs", "tree"
    if not source.is_file():
        raise BootError(
            f"source {source} is neither a directory nor an image file: give a directory tree"
            " or an erofs/squashfs image"
        )
    try:
        detected = detect_image(source)
    except BootError:
        if is_tar(source):
            return fmt or "erofs", "tar"  # its mount points are checked once it is unpacked
        raise
    if fmt is not None and fmt != detected:
        article = "an" if detected == "erofs" else "a"
        raise BootError(
            f"{source} is {article} {detected} image, but --format {fmt} was given: an image is"
            " copied as is; drop --format or give a directory tree"
        )
    top = image_top_dirs(source, detected)
    if top is not None:
        check_mount_points(source, top.__contains__)
    return detected, "image"
