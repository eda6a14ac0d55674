"""Debian's pieces for the integration tests: a real bookworm root with systemd (mmdebstrap,
cached) to boot as a deployment, and initramfs images made by Debian's own dracut and
initramfs-tools for the harness kernel, with or without our hooks.

The root is what a user's image pipeline would make, in two steps. ``debian_base``: mmdebstrap,
built once per recipe (suite, packages, dpkg options) under ``<cache>/debian/<recipe hash>/root``
and read-only to its users. ``debian_image``: a copy of it with what changes more often — the
kernel's modules (the harness kernel's, as a kernel package would install them, but only the
ones the booted system loads: ROOT_MODULES), the one step docs/integrations.md asks of an image
for a read-only root (a tmpfs on /tmp), the ``overlayroot`` command (frozen: interpreter,
libraries and zip, as ``qemu.rootfs.add_command`` puts it in a root without Python) with
``overlayroot-bless.service`` from hooks/systemd installed and enabled as its [Install] says, and
one test unit: after ``multi-user.target`` and the bless it prints what the booted system sees as
``OVERLAYROOT-TEST key=value`` lines on the console and powers off. Nothing else adapts the
image, so a boot that needs more than the documentation says fails here too.

The initramfs generators run on this host (dracut-core and initramfs-tools-core install side by
side) against the harness kernel's modules directory, with our hooks given to them the way a user
installs them but without touching the host: dracut gets a copy of its module directory with
ours added (``dracutbasedir``), mkinitramfs a configuration directory (``-d``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from qemu.kernel import Kernel
from qemu.paths import REPO_ROOT, build_once, cache_dir, is_complete

SUITE = "bookworm"
VARIANT = "minbase"
# systemd-sysv makes systemd /sbin/init; udev finds the disks; dbus for logind and systemctl;
# kmod, which a kernel package would bring (the kernel itself is the harness's).
PACKAGES = ("systemd-sysv", "udev", "dbus", "kmod")
MIRROR = "http://deb.debian.org/debian"
# Documentation and translations are a third of a minbase root and nothing boots from them.
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)
HOSTNAME = "overlayroot-debian"
REPORT_UNIT_NAME = "overlayroot-test-report.service"
BLESS_UNIT = REPO_ROOT / "hooks" / "systemd" / "overlayroot-bless.service"
# The modules the booted Debian loads itself (the initramfs has loaded the disk, loop, overlay
# and erofs drivers by then): systemd mounts binfmt_misc through an automount, which needs
# autofs4, and its modprobe@loop.service loads loop on every boot. The root carries these and
# their dependencies, not the kernel's 90 MB of modules: every MB of the image is hashed on a
# deployment's first boot, and that is slow under TCG. udev asks for drivers of the virtual
# hardware too; without them nothing fails. loop matters to bench.integrations: an ordinary
# root loads it after the switch, where our stage has loaded it before (Linux 6.1 mounts an
# erofs image through a loop device); without it in the root, the plain boots would skip a
# load a real Debian makes and the hook would seem to add it.
ROOT_MODULES = ("autofs4", "loop")

# The guest side, in files shellcheck sees: the report that runs once multi-user.target is
# reached (the kernel command line drives it, like qemu/rootfs.py's init: test.write=TOKEN
# writes TOKEN into /etc, /var, /home and /; test.read=1 reads them back) and its unit.
GUEST = Path(__file__).resolve().parent / "guest"
REPORT_SCRIPT = GUEST / "debian-report.sh"
REPORT_UNIT = GUEST / "report.service"
COMMON_SCRIPT = GUEST / "common.sh"


class DebianUnavailable(RuntimeError):
    """mmdebstrap is missing or failed: the message says why and what to do."""


def recipe(suite: str = SUITE, packages: tuple[str, ...] = PACKAGES) -> dict[str, object]:
    """What a cached mmdebstrap tree depends on (the bookworm one: the defaults)."""
    return {
        "suite": suite,
        "variant": VARIANT,
        "packages": sorted(packages),
        "dpkg_options": list(DPKG_OPTIONS),
    }


def recipe_key(suite: str = SUITE, packages: tuple[str, ...] = PACKAGES) -> str:
    text = json.dumps(recipe(suite, packages), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def debian_base(
    cache: Path | None = None, suite: str = SUITE, packages: tuple[str, ...] = PACKAGES
) -> Path:
    """The mmdebstrap tree of ``suite`` with ``packages``, built on first use and cached. Do
    not modify it: ``debian_image`` (and ``qemu.trixie``) make a copy to change."""
    base = (cache or cache_dir()) / "debian" / recipe_key(suite, packages)
    root = base / "root"
    if not is_complete(base):
        _build(base, suite, packages)
    return root


def debian_image(
    kernel: Kernel, dest: Path, command: Path | None = None, cache: Path | None = None
) -> Path:
    """The Debian root at ``dest`` (which must not exist): a copy of ``debian_base`` with
    ``kernel``'s ROOT_MODULES, a tmpfs on /tmp, the hostname, the test report unit and, given
    ``command`` (a payload of ``qemu.rootfs.build_command_payload``), the ``overlayroot``
    command with ``overlayroot-bless.service`` enabled."""
    base = debian_base(cache)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # cp -a, not shutil.copytree: owners, groups, hard links and xattrs stay as dpkg made them.
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(dest)], check=True)
    _add_modules(dest, kernel)
    enable_tmp_mount(dest)
    if command is not None:
        _add_command(dest, command)
        install_unit(dest, BLESS_UNIT)
    add_test_unit(dest)
    return dest


def _build(base: Path, suite: str, packages: tuple[str, ...]) -> None:
    """mmdebstrap into a staging directory, then rename (``build_once``): a crash leaves no
    half-built root, and a second process that wants it meanwhile waits for this build."""
    if shutil.which("mmdebstrap") is None:
        raise DebianUnavailable("mmdebstrap is not installed: apt-get install mmdebstrap")

    def fill(staging: Path) -> None:
        command = [
            "mmdebstrap",
            "--quiet",
            "--mode=root",
            f"--variant={VARIANT}",
            f"--include={','.join(packages)}",
            *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
            suite,
            str(staging / "root"),
            # Named, not left to mmdebstrap: without a mirror argument it reads sources from a
            # stdin that is not a terminal, and the host's sources name the host's suite only.
            MIRROR,
        ]
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-15:])
            raise DebianUnavailable(
                f"mmdebstrap failed (exit {result.returncode}); it needs the network and root:"
                f"\n{tail}"
            )
        (staging / "recipe.json").write_text(
            json.dumps(recipe(suite, packages), indent=2, sort_keys=True)
        )

    build_once(base, fill)


def _add_modules(root: Path, kernel: Kernel) -> None:
    """ROOT_MODULES and their dependencies from ``kernel``, with the kernel's lists of built-in
    modules, indexed by depmod for the root."""
    target = root / "usr" / "lib" / "modules" / kernel.version
    target.mkdir(parents=True)
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (kernel.modules / name).exists():
            shutil.copy2(kernel.modules / name, target / name)
    result = subprocess.run(
        [
            "modprobe",
            "--all",  # every word a module (without it, the words after the first are its options)
            "--dirname",
            str(kernel.modules.parents[2]),
            "--set-version",
            kernel.version,
            "--show-depends",
            *ROOT_MODULES,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in result.stdout.splitlines():
        words = line.split()
        if words[:1] != ["insmod"]:
            continue  # "builtin NAME": nothing to copy
        module = Path(words[1])
        dest = target / module.relative_to(kernel.modules)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, dest)
    subprocess.run(["depmod", "--basedir", str(root), kernel.version], check=True)


def enable_tmp_mount(root: Path) -> None:
    """What docs/integrations.md tells users: Debian 12 leaves /tmp on the root, read-only here.
    Debian 13's systemd mounts a tmpfs there itself (tmp.mount enabled in /usr): nothing to do."""
    if (
        root / "usr" / "lib" / "systemd" / "system" / "local-fs.target.wants" / "tmp.mount"
    ).exists():
        return
    unit = root / "etc" / "systemd" / "system" / "tmp.mount"
    shutil.copy2(root / "usr" / "share" / "systemd" / "tmp.mount", unit)
    wants = root / "etc" / "systemd" / "system" / "local-fs.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "tmp.mount").symlink_to("/etc/systemd/system/tmp.mount")


def _add_command(root: Path, payload: Path) -> None:
    """The frozen command, as `overlayroot install-command ROOT` puts it: without replacing
    what the image has (its libraries, libc, libcrypto..., are Debian's own, as new as the
    builder's or newer)."""
    from initrd.command import install_command

    install_command(payload, root)


def install_unit(root: Path, unit: Path) -> None:
    """What ``systemctl enable`` does for a unit copied into /etc/systemd/system: a link in the
    .wants or .requires directory of each target its [Install] section names."""
    system = root / "etc" / "systemd" / "system"
    shutil.copy2(unit, system / unit.name)
    section = ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Install]" and "=" in line:
            key, _, value = line.partition("=")
            suffix = {"WantedBy": ".wants", "RequiredBy": ".requires"}.get(key.strip())
            for target in value.split() if suffix else ():
                links = system / f"{target}{suffix}"
                links.mkdir(exist_ok=True)
                (links / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")


def add_test_unit(root: Path) -> None:
    (root / "etc" / "hostname").write_text(HOSTNAME + "\n")
    script = root / "usr" / "lib" / "overlayroot-test" / "report"
    script.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPORT_SCRIPT, script)
    shutil.copy2(COMMON_SCRIPT, script.parent / COMMON_SCRIPT.name)
    script.chmod(0o755)
    unit = root / "usr" / "lib" / "systemd" / "system" / REPORT_UNIT_NAME
    shutil.copy2(REPORT_UNIT, unit)
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / REPORT_UNIT_NAME).symlink_to(f"/usr/lib/systemd/system/{REPORT_UNIT_NAME}")


class GeneratorFailed(RuntimeError):
    """dracut or mkinitramfs failed: the message has the command and the end of its output."""


DRACUT_BASEDIR = Path("/usr/lib/dracut")
HOOKS = REPO_ROOT / "hooks"
# The dracut modules that make its systemd initrd; without them dracut uses its shell /init.
DRACUT_SYSTEMD_MODULES = ("systemd", "systemd-initrd", "dracut-systemd")
DRACUT_DRIVERS = "virtio_blk virtio_pci"


def overlayroot_command() -> str:
    """The ``overlayroot`` command the hooks run at build time: the one installed beside this
    Python (a virtualenv's), else the one in PATH."""
    beside = Path(sys.executable).parent / "overlayroot"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("overlayroot")
    if found is None:
        raise GeneratorFailed("the overlayroot command is not installed: pip install -e .")
    return found


def dracut_initramfs(
    kernel: Kernel, output: Path, *, systemd: bool, overlayroot: bool = True
) -> Path:
    """Debian's dracut, generic (not host-only), for ``kernel``: its systemd initrd or its shell
    /init, with our module added or (``overlayroot=False``) as it comes."""
    if shutil.which("dracut") is None:
        raise GeneratorFailed("dracut is not installed: apt-get install dracut-core")
    work = Path(tempfile.mkdtemp(prefix="dracut.", dir=output.parent))
    try:
        (work / "no-conf").mkdir()
        env = dict(os.environ)
        command = [
            "dracut", "--force", "--no-hostonly",
            "--conf", "/dev/null", "--confdir", str(work / "no-conf"),
            "--kver", kernel.version,
            "--kmoddir", str(kernel.modules),
            "--add-drivers", DRACUT_DRIVERS,
            "--zstd",
            "--tmpdir", str(work),
        ]  # fmt: skip
        if overlayroot:
            env["dracutbasedir"] = str(_dracut_basedir(work / "basedir"))
            env["OVERLAYROOT_COMMAND"] = overlayroot_command()
            command += ["--add", "overlayroot"]
        if not systemd:
            command += ["--omit", " ".join(DRACUT_SYSTEMD_MODULES)]
        _run_generator([*command, str(output)], env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


def _dracut_basedir(base: Path) -> Path:
    """A dracut base directory that is the system's with our module added: links, no copies."""
    modules = base / "modules.d"
    modules.mkdir(parents=True)
    for entry in DRACUT_BASEDIR.iterdir():
        if entry.name != "modules.d":
            (base / entry.name).symlink_to(entry)
    for module in (DRACUT_BASEDIR / "modules.d").iterdir():
        (modules / module.name).symlink_to(module)
    (modules / "90overlayroot").symlink_to(HOOKS / "dracut" / "90overlayroot")
    return base


def initramfs_tools_initramfs(kernel: Kernel, output: Path, *, overlayroot: bool = True) -> Path:
    """Debian's initramfs-tools (mkinitramfs, MODULES=most) for ``kernel``, with our hook and
    local-bottom script installed in its configuration directory as a user installs them in
    /etc/initramfs-tools.

    mkinitramfs reads the kernel's modules and configuration at ``/lib/modules/<version>`` and
    ``/boot/config-<version>`` only: it runs in a private mount namespace where the harness
    kernel's appear there (guest/with-kernel.sh).
    """
    if shutil.which("mkinitramfs") is None:
        raise GeneratorFailed("mkinitramfs is not installed: apt-get install initramfs-tools-core")
    work = Path(tempfile.mkdtemp(prefix="initramfs-tools.", dir=output.parent))
    try:
        conf = work / "conf"
        shutil.copytree("/etc/initramfs-tools", conf, symlinks=True)
        (conf / "initramfs.conf").write_text("MODULES=most\nBUSYBOX=auto\nCOMPRESS=zstd\n")
        (conf / "modules").write_text("virtio_blk\nvirtio_pci\n")
        env = dict(os.environ, TMPDIR=str(work))
        if overlayroot:
            for part in ("hooks/overlayroot", "scripts/local-bottom/overlayroot"):
                target = conf / part
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(HOOKS / "initramfs-tools" / part, target)
            env["OVERLAYROOT_COMMAND"] = overlayroot_command()
        scratch = work / "scratch"
        scratch.mkdir()
        _run_generator(
            [
                "unshare",
                "--mount",
                "sh",
                str(WITH_KERNEL),
                str(scratch),
                kernel.version,
                str(kernel.modules),
                str(kernel.vmlinuz.parent / f"config-{kernel.version}"),
                "mkinitramfs",
                "-d",
                str(conf),
                "-o",
                str(output),
                kernel.version,
            ],
            env,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


WITH_KERNEL = GUEST / "with-kernel.sh"


def _run_generator(command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise GeneratorFailed(f"{' '.join(command)} exited with {result.returncode}:\n{tail}")
