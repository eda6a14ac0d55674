"""``overlayroot etc diff``: the local changes in a deployment's ``/etc``, against its image.

The changes are exactly what the deployment's ``/etc`` upper holds (``etc/<id>/upper`` on the
state filesystem), read the way overlayfs reads it: a 0:0 character device is a whiteout (the
file was deleted), a directory with ``trusted.overlay.opaque=y`` hides everything the image has
there, and anything else is added or, when the image has it too and it differs in type,
content, mode, owner or link target, modified. A file copied up but left the same (a ``touch``)
is no change.

The image's ``/etc`` is hidden under the overlay in the running system, so it is read from the
image itself: a ``dir`` deployment's tree directly, an erofs or squashfs image loop-mounted
read-only in a mount namespace of this process's own, which no one else sees and which goes
away with it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator

from overlayroot.commands import target
from overlayroot.core import bootstate, loop, syscalls
from overlayroot.core.errors import BootError
from overlayroot.core.layout import FORMATS, Manifest, StateLayout

OPAQUE = "trusted.overlay.opaque"
KINDS = ("added", "modified", "deleted")
_CHUNK = 1 << 16


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def same(upper: str, ust: os.stat_result, lower: str, lst: os.stat_result) -> bool:
    """Whether a copied-up entry still equals the image's (mtimes do not count)."""
    if stat.S_IFMT(ust.st_mode) != stat.S_IFMT(lst.st_mode):
        return False
    if (stat.S_IMODE(ust.st_mode), ust.st_uid, ust.st_gid) != (
        stat.S_IMODE(lst.st_mode),
        lst.st_uid,
        lst.st_gid,
    ):
        return False
    if stat.S_ISLNK(ust.st_mode):
        return os.readlink(upper) == os.readlink(lower)
    if stat.S_ISCHR(ust.st_mode) or stat.S_ISBLK(ust.st_mode):
        return ust.st_rdev == lst.st_rdev
    if stat.S_ISREG(ust.st_mode):
        return ust.st_size == lst.st_size and _same_content(upper, lower)
    return True


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk = fa.read(_CHUNK)
            if chunk != fb.read(_CHUNK):
                return False
            if not chunk:
                return True


def diff(upper: str, lower: str) -> dict[str, list[str]]:
    """Paths (relative to /etc, sorted) added, modified and deleted by ``upper`` over
    ``lower``."""
    found: dict[str, list[str]] = {kind: [] for kind in KINDS}

    def added_below(directory: str, rel: str) -> None:
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if is_whiteout(st):
                continue
            found["added"].append(f"{rel}/{name}")
            if stat.S_ISDIR(st.st_mode):
                added_below(path, f"{rel}/{name}")

    def walk(up_dir: str, low_dir: str | None, rel: str) -> None:
        names = sorted(os.listdir(up_dir))
        if low_dir is not None and is_opaque(up_dir):
            with contextlib.suppress(OSError):
                hidden = set(os.listdir(low_dir)) - set(names)
                found["deleted"].extend(f"{rel}/{name}" for name in sorted(hidden))
        for name in names:
            up, path = os.path.join(up_dir, name), f"{rel}/{name}"
            ust = os.lstat(up)
            low = None if low_dir is None else os.path.join(low_dir, name)
            lst = None if low is None else _lstat(low)
            if is_whiteout(ust):
                if lst is not None:
                    found["deleted"].append(path)
            elif lst is None:
                found["added"].append(path)
                if stat.S_ISDIR(ust.st_mode):
                    added_below(up, path)
            elif stat.S_ISDIR(ust.st_mode) and stat.S_ISDIR(lst.st_mode):
                if not same(up, ust, str(low), lst):
                    found["modified"].append(path)
                walk(up, low, path)
            elif not same(up, ust, str(low), lst):
                found["modified"].append(path)
                if stat.S_ISDIR(ust.st_mode):
                    added_below(up, path)

    walk(upper, lower if os.path.isdir(lower) else None, "")
    return {kind: sorted(found[kind]) for kind in KINDS}


def enter_private_mount_namespace() -> None:
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)


@contextlib.contextmanager
def image_etc(layout: StateLayout, manifest: Manifest) -> Iterator[str]:
    """The deployment's image's own /etc, for as long as the context lasts."""
    image = layout.image_path(manifest)
    if manifest.format == "dir":
        yield os.path.join(image, "etc")
        return
    try:
        enter_private_mount_namespace()
    except OSError as e:
        hint = "; run as root" if e.errno == errno.EPERM else ""
        raise BootError(
            f"cannot read the image of {manifest.id}: a private mount namespace"
            f" for it: {e.strerror}{hint}"
        ) from None
    scratch = tempfile.mkdtemp(
        prefix="overlayroot-etc-diff-", dir="/run" if os.path.isdir("/run") else None
    )
    try:
        try:
            with loop.attach(image) as device:
                syscalls.mount(
                    device.path, scratch, FORMATS[manifest.format].fstype, syscalls.MS_RDONLY
                )
        except OSError as e:
            raise BootError(
                f"cannot mount the image {image} of {manifest.id} read-only: {e.strerror}"
            ) from None
        try:
            yield os.path.join(scratch, "etc")
        finally:
            syscalls.umount(scratch, syscalls.MNT_DETACH)
    finally:
        os.rmdir(scratch)


def run(args: argparse.Namespace) -> int:
    where = target.find(args.sysroot)
    where.require_state()
    state = where.load()
    deployment_id = args.id or where.booted_id or bootstate.default(state)
    if deployment_id is None:
        raise BootError(f"no deployment on {where.where} to compare: name one")
    where.check_known(state, deployment_id)
    layout = where.layout
    upper = layout.etc_upper(deployment_id)
    manifest = layout.read_manifest(deployment_id)
    try:
        if not os.path.isdir(upper):
            changes: dict[str, list[str]] = {kind: [] for kind in KINDS}
        else:
            with image_etc(layout, manifest) as lower:
                changes = diff(str(upper), lower)
    except OSError as e:
        hint = ": run it as root" if e.errno in (errno.EACCES, errno.EPERM) else ""
        raise BootError(
            f"cannot read {e.filename or upper}: {e.strerror}; etc diff reads every"
            f" file of the /etc upper and of the image's /etc{hint}"
        ) from None
    if args.json:
        print(
            json.dumps(
                {
                    "deployment": deployment_id,
                    "upper": str(upper),
                    **{kind: [f"/etc{p}" for p in paths] for kind, paths in changes.items()},
                },
                indent=2,
            )
        )
        return 0
    letters = {"added": "A", "modified": "M", "deleted": "D"}
    lines = sorted((path, letters[kind]) for kind, paths in changes.items() for path in paths)
    for path, letter in lines:
        print(f"{letter} /etc{path}")
    if not lines:
        print(f"no changes to /etc in {deployment_id}")
    return 0
