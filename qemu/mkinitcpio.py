"""The real mkinitcpio (Arch Linux's initramfs generator, release 41) on this Debian host, to
build images with our hooks for the integration tests.

mkinitcpio is not packaged for Debian and no registry reachable here has it, so the tests take
its release tarball from ``../shared/vendor/`` beside the checkout (CI has it there); where it is
absent they skip and say so (MkinitcpioUnavailable). Nothing of it is copied into the project.

It is bash scripts with meson ``@VAR@`` placeholders. ``install_tree`` installs it as Arch's
package does (``/usr/bin/mkinitcpio``, ``/usr/lib/initcpio``), the placeholders filled with Arch's
paths, into a private tree under the cache, keyed by the tarball and this recipe, together with
``/usr/lib/initcpio/busybox``: Debian's dynamically linked busybox (``apt-get download
busybox``; it conflicts with the installed busybox-static). The static one's ash runs its own
``modprobe`` applet, which cannot read kmod's ``modules.dep``; the dynamic one leaves
``modprobe`` to kmod, as Arch's does.

``mkinitcpio_initramfs`` runs it in a private mount namespace (``unshare --mount``) in which
``/usr`` and ``/etc`` are overlays with tmpfs uppers, so the host is not changed, that make the
host look like Arch where mkinitcpio expects it (_ARCH_LAYOUT): the tree at its Arch paths,
``/usr/sbin`` tools visible in ``/usr/bin`` (mkinitcpio runs with ``PATH=/usr/bin:/bin``),
``/usr/lib/libkmod.so.2``, both ``hwdb.bin`` paths, and this checkout's ``overlayroot`` command
where pip puts it, ``/usr/local/bin`` (so the hook has to find it there by itself:
$OVERLAYROOT_COMMAND is not passed on). Our hooks (and a test's own runtime hooks) are given to
it the way a user installs them, in ``/etc/initcpio``. The kernel's modules come from its tree
(``-r``, ``-k``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path

from initrd.cpio import MAGIC, TRAILER, Entry, read_cpio
from qemu.debian import GeneratorFailed, overlayroot_command
from qemu.kernel import Kernel
from qemu.paths import REPO_ROOT, build_once, cache_dir

TARBALL = REPO_ROOT.parent / "shared" / "vendor" / "mkinitcpio-41.tar.gz"
HOOKS = REPO_ROOT / "hooks" / "mkinitcpio"
# meson's configuration data, as Arch's package sets it (systemd enabled, its defaults).
PLACEHOLDERS = {
    "VERSION": "41",
    "BINDIR": "/usr/bin",
    "SYSCONFDIR": "/etc",
    "INITCPIO_LIBDIR": "/usr/lib/initcpio",
    "INITCPIO_SYSCONFDIR": "/etc/initcpio",
    "VCONSOLE_CONF": "/etc/vconsole.conf",
    "MKINITCPIO_HOOKS": "base udev autodetect microcode modconf kms keyboard keymap consolefont"
    " block filesystems fsck",
    "UDEVD_PATH": "/usr/lib/systemd/systemd-udevd",
    "TMPFILES_PATH": "/usr/bin/systemd-tmpfiles",
}
# What meson installs where (source in the tarball → path in the tree), directories whole.
INSTALL = {
    "mkinitcpio": "usr/bin/mkinitcpio",
    "lsinitcpio": "usr/bin/lsinitcpio",
    "mkinitcpio.conf": "etc/mkinitcpio.conf",
    "functions": "usr/lib/initcpio/functions",
    "init": "usr/lib/initcpio/init",
    "init_functions": "usr/lib/initcpio/init_functions",
    "shutdown": "usr/lib/initcpio/shutdown",
    "hooks": "usr/lib/initcpio/hooks",
    "install": "usr/lib/initcpio/install",
    "udev": "usr/lib/initcpio/udev",
}
EXECUTABLE = ("usr/bin/mkinitcpio", "usr/bin/lsinitcpio", "usr/lib/initcpio/functions")
BUSYBOX_PACKAGE = "busybox"


class Variant(StrEnum):
    """The two kinds of mkinitcpio image: its busybox /init and run hooks, or systemd."""

    BUSYBOX = "busybox"
    SYSTEMD = "systemd"


# Arch's default HOOKS, less autodetect (a generic image: this host is not the guest), microcode,
# kms and the keyboard and console hooks (a serial console uses none); ours after filesystems.
# The systemd image has no base hook, so no busybox and no /bin/sh.
HOOK_LISTS = {
    Variant.BUSYBOX: "base udev modconf block filesystems overlayroot fsck",
    Variant.SYSTEMD: "systemd modconf block filesystems overlayroot fsck",
}
# The systemd hook of mkinitcpio 41 names files that Debian's systemd 252 does not have (it is
# written for systemd 256+): it reports them and exits 1, but the image boots. Any other error
# fails the build.
SYSTEMD_252_MISSING = (
    "/usr/lib/systemd/systemd-executor",
    "/usr/lib/systemd/systemd-validatefs",
    "/usr/lib/tmpfiles.d/20-systemd-stub.conf",
)
DRIVERS = "virtio_blk virtio_pci"
STAGE = "usr/lib/overlayroot/prepare"


class MkinitcpioUnavailable(RuntimeError):
    """The vendored tarball is not there: the message says where it was looked for."""


def recipe() -> dict[str, object]:
    """What the cached install tree depends on, besides the tarball's bytes."""
    return {"placeholders": PLACEHOLDERS, "install": INSTALL, "busybox": BUSYBOX_PACKAGE}


def install_tree(cache: Path | None = None) -> Path:
    """mkinitcpio installed as Arch's package does, into ``<cache>/mkinitcpio/<key>/tree``:
    built on first use, then read-only to its users."""
    if not TARBALL.is_file():
        raise MkinitcpioUnavailable(
            f"{TARBALL} is not there: the mkinitcpio tests need the vendored mkinitcpio 41"
            " release tarball beside the checkout (../shared/vendor/)"
        )
    digest = hashlib.sha256(TARBALL.read_bytes())
    digest.update(json.dumps(recipe(), sort_keys=True).encode())
    base = (cache or cache_dir()) / "mkinitcpio" / digest.hexdigest()[:16]
    return build_once(base, _install) / "tree"


def _install(staging: Path) -> None:
    """Unpack, fill the placeholders, add the busybox (``build_once`` renames it into place:
    a crash leaves nothing)."""
    source = staging / "source"
    source.mkdir()
    subprocess.run(
        ["tar", "-xzf", str(TARBALL), "-C", str(source), "--strip-components=1"], check=True
    )
    tree = staging / "tree"
    for name, target in INSTALL.items():
        if (source / name).is_dir():
            files = [
                (path, tree / target / path.name)
                for path in sorted((source / name).iterdir())
                if path.name != "meson.build"
            ]
        else:
            files = [(source / name, tree / target)]
        for path, dest in files:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(_configure(path.read_text()))
            dest.chmod(0o755 if target in EXECUTABLE else 0o644)
    for directory in ("etc/initcpio/hooks", "etc/initcpio/install", "etc/mkinitcpio.conf.d"):
        (tree / directory).mkdir(parents=True, exist_ok=True)
    _add_busybox(staging, tree / "usr" / "lib" / "initcpio" / "busybox")
    (staging / "recipe.json").write_text(json.dumps(recipe(), indent=2, sort_keys=True))
    shutil.rmtree(source)


def _configure(text: str) -> str:
    """What meson's configure_file does: every ``@VAR@`` of PLACEHOLDERS replaced."""
    for name, value in PLACEHOLDERS.items():
        text = text.replace(f"@{name}@", value)
    return text


def _add_busybox(work: Path, dest: Path) -> None:
    download = work / "download"
    download.mkdir()
    result = subprocess.run(
        ["apt-get", "download", BUSYBOX_PACKAGE], cwd=download, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise GeneratorFailed(
            f"apt-get download {BUSYBOX_PACKAGE} failed (run apt-get update):"
            f" {result.stderr.strip()}"
        )
    (deb,) = download.glob("*.deb")
    unpacked = work / "busybox"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    shutil.copy2(unpacked / "bin" / "busybox", dest)
    shutil.rmtree(download)
    shutil.rmtree(unpacked)


def config(variant: Variant, extra_hooks: Sequence[str] = ()) -> str:
    """The mkinitcpio.conf of the test images. MODULES: the guest's disk driver, loaded at once
    (as in the harness's dracut and initramfs-tools images) rather than when udev gets to it."""
    hooks = " ".join((HOOK_LISTS[variant], *extra_hooks))
    return f'MODULES=({DRIVERS})\nHOOKS=({hooks})\nCOMPRESSION="zstd"\n'


def mkinitcpio_initramfs(
    kernel: Kernel,
    output: Path,
    variant: Variant,
    runtime_hooks: Mapping[str, str] | None = None,
    cache: Path | None = None,
) -> Path:
    """An image of the real mkinitcpio for ``kernel`` with our hooks, busybox or systemd.

    ``runtime_hooks`` (name → script) are more runtime hooks for the busybox /init, after ours,
    each with an install hook that adds it: what a test needs to see inside the boot."""
    if shutil.which("bsdtar") is None:
        raise GeneratorFailed("mkinitcpio needs bsdtar: apt-get install libarchive-tools")
    tree = install_tree(cache)
    work = Path(tempfile.mkdtemp(prefix="mkinitcpio.", dir=output.parent))
    try:
        # /etc/initcpio as a user fills it: our hooks, and the test's.
        initcpio = work / "initcpio"
        hooks = {"overlayroot": (HOOKS / "install" / "overlayroot").read_text()}
        scripts = {"overlayroot": (HOOKS / "hooks" / "overlayroot").read_text()}
        for name, script in (runtime_hooks or {}).items():
            hooks[name] = "#!/bin/bash\nbuild() {\n    add_runscript\n}\n"
            scripts[name] = script
        for kind, files in (("install", hooks), ("hooks", scripts)):
            (initcpio / kind).mkdir(parents=True)
            for name, text in files.items():
                (initcpio / kind / name).write_text(text)
        conf = work / "mkinitcpio.conf"
        conf.write_text(config(variant, tuple(runtime_hooks or ())))
        (work / "scratch").mkdir()
        (work / "tmp").mkdir()
        env = {key: value for key, value in os.environ.items() if key != "OVERLAYROOT_COMMAND"}
        env["TMPDIR"] = str(work / "tmp")
        command = [
            "unshare", "--mount", "sh", "-c", _ARCH_LAYOUT, "sh",
            str(work / "scratch"), str(tree), str(initcpio), overlayroot_command(),
            "mkinitcpio", "--config", str(conf), "--kernel", kernel.version,
            "--moduleroot", str(kernel.modules.parents[2]), "--generate", str(output),
            "--nocolor",
        ]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        log = result.stdout + result.stderr
        errors = [line for line in log.splitlines() if "ERROR:" in line]
        allowed = SYSTEMD_252_MISSING if variant is Variant.SYSTEMD else ()
        unexpected = [e for e in errors if not any(f"'{path}'" in e for path in allowed)]
        if unexpected or (result.returncode != 0 and not errors) or not output.exists():
            tail = "\n".join(log.strip().splitlines()[-25:])
            raise GeneratorFailed(
                f"mkinitcpio ({variant} image) exited with {result.returncode}:\n{tail}"
            )
        missing = {STAGE, "hooks/overlayroot"} - set(image_members(output))
        if variant is Variant.SYSTEMD:
            missing.discard("hooks/overlayroot")
        if missing:
            raise GeneratorFailed(f"mkinitcpio wrote {output} without {', '.join(missing)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


def image_members(image: Path) -> list[str]:
    """The paths in an image of mkinitcpio: uncompressed cpio archives (the early one, for
    microcode) followed by a zstd-compressed one."""
    data, names = image.read_bytes(), []
    while data.startswith(MAGIC):
        stream = io.BytesIO(data)
        while (name := bytes(Entry.parse_stream(stream).name).rstrip(b"\0").decode()) != TRAILER:
            names.append(name)
        data = data[stream.tell() :].lstrip(b"\0")
    if data:
        unpacked = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True)
        names += [member.name for member in read_cpio(unpacked.stdout)]
    return [name.removeprefix("./") for name in names]


# sh -c SCRIPT sh SCRATCH TREE INITCPIO BUILDER COMMAND…: run COMMAND in the mount namespace of
# unshare --mount with /usr and /etc laid out as on Arch, over tmpfs-backed overlays.
_ARCH_LAYOUT = """set -e
scratch=$1 tree=$2 initcpio=$3 builder=$4
shift 4
mount --make-rprivate /
mount -t tmpfs tmpfs "$scratch"
for dir in /usr /etc; do
    mkdir -p "$scratch/upper$dir" "$scratch/work$dir"
    mount -t overlay overlay \
        -o "lowerdir=$dir,upperdir=$scratch/upper$dir,workdir=$scratch/work$dir" "$dir"
done
cp -a "$tree/." /
cp -r "$initcpio/." /etc/initcpio/
# Arch has one bin directory; Debian keeps the admin tools in /usr/sbin. Not links: the image
# has Arch's /usr/sbin -> bin, so /usr/bin/X -> /usr/sbin/X would point at itself there.
mkdir -p "$scratch/upper/bin" "$scratch/work/bin"
mount -t overlay overlay \
    -o "lowerdir=/usr/bin:/usr/sbin,upperdir=$scratch/upper/bin,workdir=$scratch/work/bin" /usr/bin
# The udev hook takes libkmod (which systemd-udevd loads) from Arch's libdir.
ln -sfn "$(readlink -f /usr/lib/x86_64-linux-gnu/libkmod.so.2)" /usr/lib/libkmod.so.2
# ... and the hardware database from both places it may be; Debian has one of them.
mkdir -p /etc/udev
[ -e /usr/lib/udev/hwdb.bin ] || ln -s /etc/udev/hwdb.bin /usr/lib/udev/hwdb.bin
[ -e /etc/udev/hwdb.bin ] || ln -s /usr/lib/udev/hwdb.bin /etc/udev/hwdb.bin
# Where pip installs the overlayroot command.
mkdir -p /usr/local/bin
ln -sfn "$builder" /usr/local/bin/overlayroot
exec "$@"
"""
