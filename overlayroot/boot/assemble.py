"""Turn a mounted state filesystem into the assembled root of one deployment, in place.

``assemble(sysroot, run_dir, options, manifest)`` is the mechanism under
:func:`overlayroot.boot.prepare.prepare_root`, which decides what to assemble. Its steps:

1. move the state filesystem from ``sysroot`` to ``<run_dir>/state``, with ``nosuid,nodev``:
   nobody may run a set-id program or open a device node of a deployment kept for rollback;
2. mount the deployment's lower read-only on ``sysroot`` (an image, readable by root only:
   erofs from its file where the kernel can, Linux 6.12 and later, else through a loop
   device, as squashfs always; a read-only bind for a directory tree);
3. check the lower has the mount points and the init it needs;
4. mount ``/etc`` as an overlay with the deployment's persistent upper (or a tmpfs upper, or
   leave it read-only), per ``overlayroot.etc=``;
5. bind-mount the persistent ``/var`` and ``/home``; an empty one is first seeded from the
   image, atomically (into a hidden sibling, synced, renamed into place).

What it finds damaged in the state it repairs as it goes — something other than a directory
where ``var``, ``home`` or an ``/etc`` upper belongs is set aside (renamed, never deleted) and
made anew — and says so in ``repairs``. A failure undoes what was mounted, so the caller may
try another deployment.
"""

from __future__ import annotations

import errno
import os
import stat

from overlayroot.boot import modload
from overlayroot.boot.cmdline import Options
from overlayroot.core import files, loop, syscalls
from overlayroot.core.errors import BootError
from overlayroot.core.layout import FORMATS, MOUNT_POINTS, Manifest, StateLayout

DEFAULT_INIT = "/sbin/init"
# index=on records the lower's file handles in the upper, and the mount then fails once an
# update changes the lower. redirect_dir and metacopy would make the upper depend on one lower
# too; xino needs the same filesystem-id stability. docs/design.md §5.
ETC_OVERLAY_OPTIONS = "index=off,redirect_dir=off,metacopy=off,xino=off"
BOOTED_FILE = "booted.json"


class Booted:
    """What was booted; written to ``booted.json`` for the running system."""

    __slots__ = ("deployment", "device", "etc", "image", "init", "loop", "lower", "state_path")

    def __init__(
        self,
        deployment: Manifest,
        *,
        device: str | None,
        state_path: str,
        lower: str,
        loop: str | None,
        etc: str,
        init: str | None,
        image: str,
    ) -> None:
        self.deployment = deployment
        self.device = device
        self.state_path = state_path
        self.lower = lower
        self.loop = loop
        self.etc = etc
        self.init = init
        self.image = image

    def to_dict(self) -> dict[str, object]:
        return {
            "deployment": self.deployment.id,
            "manifest": self.deployment.to_dict(),
            "device": self.device,
            "state": self.state_path,
            "lower": self.lower,
            "loop": self.loop,
            "image": self.image,
            "etc": self.etc,
            "init": self.init,
        }


def assemble(
    sysroot: str,
    run_dir: str,
    options: Options,
    manifest: Manifest,
    *,
    device: str | None = None,
    repairs: list[str] | None = None,
) -> Booted:
    """Assemble ``manifest``'s deployment on ``sysroot``; repairs made are appended to
    ``repairs``."""
    repairs = [] if repairs is None else repairs
    state = os.path.join(run_dir, "state")
    os.makedirs(state, mode=0o755, exist_ok=True)
    undo: list[tuple[str, str]] = []  # ("move", back-to) or ("umount", path), newest last
    try:
        syscalls.mount(sysroot, state, None, syscalls.MS_MOVE)
        undo.append(("move", sysroot))
        syscalls.mount(
            None,
            state,
            None,
            syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_NOSUID | syscalls.MS_NODEV,
        )
        layout = StateLayout(state)
        image = layout.image_path(manifest)
        loop_path = _mount_lower(manifest, image, sysroot)
        undo.append(("umount", sysroot))
        _check_lower(sysroot, manifest)
        init = _check_init(sysroot, options, manifest)
        etc_mounts, etc_mode = _mount_etc(sysroot, run_dir, layout, manifest, options.etc, repairs)
        undo.extend(("umount", mounted) for mounted in etc_mounts)
        for name in ("var", "home"):
            target = os.path.join(sysroot, name)
            _bind_persistent(layout, name, target, repairs)
            undo.append(("umount", target))
        return Booted(
            manifest,
            device=device,
            state_path=state,
            lower=manifest.format,
            loop=loop_path,
            etc=etc_mode,
            init=init,
            image=image,
        )
    except BaseException:
        _undo(undo, state)
        raise


def _undo(undo: list[tuple[str, str]], state: str) -> None:
    for action, path in reversed(undo):
        try:
            if action == "umount":
                syscalls.umount(path, syscalls.MNT_DETACH)
            else:
                syscalls.mount(state, path, None, syscalls.MS_MOVE)
        except OSError as e:
            print(f"overlayroot: warning: could not undo the mount on {path}: {e}", flush=True)


def _mount_lower(manifest: Manifest, image: str, target: str) -> str | None:
    what = f"deployment {manifest.id!r}"
    try:
        st = os.lstat(image)
    except FileNotFoundError:
        raise BootError(f"{what}: its {_noun(manifest)} {image} is missing") from None
    if manifest.format == "dir":
        if not stat.S_ISDIR(st.st_mode):
            raise BootError(
                f"{what}: its tree {image} is {files.kind(st.st_mode)}, not a directory"
            )
        try:
            syscalls.mount(image, target, None, syscalls.MS_BIND)
            # Explicit flags: the bind would inherit the state filesystem's nosuid and nodev,
            # which the booted root must not have.
            syscalls.mount(
                None, target, None, syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY
            )
        except OSError as e:
            raise BootError(f"{what}: cannot bind-mount its tree read-only: {e}") from None
        return None
    if not stat.S_ISREG(st.st_mode):
        raise BootError(
            f"{what}: its image {image} is {files.kind(st.st_mode)}, not a regular file"
        )
    if st.st_mode & 0o077:
        # An image holds the root's secrets (/etc/shadow, keys): root alone may read it.
        # Images deployed before this rule get it at their boot (when the state is writable).
        try:  # noqa: SIM105 - contextlib is too dear an import for the boot stage
            os.chmod(image, 0o600)
        except OSError:
            pass
    fstype = FORMATS[manifest.format].fstype
    modload.need(f"fs-{fstype}")
    if fstype == "erofs":
        # Linux 6.12 and later (EROFS_FS_BACKED_BY_FILE) mount an erofs image from its file:
        # no loop device, one block layer less under every read of the root, and no loop
        # device for udev to probe in the booted system. Other kernels say ENOTBLK.
        try:
            syscalls.mount(image, target, fstype, syscalls.MS_RDONLY)
            return None
        except OSError as e:
            if e.errno != errno.ENOTBLK:
                raise _does_not_mount(what, image, fstype, e) from None
    modload.need("loop")
    try:
        attached = loop.attach(image)
    except OSError as e:
        raise BootError(f"{what}: cannot attach its image to a loop device: {e}") from None
    with attached:
        try:
            syscalls.mount(attached.path, target, fstype, syscalls.MS_RDONLY)
        except OSError as e:
            raise _does_not_mount(what, image, fstype, e) from None
        return attached.path


def _does_not_mount(what: str, image: str, fstype: str | None, e: OSError) -> BootError:
    return BootError(
        f"{what}: its image {image} does not mount as {fstype} ({e.strerror});"
        " the image is damaged or not a filesystem: redeploy it, or boot another"
        " deployment with overlayroot.deployment=ID"
    )


def _noun(manifest: Manifest) -> str:
    return "tree" if manifest.format == "dir" else "image"


def _check_lower(root: str, manifest: Manifest) -> None:
    missing = [d for d in MOUNT_POINTS if not os.path.isdir(os.path.join(root, d))]
    if missing:
        raise BootError(
            f"deployment {manifest.id!r} lacks the mount points /{', /'.join(missing)} in its"
            " root; rebuild the image with those directories"
        )


def resolve_in_root(root: str, path: str, max_links: int = 40) -> str | None:
    """``path`` as seen from inside ``root`` (absolute symlinks resolved against ``root``), or
    ``None`` when it does not exist there."""
    parts = [p for p in path.split("/") if p]
    resolved = ""
    links = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            resolved = resolved.rsplit("/", 1)[0]
            continue
        candidate = f"{resolved}/{part}"
        try:
            st = os.lstat(root + candidate)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > max_links:
                return None
            target = os.readlink(root + candidate)
            if target.startswith("/"):
                resolved = ""
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved = candidate
    return resolved or "/"


def _check_init(root: str, options: Options, manifest: Manifest) -> str:
    init = options.init or DEFAULT_INIT
    found = resolve_in_root(root, init)
    if found is None or not os.path.isfile(root + found) or not os.access(root + found, os.X_OK):
        if options.init:
            hint = "fix init= on the kernel command line"
        else:
            hint = "the image needs /sbin/init, or name its init with init= on the command line"
        raise BootError(f"deployment {manifest.id!r} has no executable {init}: {hint}")
    return init


def _mount_etc(
    root: str, run_dir: str, layout: StateLayout, manifest: Manifest, mode: str, repairs: list[str]
) -> tuple[list[str], str]:
    """Mounts the /etc overlay; returns what it mounted, in order, and the mode it got."""
    if mode == "readonly":
        return [], mode
    etc = os.path.join(root, "etc")
    mounted = []
    if mode == "persistent":
        upper, work = layout.etc_upper(manifest.id), layout.etc_work(manifest.id)
        if os.statvfs(layout.top).f_flag & os.ST_RDONLY:
            return _transient_instead(
                root, run_dir, layout, manifest, upper, os.strerror(errno.EROFS), repairs
            )
        try:
            for directory in (layout.etc, os.path.dirname(upper), upper, work):
                _ensure_dir(directory, repairs)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise BootError(f"cannot make {e.filename} a directory: {e.strerror}") from None
            return _transient_instead(
                root, run_dir, layout, manifest, upper, str(e.strerror), repairs
            )
    else:
        scratch = os.path.join(run_dir, "etc-transient")
        os.makedirs(scratch, mode=0o755, exist_ok=True)
        syscalls.mount(
            "tmpfs", scratch, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=0755"
        )
        mounted.append(scratch)
        upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
        for d in (upper, work):
            os.makedirs(d, mode=0o755, exist_ok=True)
    data = f"lowerdir={etc},upperdir={upper},workdir={work},{ETC_OVERLAY_OPTIONS}"
    modload.need("fs-overlay")
    try:
        syscalls.mount("overlay", etc, "overlay", 0, data)
    except OSError as e:
        for path in reversed(mounted):
            syscalls.umount(path, syscalls.MNT_DETACH)
        raise BootError(
            f"deployment {manifest.id!r}: cannot mount the /etc overlay (upper {upper}):"
            f" {e.strerror}"
        ) from None
    return [*mounted, etc], mode


def _transient_instead(
    root: str,
    run_dir: str,
    layout: StateLayout,
    manifest: Manifest,
    upper: str,
    why: str,
    repairs: list[str],
) -> tuple[list[str], str]:
    """A state filesystem the kernel made read-only (after an I/O error, say): boot with the
    image's /etc made writable in RAM rather than not at all."""
    repairs.append(
        f"the /etc upper cannot be mounted ({upper}: {why}): /etc is"
        " transient for this boot, its changes are lost at shutdown"
    )
    return _mount_etc(root, run_dir, layout, manifest, "transient", repairs)


def _ensure_dir(path: str, repairs: list[str]) -> None:
    """``path`` as a directory; anything else there is damage, set aside and said. Raises
    ``OSError``."""
    moved = files.ensure_dir(path)
    if moved is not None:
        repairs.append(f"{path} was not a directory: set it aside as {moved} and made a new one")


def _bind_persistent(layout: StateLayout, name: str, target: str, repairs: list[str]) -> None:
    """The state's ``var`` or ``home`` on ``target``, seeded from the image when empty."""
    source = os.path.join(layout.top, name)
    try:
        _ensure_dir(source, repairs)
    except OSError as e:
        raise BootError(f"cannot make {source} a directory: {e.strerror}") from None
    if not os.listdir(source):
        _seed(target, source, repairs)
    try:
        syscalls.mount(source, target, None, syscalls.MS_BIND)
        # Not the state filesystem's nosuid and nodev: /var and /home behave as on any root.
        syscalls.mount(None, target, None, syscalls.MS_REMOUNT | syscalls.MS_BIND)
    except OSError as e:
        raise BootError(f"cannot bind-mount {source} on {target}: {e.strerror}") from None


def _seed(image_dir: str, persistent: str, repairs: list[str]) -> None:
    """Fill the empty ``persistent`` directory with a copy of the image's ``image_dir`` (so a
    fresh /var has /var/lib/dpkg), all or nothing: the copy goes to a hidden sibling, is
    synced, and is renamed over the empty directory. A power cut leaves it empty, and the next
    boot seeds again; a failure (a full disk) leaves it empty for this boot, and says so."""
    try:
        st = os.lstat(image_dir)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode) or not os.listdir(image_dir):
        return
    parent, name = os.path.split(persistent)
    seeding = os.path.join(parent, f".{name}.seeding")
    try:
        if os.path.lexists(seeding):
            files.remove_tree(seeding)  # an earlier seeding that a power cut interrupted
        from overlayroot.core import treecopy  # a first boot's seeding only

        treecopy.copy_tree(image_dir, seeding)
        syscalls.sync()
        os.rename(seeding, persistent)  # over the empty directory, atomically
        files.fsync_dir(parent)
    except OSError as e:
        try:  # noqa: SIM105 - contextlib is too dear an import for the boot stage
            files.remove_tree(seeding)
        except OSError:
            pass
        repairs.append(
            f"cannot seed the empty {persistent} from the image's"
            f" {os.path.basename(image_dir)} ({e.strerror}): it stays empty for this"
            " boot, and the next boot tries again"
        )
