"""``overlayroot deploy``: stage a deployment on a state filesystem (docs/design.md §3).

Given a directory tree, a tar archive of one or an erofs/squashfs image, write one deployment
into ``<sysroot>/overlayroot/deployments/<id>/`` together with its manifest, and the persistent
directories the boot stage expects, and register it in ``boot.json`` as the new default, on
trial. Inside a system booted by overlayroot it works on the state filesystem the system booted
from, and the new deployment starts with a copy of the booted deployment's ``/etc`` upper, so
local edits carry forward. Image-building pipelines run it offline with ``--sysroot``; the tests
make their disks with it.

The steps, each failing with a ``BootError`` that names the path and what to do:

1. check the sysroot and the source (a tree must hold the lower's mount points; an image is
   recognised by its superblock magic and copied as is);
2. take the state lock (``overlayroot/.lock``) so no other command interleaves, refuse an
   existing id;
3. build or copy the image into ``deployments/.staging-<id>/`` and hash it;
4. write the manifest, fsync image, manifest and directory;
5. copy the booted ``/etc`` upper to ``etc/.staging-<id>/`` (whiteouts, opaque directories and
   every xattr kept) and rename it to ``etc/<id>/``; offline, create an empty one (an existing
   one is kept: a pipeline may have seeded it); create ``var/``, ``home/``;
6. register the deployment in ``boot.json`` as the default, on trial (atomic);
7. rename the staging directory into place and fsync ``deployments/``.

A crash before step 6 leaves the old state; between 6 and 7, ``boot.json`` names a deployment
that is not on disk, which every reader drops (``bootstate.sync``): the old state again. Whatever
fails removes the staging directories and, after step 6, writes the previous state back, so
nothing half-staged is ever bootable; the boot stage ignores ``.``-prefixed names anyway.

Reproducible builds: ``--created`` or ``SOURCE_DATE_EPOCH`` fix the manifest's timestamp, the
image's build time and every file's mtime (mkfs.erofs 1.5 cannot fix one without the other, so
squashfs and dir deployments do the same for consistency), and the erofs UUID is derived from
the id. Without them file mtimes are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from overlayroot import (
    bootstate,
    digest,
    files,
    kernels,
    layout,
    loop,
    statefile,
    syscalls,
    target,
    treecopy,
)
from overlayroot.errors import BootError

# The directories the read-only lower must provide as mount points (docs/design.md §5).
MOUNT_POINTS = ("etc", "var", "home", "run", "proc", "sys", "dev")
# dracut's shell init keeps root= mounted only if it looks like a root (proc, sys and dev, or a
# dynamic loader), and with overlayroot root= is the state filesystem: without these it is
# unmounted before the pre-pivot hook can assemble the root (docs/integrations.md).
ROOT_LOOKALIKE = ("proc", "sys", "dev")
# Tar archives: "ustar" in the header of the first member, or a compressed stream (that tar
# cannot read if it is not an archive: it says so).
TAR_MAGICS = ((257, b"ustar"), (0, b"\x1f\x8b"), (0, b"\xfd7zXZ\x00"), (0, b"\x28\xb5\x2f\xfd"),
              (0, b"BZh"))
# Superblock magics: (format, offset, struct format, value).
MAGICS = (
    ("erofs", 1024, "<I", 0xE0F5E1E2),
    ("squashfs", 0, "<4s", b"hsqs"),
)
TOOLS = {
    "erofs": ("mkfs.erofs", "erofs-utils"),
    "squashfs": ("mksquashfs", "squashfs-tools"),
}
# Namespace of the erofs filesystem UUIDs derived from deployment ids.
UUID_NAMESPACE = uuid.UUID("3f0d6c52-5b0e-4a8c-9d7e-2f1c8a4b6e10")
DIR_MODE = 0o755
# An image holds the root's secrets (/etc/shadow, host keys): root alone may read it.
IMAGE_MODE = 0o600
# A kernel and its initramfs are no secret (and /boot's are world-readable).
KERNEL_MODE = 0o644
# --created: 9999-12-31T23:59:59Z is the last second whose year has the four digits that the
# manifest's time and the default id are written with.
MAX_EPOCH = 253402300799


def run(args: argparse.Namespace) -> int:
    created = parse_created(args.created, os.environ.get("SOURCE_DATE_EPOCH"))
    where = target.find(args.sysroot)
    if args.sysroot is None:
        target.require_root("overlayroot deploy", where)
    etc_from = None
    if where.booted_id is not None:
        etc_from = where.layout.etc_upper(where.booted_id)
        if not etc_from.is_dir():
            print(f"overlayroot: warning: the booted deployment has no /etc upper at {etc_from}:"
                  " the new deployment starts with the image's /etc", file=sys.stderr)
            etc_from = None
    manifest, final = deploy(
        where.layout.root,
        Path(args.source),
        deployment_id=args.deployment_id,
        fmt=args.format,
        created=created,
        progress=Progress.for_stream(sys.stderr),
        etc_from=etc_from,
        known_good=args.known_good,
        kernel=KernelChoice(args.kernel, args.no_kernel, args.karg),
    )
    if args.json:
        print(json.dumps({**manifest.to_dict(), "path": str(final)}, indent=2, sort_keys=True))
    else:
        print(
            f"deployed {manifest.id} ({manifest.format}, {manifest.size / 2**20:.1f} MiB,"
            f" sha256 {manifest.sha256[:16]}…) at {final}"
        )
        if manifest.kernel is not None:
            kargs = " ".join(manifest.kernel.kargs) or "none"
            print(f"{manifest.id} has its own kernel {manifest.kernel.version} (kernel arguments:"
                  f" {kargs})")
        else:
            print(f"{manifest.id} has no kernel of its own: it boots under the running kernel")
        carried = f"; /etc carried forward from {where.booted_id}" if etc_from else ""
        if args.known_good:
            print(f"{manifest.id} is the default now, known good: it boots next{carried}")
        else:
            print(f"{manifest.id} is the default now, on trial: it boots next{carried}; once it"
                  " works, `overlayroot bless` keeps it")
    return 0


def parse_created(option: str | None, source_date_epoch: str | None) -> int | None:
    """UNIX seconds from ``--created`` or ``SOURCE_DATE_EPOCH``; None means "now, not fixed"."""
    if option is not None:
        text, what = option, "--created"
    elif source_date_epoch:
        text, what = "@" + source_date_epoch.strip(), "SOURCE_DATE_EPOCH"
    else:
        return None
    try:
        if text.startswith("@"):
            digits = text[1:]  # ASCII digits only: int() also takes "٣", "1_0" and " 1"
            epoch = int(digits) if digits.isascii() and digits.isdigit() else -1
        else:
            from datetime import UTC, datetime

            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            epoch = int(moment.timestamp())
    except ValueError:  # also digits beyond what int() converts
        epoch = -1
    if not 0 <= epoch <= MAX_EPOCH:
        raise BootError(
            f"{what} {text!r} is not a time from 1970 to 9999: give RFC 3339"
            f" ('2024-05-01T12:00:00Z') or '@<unix seconds>' (0 to {MAX_EPOCH})"
        )
    return epoch


def default_id(epoch: int) -> str:
    """Ids sort like their creation times and say when they were made."""
    return time.strftime("%Y%m%d.%H%M%S", time.gmtime(epoch))


def erofs_uuid(deployment_id: str) -> str:
    return str(uuid.uuid5(UUID_NAMESPACE, deployment_id))


def detect_image(path: Path) -> str:
    """``erofs`` or ``squashfs``, from the superblock magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(2048)
    except OSError as e:
        raise BootError(f"cannot read {path}: {e.strerror}") from None
    for fmt, offset, layout_, value in MAGICS:
        size = struct.calcsize(layout_)
        if len(head) >= offset + size and struct.unpack_from(layout_, head, offset)[0] == value:
            return fmt
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
    return any(head[offset:offset + len(magic)] == magic for offset, magic in TAR_MAGICS)


def extract_tar(archive: Path, tree: Path, progress: Progress) -> None:
    """Unpack ``archive`` into the new directory ``tree`` with owners, modes and xattrs (file
    capabilities, SELinux labels), as GNU tar does it; it also undoes any compression."""
    if not shutil.which("tar"):
        raise BootError("tar not found: it unpacks tar archives; apt-get install tar")
    with converting_os_errors(f"creating {tree}"):
        os.mkdir(tree, 0o755)
    with progress.task(f"unpacking {archive.name}", None):
        result = subprocess.run(
            ["tar", "--extract", f"--file={archive}", f"--directory={tree}", "--numeric-owner",
             "--same-owner", "--same-permissions", "--xattrs", "--xattrs-include=*"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
        )
    if result.returncode != 0:
        output = result.stderr + result.stdout
        hint = ("free space on the state filesystem" if "space" in output.lower()
                else "check that it is a tar archive, and GNU tar")
        raise BootError(f"tar failed to unpack {archive} (exit {result.returncode}):"
                        f" {last_lines(output)}; {hint}")


def check_mount_points(source: Path, present: Callable[[str], bool]) -> None:
    missing = [name for name in MOUNT_POINTS if not present(name)]
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


class KernelChoice:
    """What ``--kernel``, ``--no-kernel`` and ``--karg`` ask of the deployment's own kernel."""

    __slots__ = ("kargs", "skip", "version")

    def __init__(self, version: str | None = None, skip: bool = False,
                 kargs: list[str] | None = None) -> None:
        if skip and (version is not None or kargs):
            raise BootError("--no-kernel leaves the deployment without a kernel of its own:"
                            " drop --kernel and --karg, or --no-kernel")
        if version is not None and not layout.KERNEL_VERSION_PATTERN.match(version):
            raise BootError(f"--kernel {version!r} is not a kernel release (what `uname -r`"
                            " prints, e.g. 6.1.0-27-cloud-amd64)")
        self.version = version
        self.skip = skip
        self.kargs = kernels.check_kargs(list(kargs or []))


def deploy(
    sysroot: Path,
    source: Path,
    *,
    deployment_id: str | None = None,
    fmt: str | None = None,
    created: int | None = None,
    progress: Progress | None = None,
    etc_from: Path | None = None,
    known_good: bool = False,
    kernel: KernelChoice | None = None,
) -> tuple[layout.Manifest, Path]:
    """Stage ``source`` as a deployment on the state filesystem at ``sysroot`` and make it the
    default, on trial.

    ``created`` (UNIX seconds) makes the result reproducible; None means now, mtimes kept.
    ``etc_from`` is an ``/etc`` upper to start the new deployment's from. ``known_good``
    registers it as blessed rather than on trial. ``kernel`` says which of the root's kernels
    is the deployment's own (default: the newest it has, if any).
    Returns the manifest and the deployment's directory.
    """
    progress = progress or Progress(None)
    kernel = kernel or KernelChoice()
    if not sysroot.is_dir():
        raise BootError(
            f"sysroot {sysroot} is not a directory: mount the state filesystem there (or create"
            " the directory to pack later)"
        )
    fmt, kind = inspect_source(source, fmt)
    reproducible = created is not None
    epoch = created if created is not None else int(time.time())
    deployment_id = layout.check_id(default_id(epoch) if deployment_id is None else deployment_id)

    state = layout.StateLayout(sysroot)
    with converting_os_errors(f"preparing {state.top}"):
        for directory in (state.deployments, state.var, state.home,
                          *(sysroot / name for name in ROOT_LOOKALIKE)):
            make_dir(directory)
    with target.locked(state):
        final = state.deployment_dir(deployment_id)
        if os.path.lexists(final):
            raise BootError(
                f"deployment {deployment_id!r} already exists at {final}: choose another --id"
                " or remove it first"
            )
        staging = state.deployments / f".staging-{deployment_id}"
        etc_staging = state.top / "etc" / f".staging-{deployment_id}"
        for leftover in (staging, etc_staging):
            if os.path.lexists(leftover):
                progress.note(f"removing {leftover}, left over by an interrupted deploy")
                with converting_os_errors(f"removing {leftover}"):
                    shutil.rmtree(leftover)
        registered = None
        try:
            manifest = stage(
                staging,
                source,
                deployment_id=deployment_id,
                fmt=fmt,
                kind=kind,
                epoch=epoch,
                reproducible=reproducible,
                progress=progress,
                kernel=kernel,
            )
            if etc_from is None:
                make_etc(state, deployment_id)
            else:
                carry_etc(state, deployment_id, etc_from, etc_staging, progress)
            registered = register(state, deployment_id, progress, known_good)
            with converting_os_errors(f"moving {staging} to {final}"):
                os.chmod(staging, DIR_MODE)  # the image is 0600 now; the manifest is for all
                os.rename(staging, final)
                files.fsync_dir(state.deployments)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(etc_staging, ignore_errors=True)
            if registered is not None and not os.path.lexists(final):
                # Readers drop an entry without a directory anyway; this only tidies up.
                with contextlib.suppress(OSError):
                    statefile.save(state, registered.without(deployment_id))
            raise
    return manifest, final


def make_etc(state: layout.StateLayout, deployment_id: str) -> None:
    with converting_os_errors(f"creating the /etc upper of {deployment_id}"):
        for directory in (state.etc_upper(deployment_id), state.etc_work(deployment_id)):
            make_dir(directory)
        files.fsync_dir(state.top / "etc" / deployment_id)
        files.fsync_dir(state.top / "etc")


def carry_etc(
    state: layout.StateLayout,
    deployment_id: str,
    upper: Path,
    staging: Path,
    progress: Progress,
) -> None:
    """``etc/<id>/`` from a copy of ``upper``. Whiteouts (0:0 character devices) and opaque
    directories (the ``trusted.overlay.opaque`` xattr) are copied like any file, so what was
    deleted or replaced in /etc stays so."""
    etc_dir = state.top / "etc" / deployment_id
    with converting_os_errors(f"copying the /etc upper {upper} for {deployment_id}"):
        make_dir(staging)
        copy_tree(upper, staging / "upper", mtime=None, progress=progress)
        os.mkdir(staging / "work", DIR_MODE)
        os.sync()
        if os.path.lexists(etc_dir):
            # No deployment of this id exists (checked under the lock): an interrupted deploy
            # or gc left it.
            progress.note(f"replacing {etc_dir}, left over by an interrupted deploy")
            shutil.rmtree(etc_dir)
        os.rename(staging, etc_dir)
        files.fsync_dir(state.top / "etc")


def register(
    state: layout.StateLayout, deployment_id: str, progress: Progress, known_good: bool = False
) -> bootstate.BootState:
    """Make ``deployment_id`` the default, on trial (or known good); returns the state
    written."""
    current, notes = statefile.load(state)
    for note in notes:
        progress.note(f"warning: {note}")
    with converting_os_errors(f"registering {deployment_id} in {state.top / statefile.STATE}"):
        return statefile.save(state, bootstate.add(current, deployment_id,
                                                   known_good=known_good))


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


def stage(
    staging: Path,
    source: Path,
    *,
    deployment_id: str,
    fmt: str,
    kind: str,
    epoch: int,
    reproducible: bool,
    progress: Progress,
    kernel: KernelChoice | None = None,
) -> layout.Manifest:
    kernel = kernel or KernelChoice()
    with converting_os_errors(f"creating {staging}"):
        make_dir(staging)
        # Root's alone while the image is written: mkfs creates it readable by all, and a
        # descriptor opened then would read the image's secrets for good.
        os.chmod(staging, 0o700)
    image = staging / layout.FORMATS[fmt]
    tree = source
    if kind == "tar":
        tree = staging / "unpacked"
        extract_tar(source, tree, progress)
        check_mount_points(source, tree_has_dir(tree))
    own_kernel = None
    if kind == "image":
        with converting_os_errors(f"copying {source} to {image}"):
            copy_file(source, image, progress)
        if not kernel.skip:
            own_kernel = stage_image_kernel(staging, source, fmt, kernel, epoch, progress)
    elif fmt == "dir" and kind == "tar":
        with converting_os_errors(f"moving {tree} to {image}"):
            os.rename(tree, image)
            if reproducible:
                fix_mtimes(image, epoch)
            os.sync()
        if not kernel.skip:
            own_kernel = stage_kernel(staging, image, source, kernel, epoch, progress)
    elif fmt == "dir":
        with converting_os_errors(f"copying {source} to {image}"):
            copy_tree(source, image, mtime=epoch if reproducible else None, progress=progress)
            os.sync()
        if not kernel.skip:
            own_kernel = stage_kernel(staging, source, source, kernel, epoch, progress)
    else:
        build_image(tree, image, fmt, deployment_id, epoch if reproducible else None, progress)
        if not kernel.skip:
            own_kernel = stage_kernel(staging, tree, source, kernel, epoch, progress)
        if kind == "tar":
            with converting_os_errors(f"removing {tree}"):
                shutil.rmtree(tree)
    with converting_os_errors(f"hashing {image}"):
        if fmt == "dir":
            size = tree_size(image)
        else:
            size = image.stat().st_size
            fsync_file(image)
        with progress.task(f"hashing {image.name}", size) as report:
            sha256 = digest.image_sha256(image, report)
    manifest = layout.Manifest(
        id=deployment_id,
        created=layout.created_stamp(epoch),
        format=fmt,
        image=image.name,
        sha256=sha256,
        size=size,
        origin=str(source.resolve()),
        kernel=own_kernel,
    )
    with converting_os_errors(f"writing {staging / layout.MANIFEST}"):
        write_file(staging / layout.MANIFEST, manifest.to_json().encode())
        files.fsync_dir(staging)
    return manifest


def stage_kernel(staging: Path, root: Path, source: Path, choice: KernelChoice, epoch: int,
                 progress: Progress) -> layout.Kernel | None:
    """Copy the root's kernel (the one ``choice`` names, else the newest) and its initramfs
    (built when the root has none) into the staging directory; its manifest entry, or None
    for a root without a kernel."""
    found = kernels.choose(kernels.find(root), choice.version, source)
    if found is None:
        if choice.kargs:
            raise BootError(f"--karg: {source} has no kernel of its own (no"
                            " /usr/lib/modules/<version>/vmlinuz nor /boot/vmlinuz-<version>) for"
                            " the arguments to go with; drop --karg")
        return None
    kernels.check_image(found.vmlinuz, found.version)
    kargs = kernels.check_kargs([*kernels.read_kargs_dir(root), *choice.kargs])
    vmlinuz = staging / layout.KERNEL_FILE
    initramfs = staging / layout.INITRAMFS_FILE
    with converting_os_errors(f"copying the kernel {found.vmlinuz} to {vmlinuz}"):
        copy_file(found.vmlinuz, vmlinuz, progress, mode=KERNEL_MODE)
    if found.initramfs is not None:
        with converting_os_errors(f"copying the initramfs {found.initramfs} to {initramfs}"):
            copy_file(found.initramfs, initramfs, progress, mode=KERNEL_MODE)
    else:
        build_initramfs(found, initramfs, source, epoch, progress)
    with converting_os_errors(f"hashing {vmlinuz} and {initramfs}"):
        for path in (vmlinuz, initramfs):
            fsync_file(path)
        return layout.Kernel(version=found.version, vmlinuz_sha256=digest.file_sha256(vmlinuz),
                             initramfs_sha256=digest.file_sha256(initramfs), kargs=kargs)


def build_initramfs(found: kernels.Found, output: Path, source: Path, epoch: int,
                    progress: Progress) -> None:
    """An initramfs for a kernel the root carries without one, by our builder."""
    import importlib

    missing = (f"{source} has kernel {found.version} ({found.vmlinuz}) but no initramfs for it"
               " (/usr/lib/modules/<version>/initramfs.img or /boot/initrd.img-<version>)")
    advice = kernels.NO_INITRAMFS_HELP.format(version=found.version)
    try:
        build = importlib.import_module("initrd.build")
    except ImportError as e:
        raise BootError(f"{missing}, and the initramfs builder is not installed ({e}): {advice}"
                        ) from None
    if found.modules is None:
        raise BootError(f"{missing}, nor its modules (/usr/lib/modules/{found.version}) to build"
                        f" one from: {advice}")
    config = build.BuildConfig(modules_dir=found.modules, output=output,
                               source_date_epoch=epoch)
    # The builder's own error type where it has one (initrd.errors.BuildError), else BootError.
    failures = (BootError, getattr(build, "BuildError", BootError))
    with progress.task(f"building an initramfs for {found.version}", None):
        try:
            build.build_initramfs(config)
        except failures as e:
            raise BootError(f"{missing}; building one failed: {e}") from None
    with converting_os_errors(f"setting the mode of {output}"):
        os.chmod(output, KERNEL_MODE)


def stage_image_kernel(staging: Path, source: Path, fmt: str, choice: KernelChoice, epoch: int,
                       progress: Progress) -> layout.Kernel | None:
    """``stage_kernel`` for an image source: the image is mounted read-only on a loop device
    (as the boot stage mounts it), or where that is not possible (no loop device, a container),
    the parts of it a kernel lives in are extracted with the format's tool."""
    mounted = mount_image(source, fmt)
    if mounted is not None:
        try:
            return stage_kernel(staging, mounted, source, choice, epoch, progress)
        finally:
            with contextlib.suppress(OSError):
                syscalls.umount(str(mounted), syscalls.MNT_DETACH)
                os.rmdir(mounted)
    scratch = staging / "kernel-scratch"
    try:
        extract_kernel_parts(source, fmt, scratch, progress)
        return stage_kernel(staging, scratch, source, choice, epoch, progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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
            syscalls.mount(attached.path, str(point), fmt, syscalls.MS_RDONLY
                           | syscalls.MS_NOSUID | syscalls.MS_NODEV)
    except OSError:
        os.rmdir(point)
        return None
    return point


def extract_kernel_parts(image: Path, fmt: str, scratch: Path, progress: Progress) -> None:
    if fmt == "squashfs":
        # Only what a kernel lives in; paths the image lacks are skipped.
        command = ["unsquashfs", "-no-xattrs", "-quiet", "-no-progress", "-d", str(scratch),
                   str(image), *kernels.MODULE_DIRS, kernels.BOOT_DIR, kernels.KARGS_DIR]
    else:
        # erofs-utils 1.5 extracts a whole image or nothing.
        command = ["fsck.erofs", f"--extract={scratch}", "--no-preserve", str(image)]
    tool, package = command[0], TOOLS[fmt][1]
    if not shutil.which(tool):
        raise BootError(f"{tool} not found: it looks for a kernel in {fmt} images; apt-get"
                        f" install {package}, or give --no-kernel to deploy {image} without one")
    with progress.task(f"looking for a kernel in {image.name}", None):
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, errors="replace")
    if result.returncode != 0:
        raise BootError(f"{tool} cannot extract the kernel from {image} (exit"
                        f" {result.returncode}): {last_lines(result.stderr + result.stdout)};"
                        " give --no-kernel to deploy it without one")


def build_image(
    source: Path,
    image: Path,
    fmt: str,
    deployment_id: str,
    fixed_time: int | None,
    progress: Progress,
) -> None:
    tool, package = TOOLS[fmt]
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


def copy_file(source: Path, target: Path, progress: Progress, mode: int = IMAGE_MODE) -> None:
    total = source.stat().st_size
    with (
        progress.task(f"copying {source.name}", total) as report,
        open(source, "rb") as src,
        open(target, "xb") as dst,
    ):
        done = 0
        while chunk := src.read(digest.CHUNK):
            dst.write(chunk)
            done += len(chunk)
            report(done)
    os.chmod(target, mode)


def copy_tree(source: Path, target: Path, *, mtime: int | None, progress: Progress) -> None:
    """Copy keeping owners, modes, xattrs, symlinks, devices and hardlinks; mtimes too unless
    ``mtime`` fixes them all."""
    with progress.task(f"copying {source}", None) as report:
        treecopy.copy_tree(source, target, mtime=mtime, report=report)


def fix_mtimes(root: Path, mtime: int) -> None:
    """Every mtime (and atime) under ``root``, symlinks included, set to ``mtime``."""
    times = (mtime * 10**9,) * 2
    for directory, dirs, names in os.walk(root, topdown=False):
        for name in (*names, *dirs):
            os.utime(os.path.join(directory, name), ns=times, follow_symlinks=False)
    os.utime(root, ns=times)


def tree_size(root: Path) -> int:
    """Bytes of the regular files in a tree, each hardlinked file counted once."""
    seen: set[int] = set()
    total = 0
    for directory, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def make_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0755 whatever the umask; keep it if it exists."""
    missing = []
    for directory in (path, *path.parents):
        if directory.is_dir():
            break
        missing.append(directory)
    for directory in reversed(missing):
        os.mkdir(directory)
        os.chmod(directory, DIR_MODE)


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def converting_os_errors(doing: str) -> Iterator[None]:
    """Turn an ``OSError`` into a ``BootError`` that says what was being done."""
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        advice = target.advice(e.errno, again="deploy again",
                               root="run as root (owners and device nodes must be kept)",
                               otherwise="check the path and try again")
        raise BootError(f"{doing}: {e.strerror}{where}{advice}") from None


def last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "no output"


class Progress:
    """One updating status line on a terminal; silent when ``stream`` is not one."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream

    @classmethod
    def for_stream(cls, stream: TextIO) -> Progress:
        return cls(stream if stream.isatty() else None)

    def note(self, message: str) -> None:
        print(f"overlayroot: {message}", file=self.stream or sys.stderr)

    @contextlib.contextmanager
    def task(self, what: str, total: int | None) -> Iterator[Callable[[int], None]]:
        stream = self.stream
        if stream is None:
            yield lambda done: None
            return
        start = last = time.monotonic()

        def report(done: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < 0.2:
                return
            last = now
            amount = f"{done / 2**20:.0f}" + (f"/{total / 2**20:.0f}" if total else "")
            stream.write(f"\r\033[K{what}: {amount} MiB")
            stream.flush()

        stream.write(f"\r\033[K{what}…")
        stream.flush()
        yield report
        stream.write(f"\r\033[K{what}: done in {time.monotonic() - start:.1f} s\n")
        stream.flush()
