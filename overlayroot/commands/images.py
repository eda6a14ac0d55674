"""The image tools of ``overlayroot deploy``: building an erofs or squashfs image of a tree with
the format's mkfs (``layout.FORMATS``), and reading an image's kernel parts (mounted on a loop
device, or extracted with the format's own tool)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

from overlayroot.commands import kernels
from overlayroot.commands.fsops import IMAGE_MODE, Progress, last_lines
from overlayroot.core import (
    layout,
    loop,
    syscalls,
)
from overlayroot.core.errors import BootError

# Namespace of the erofs filesystem UUIDs derived from deployment ids.
UUID_NAMESPACE = uuid.UUID("3f0d6c52-5b0e-4a8c-9d7e-2f1c8a4b6e10")


def erofs_uuid(deployment_id: str) -> str:
    return str(uuid.uuid5(UUID_NAMESPACE, deployment_id))


def mount_image(image: Path, fmt: str) -> Path | None:
    """``image`` mounted read-only (nosuid, nodev) on a new directory in ``/run`` (or the
    temporary directory), outside the state filesystem; None when it cannot be."""
    import tempfile

    for parent in ("/run", None):  # a booted overlayroot system may have no writable /tmp
        try:
            point = Path(tempfile.mkdtemp(prefix="overlayroot-kernel-", dir=parent))
            break
        except OSError:
            continue
    else:
        return None
    try:
        with loop.attach(str(image)) as attached:
            syscalls.mount(
                attached.path,
                str(point),
                fmt,
                syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV,
            )
    except OSError:
        os.rmdir(point)
        return None
    return point


def extract_kernel_parts(image: Path, fmt: str, scratch: Path, progress: Progress) -> None:
    if fmt == "squashfs":
        # Only what a kernel lives in; paths the image lacks are skipped.
        command = [
            "unsquashfs",
            "-no-xattrs",
            "-quiet",
            "-no-progress",
            "-d",
            str(scratch),
            str(image),
            *kernels.MODULE_DIRS,
            kernels.BOOT_DIR,
            kernels.KARGS_DIR,
        ]
    else:
        # erofs-utils 1.5 extracts a whole image or nothing.
        command = ["fsck.erofs", f"--extract={scratch}", "--no-preserve", str(image)]
    tool, package = command[0], layout.FORMATS[fmt].package
    if not shutil.which(tool):
        raise BootError(
            f"{tool} not found: it looks for a kernel in {fmt} images; apt-get"
            f" install {package}, or give --no-kernel to deploy {image} without one"
        )
    with progress.task(f"looking for a kernel in {image.name}", None):
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace"
        )
    if result.returncode != 0:
        raise BootError(
            f"{tool} cannot extract the kernel from {image} (exit"
            f" {result.returncode}): {last_lines(result.stderr + result.stdout)};"
            " give --no-kernel to deploy it without one"
        )


def build_image(
    source: Path,
    image: Path,
    fmt: str,
    deployment_id: str,
    fixed_time: int | None,
    progress: Progress,
) -> None:
    tool, package = layout.FORMATS[fmt].mkfs, layout.FORMATS[fmt].package
    assert tool is not None, fmt
    if not shutil.which(tool):
        raise BootError(f"{tool} not found: it builds {fmt} images; apt-get install {package}")
    if fmt == "erofs":
        # Owners are kept (no --all-root: we run as root and the image is the system), and so
        # are xattrs (-x left at its default; -x is xattr tolerance, not an exclude).
        command = [tool, "--quiet", f"-U{erofs_uuid(deployment_id)}"]
        if fixed_time is not None:
            command.append(f"-T{fixed_time}")
        command += [str(image), str(source)]
    else:
        command = [tool, str(source), str(image), "-noappend", "-no-progress", "-quiet"]
        if fixed_time is not None:
            command += ["-mkfs-time", str(fixed_time), "-all-time", str(fixed_time)]
    # Both tools read SOURCE_DATE_EPOCH themselves; our options alone decide.
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    with progress.task(f"building {image.name} with {tool}", None):
        result = subprocess.run(
            command,
            env=env,
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
            else ("check that the source is readable")
        )
        raise BootError(
            f"{tool} failed to build {image} from {source} (exit {result.returncode}):"
            f" {last_lines(output)}; {hint}"
        )
    os.chmod(image, IMAGE_MODE)
