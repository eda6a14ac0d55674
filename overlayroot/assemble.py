"""Turn a mounted state filesystem into the assembled root, in place.

``assemble("/sysroot", "/run/overlayroot", options)`` is the one entry point every integration
calls (standalone ``/init``, dracut, mkinitcpio, initramfs-tools), like
``ostree-prepare-root /sysroot``:

1. read the deployments on the state filesystem and pick one;
2. move the state filesystem from ``sysroot`` to ``<run_dir>/state``;
3. mount the deployment's lower read-only on ``sysroot`` (loop device for an erofs or squashfs
   image, a read-only bind for a directory tree);
4. check the lower has the mount points and the init it needs;
5. mount ``/etc`` as an overlay with the deployment's persistent upper (or a tmpfs upper, or
   leave it read-only), per ``overlayroot.etc=``;
6. bind-mount the persistent ``/var`` and ``/home``, seeding an empty one from the image;
7. write ``<run_dir>/booted.json``.

A failure undoes what was mounted, so the caller may try another deployment.
"""

from __future__ import annotations

import json
import os
import stat

from overlayroot import loop, syscalls
from overlayroot.cmdline import Options
from overlayroot.errors import BootError
from overlayroot.layout import Manifest, StateLayout, newest

REQUIRED_MOUNT_POINTS = ("etc", "var", "home", "run", "proc", "sys", "dev")
DEFAULT_INIT = "/sbin/init"
# index=on records the lower's file handles in the upper, and the mount then fails once an
# update changes the lower. redirect_dir and metacopy would make the upper depend on one lower
# too; xino needs the same filesystem-id stability. DESIGN.md §4.
ETC_OVERLAY_OPTIONS = "index=off,redirect_dir=off,metacopy=off,xino=off"
IMAGE_FSTYPES = {"erofs": "erofs", "squashfs": "squashfs"}
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


def choose(layout: StateLayout, wanted: str | None, device: str | None) -> Manifest:
    """The deployment the command line names, else the newest."""
    where = device or str(layout.root)
    ids = layout.deployment_ids()
    if not ids:
        raise BootError(
            f"no deployments in {layout.deployments} on {where}; stage one with"
            " `overlayroot deploy --sysroot <mounted state filesystem> <image or tree>`"
        )
    if wanted is not None:
        if wanted not in ids:
            raise BootError(
                f"deployment {wanted!r} (overlayroot.deployment=) is not on {where};"
                f" deployments there: {', '.join(ids)}"
            )
        return layout.read_manifest(wanted)
    chosen = newest(layout.manifests())
    assert chosen is not None
    return chosen


def assemble(
    sysroot: str,
    run_dir: str,
    options: Options,
    *,
    device: str | None = None,
    manifest: Manifest | None = None,
    check_init: bool = True,
) -> Booted:
    """Assemble ``manifest``'s deployment, or (without one) the one the options name, else
    the newest: the choice without boot counting, for tests and tools."""
    if manifest is None:
        if not os.path.isdir(os.path.join(sysroot, "overlayroot", "deployments")):
            raise BootError(
                f"{device or sysroot} holds no overlayroot state (no overlayroot/deployments"
                " directory); point overlayroot.state= at the state filesystem, or provision"
                " it with `overlayroot deploy`"
            )
        manifest = choose(StateLayout(sysroot), options.deployment, device)
    state = os.path.join(run_dir, "state")
    os.makedirs(state, mode=0o755, exist_ok=True)
    undo: list[tuple[str, str]] = []  # ("move", back-to) or ("umount", path), newest last
    try:
        syscalls.mount(sysroot, state, None, syscalls.MS_MOVE)
        undo.append(("move", sysroot))
        layout = StateLayout(state)
        image = str(layout.image_path(manifest))
        loop_path = _mount_lower(manifest, image, sysroot, device)
        undo.append(("umount", sysroot))
        _check_lower(sysroot, manifest)
        init = _check_init(sysroot, options, manifest) if check_init else None
        for mounted in _mount_etc(sysroot, run_dir, layout, manifest, options.etc):
            undo.append(("umount", mounted))
        for name, persistent in (("var", layout.var), ("home", layout.home)):
            target = os.path.join(sysroot, name)
            _bind_persistent(str(persistent), target)
            undo.append(("umount", target))
        booted = Booted(
            manifest,
            device=device,
            state_path=state,
            lower=manifest.format,
            loop=loop_path,
            etc=options.etc,
            init=init,
            image=image,
        )
        write_booted(run_dir, booted.to_dict())
        return booted
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


def _mount_lower(manifest: Manifest, image: str, target: str, device: str | None) -> str | None:
    what = f"deployment {manifest.id!r}"
    if manifest.format == "dir":
        if not os.path.isdir(image):
            raise BootError(f"{what}: its tree {image} is missing")
        try:
            syscalls.mount(image, target, None, syscalls.MS_BIND)
            syscalls.mount(None, target, None, syscalls.MS_REMOUNT | syscalls.MS_BIND
                           | syscalls.MS_RDONLY)
        except OSError as e:
            raise BootError(f"{what}: cannot bind-mount its tree read-only: {e}") from None
        return None
    fstype = IMAGE_FSTYPES[manifest.format]
    try:
        attached = loop.attach(image)
    except OSError as e:
        raise BootError(f"{what}: cannot attach its image to a loop device: {e}") from None
    with attached:
        try:
            syscalls.mount(attached.path, target, fstype, syscalls.MS_RDONLY)
        except OSError as e:
            raise BootError(
                f"{what}: its image {image} does not mount as {fstype} ({e.strerror});"
                " the image is damaged or not a filesystem: redeploy it, or boot another"
                " deployment with overlayroot.deployment=ID"
            ) from None
        return attached.path


def _check_lower(root: str, manifest: Manifest) -> None:
    missing = [d for d in REQUIRED_MOUNT_POINTS if not os.path.isdir(os.path.join(root, d))]
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
    root: str, run_dir: str, layout: StateLayout, manifest: Manifest, mode: str
) -> list[str]:
    """Mounts the /etc overlay; returns what it mounted, in order."""
    if mode == "readonly":
        return []
    etc = os.path.join(root, "etc")
    mounted = []
    if mode == "persistent":
        upper, work = str(layout.etc_upper(manifest.id)), str(layout.etc_work(manifest.id))
    else:
        scratch = os.path.join(run_dir, "etc-transient")
        os.makedirs(scratch, mode=0o755, exist_ok=True)
        syscalls.mount("tmpfs", scratch, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV,
                       "mode=0755")
        mounted.append(scratch)
        upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    for d in (upper, work):
        os.makedirs(d, mode=0o755, exist_ok=True)
    data = f"lowerdir={etc},upperdir={upper},workdir={work},{ETC_OVERLAY_OPTIONS}"
    try:
        syscalls.mount("overlay", etc, "overlay", 0, data)
    except OSError as e:
        for path in reversed(mounted):
            syscalls.umount(path, syscalls.MNT_DETACH)
        raise BootError(
            f"deployment {manifest.id!r}: cannot mount the /etc overlay (upper {upper}):"
            f" {e.strerror}"
        ) from None
    return [*mounted, etc]


def _bind_persistent(source: str, target: str) -> None:
    os.makedirs(source, mode=0o755, exist_ok=True)
    if not os.listdir(source):
        seed_tree(target, source)
    try:
        syscalls.mount(source, target, None, syscalls.MS_BIND)
    except OSError as e:
        raise BootError(f"cannot bind-mount {source} on {target}: {e.strerror}") from None


def seed_tree(src: str, dst: str) -> None:
    """Copy ``src`` into the existing, empty ``dst`` with owners, modes, times, symlinks and
    device nodes, so a fresh persistent /var starts as the image's (e.g. /var/lib/dpkg)."""
    for entry in os.scandir(src):
        s, d = entry.path, os.path.join(dst, entry.name)
        st = entry.stat(follow_symlinks=False)
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(s), d)
        elif stat.S_ISDIR(mode):
            os.mkdir(d, 0o700)
            seed_tree(s, d)
        elif stat.S_ISREG(mode):
            _copy_file(s, d)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            os.mknod(d, mode, st.st_rdev)
        else:
            continue  # sockets belong to a running service, not to an image
        os.lchown(d, st.st_uid, st.st_gid)
        if not stat.S_ISLNK(mode):
            os.chmod(d, stat.S_IMODE(mode))
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_file(src: str, dst: str) -> None:
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)


def write_booted(run_dir: str, data: dict[str, object]) -> None:
    """``<run_dir>/booted.json``: what the running system reads to learn what was booted."""
    path = os.path.join(run_dir, BOOTED_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)

