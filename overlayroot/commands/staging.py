"""The staging transaction of ``overlayroot deploy`` (:func:`deploy`): a deployment onto a state
filesystem, all or nothing (docs/design.md §3). The command line around it is
:mod:`overlayroot.commands.deploy`; what the source is, :mod:`~overlayroot.commands.sources`;
the image tools, :mod:`~overlayroot.commands.images`; copying and fsyncs,
:mod:`~overlayroot.commands.fsops`.

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

import contextlib
import os
import shutil
import time
from pathlib import Path

from overlayroot.commands import kernels, target
from overlayroot.commands.fsops import (
    DIR_MODE,
    KERNEL_MODE,
    Progress,
    converting_os_errors,
    copy_file,
    copy_tree,
    fix_mtimes,
    fsync_file,
    make_dir,
    tree_size,
    write_file,
)
from overlayroot.commands.images import build_image, extract_kernel_parts, mount_image
from overlayroot.commands.sources import (
    ROOT_LOOKALIKE,
    check_mount_points,
    extract_tar,
    inspect_source,
    tree_has_dir,
)
from overlayroot.core import (
    bootstate,
    digest,
    files,
    layout,
    statefile,
    syscalls,
)
from overlayroot.core.errors import BootError


def default_id(epoch: int) -> str:
    """Ids sort like their creation times and say when they were made."""
    return time.strftime("%Y%m%d.%H%M%S", time.gmtime(epoch))


class KernelChoice:
    """What ``--kernel``, ``--no-kernel`` and ``--karg`` ask of the deployment's own kernel."""

    __slots__ = ("kargs", "skip", "version")

    def __init__(
        self, version: str | None = None, skip: bool = False, kargs: list[str] | None = None
    ) -> None:
        if skip and (version is not None or kargs):
            raise BootError(
                "--no-kernel leaves the deployment without a kernel of its own:"
                " drop --kernel and --karg, or --no-kernel"
            )
        if version is not None and not layout.is_kernel_version(version):
            raise BootError(
                f"--kernel {version!r} is not a kernel release (what `uname -r`"
                " prints, e.g. 6.1.0-27-cloud-amd64)"
            )
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

    paths = layout.StateLayout(sysroot)
    with converting_os_errors(f"preparing {paths.top}"):
        for directory in (
            Path(paths.deployments),
            Path(paths.var),
            Path(paths.home),
            *(sysroot / name for name in ROOT_LOOKALIKE),
        ):
            make_dir(directory)
    with target.locked(paths):
        final = Path(paths.deployment_dir(deployment_id))
        if os.path.lexists(final):
            raise BootError(
                f"deployment {deployment_id!r} already exists at {final}: choose another --id"
                " or remove it first"
            )
        staging = Path(paths.deployments, f".staging-{deployment_id}")
        etc_staging = Path(paths.etc, f".staging-{deployment_id}")
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
                make_etc(paths, deployment_id)
            else:
                carry_etc(paths, deployment_id, etc_from, etc_staging, progress)
            registered = register(paths, deployment_id, progress, known_good)
            with converting_os_errors(f"moving {staging} to {final}"):
                os.chmod(staging, DIR_MODE)  # the image is 0600 now; the manifest is for all
                os.rename(staging, final)
                files.fsync_dir(paths.deployments)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(etc_staging, ignore_errors=True)
            if registered is not None and not os.path.lexists(final):
                # Readers drop an entry without a directory anyway; this only tidies up.
                with contextlib.suppress(OSError):
                    statefile.save(paths, registered.without(deployment_id))
            raise
    return manifest, final


def make_etc(paths: layout.StateLayout, deployment_id: str) -> None:
    with converting_os_errors(f"creating the /etc upper of {deployment_id}"):
        for directory in (paths.etc_upper(deployment_id), paths.etc_work(deployment_id)):
            make_dir(Path(directory))
        files.fsync_dir(paths.etc_dir(deployment_id))
        files.fsync_dir(paths.etc)


def carry_etc(
    paths: layout.StateLayout,
    deployment_id: str,
    upper: Path,
    staging: Path,
    progress: Progress,
) -> None:
    """``etc/<id>/`` from a copy of ``upper``. Whiteouts (0:0 character devices) and opaque
    directories (the ``trusted.overlay.opaque`` xattr) are copied like any file, so what was
    deleted or replaced in /etc stays so."""
    etc_dir = paths.etc_dir(deployment_id)
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
        files.fsync_dir(paths.etc)


def register(
    paths: layout.StateLayout, deployment_id: str, progress: Progress, known_good: bool = False
) -> bootstate.BootState:
    """Make ``deployment_id`` the default, on trial (or known good); returns the state
    written."""
    current, notes = statefile.load(paths)
    for note in notes:
        progress.note(f"warning: {note}")
    with converting_os_errors(f"registering {deployment_id} in {paths.file(statefile.STATE)}"):
        return statefile.save(paths, bootstate.add(current, deployment_id, known_good=known_good))


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
    image = staging / layout.FORMATS[fmt].image
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
            sha256, blake2b = digest.image_digests(image, report)
    manifest = layout.Manifest(
        id=deployment_id,
        created=layout.created_stamp(epoch),
        format=fmt,
        image=image.name,
        sha256=sha256,
        blake2b=blake2b,
        size=size,
        origin=str(source.resolve()),
        kernel=own_kernel,
    )
    with converting_os_errors(f"writing {staging / layout.MANIFEST}"):
        write_file(staging / layout.MANIFEST, manifest.to_json().encode())
        files.fsync_dir(staging)
    return manifest


def stage_kernel(
    staging: Path, root: Path, source: Path, choice: KernelChoice, epoch: int, progress: Progress
) -> layout.Kernel | None:
    """Copy the root's kernel (the one ``choice`` names, else the newest) and its initramfs
    (built when the root has none) into the staging directory; its manifest entry, or None
    for a root without a kernel."""
    found = kernels.choose(kernels.find(root), choice.version, source)
    if found is None:
        if choice.kargs:
            raise BootError(
                f"--karg: {source} has no kernel of its own (no"
                " /usr/lib/modules/<version>/vmlinuz nor /boot/vmlinuz-<version>) for"
                " the arguments to go with; drop --karg"
            )
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
        return layout.Kernel(
            version=found.version,
            vmlinuz_sha256=digest.file_sha256(vmlinuz),
            initramfs_sha256=digest.file_sha256(initramfs),
            kargs=kargs,
        )


def build_initramfs(
    found: kernels.Found, output: Path, source: Path, epoch: int, progress: Progress
) -> None:
    """An initramfs for a kernel the root carries without one, by our builder."""
    import importlib

    missing = (
        f"{source} has kernel {found.version} ({found.vmlinuz}) but no initramfs for it"
        " (/usr/lib/modules/<version>/initramfs.img or /boot/initrd.img-<version>)"
    )
    advice = kernels.NO_INITRAMFS_HELP.format(version=found.version)
    try:
        build = importlib.import_module("initrd.build")
    except ImportError as e:
        raise BootError(
            f"{missing}, and the initramfs builder is not installed ({e}): {advice}"
        ) from None
    if found.modules is None:
        raise BootError(
            f"{missing}, nor its modules (/usr/lib/modules/{found.version}) to build"
            f" one from: {advice}"
        )
    config = build.BuildConfig(modules_dir=found.modules, output=output, source_date_epoch=epoch)
    # The builder's own error type where it has one (initrd.errors.BuildError), else BootError.
    failures = (BootError, getattr(build, "BuildError", BootError))
    with progress.task(f"building an initramfs for {found.version}", None):
        try:
            build.build_initramfs(config)
        except failures as e:
            raise BootError(f"{missing}; building one failed: {e}") from None
    with converting_os_errors(f"setting the mode of {output}"):
        os.chmod(output, KERNEL_MODE)


def stage_image_kernel(
    staging: Path, source: Path, fmt: str, choice: KernelChoice, epoch: int, progress: Progress
) -> layout.Kernel | None:
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
