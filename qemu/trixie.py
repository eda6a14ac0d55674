"""Debian 13 (trixie) built the way an image pipeline builds it, for the integration tests.

Where the bookworm root of ``qemu.debian`` borrows the harness's kernel and gets a frozen
``overlayroot`` command put in from outside, this image is made from the inside, as a
distribution or bootc-style build makes one:

1. ``mmdebstrap`` of trixie with its own kernel (``linux-image-cloud-amd64``, 6.12, whose
   package also brings initramfs-tools), Python 3.13, pip and the builder's libraries as Debian
   packages (``qemu.debian.debian_base``, cached per recipe);
2. this checkout's wheel, built on the host, installed *inside* with the image's own pip:
   ``pip install --no-index 'overlayroot[build] @ file:…'`` — pip finds cffi, pyelftools and
   construct already there as Debian packages and puts ``overlayroot`` in /usr/local/bin;
3. our initramfs-tools hooks copied to /etc/initramfs-tools as docs/integrations.md says, and
   ``update-initramfs -u`` run *inside* (chroot): the hook runs the image's
   /usr/local/bin/overlayroot, so the stage is frozen by the image's Python 3.13 with its
   ``_sha2``, libc and libraries;
4. the standalone initramfs built inside too: ``overlayroot initrd build --modules
   /usr/lib/modules/<kver>``.

The kernel and the two initramfs images are then moved out of the root's /boot, as a bootloader
finds them on its own partition rather than inside the read-only root image: the harness boots
them with ``-kernel``/``-initrd``. The result is cached under ``<cache>/trixie/<key>`` keyed by
the mmdebstrap recipe and the bytes of everything that goes into the image from this checkout
(the packages ``overlayroot`` and ``initrd``, ``pyproject.toml``, ``README.md`` and the hooks);
building one removes those of other keys.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qemu import debian
from qemu.kernel import Kernel
from qemu.paths import REPO_ROOT, build_once, cache_dir, is_complete
from qemu.wheel import WheelBuildFailed, build_wheel

SUITE = "trixie"
# On top of bookworm's list: the kernel (which depends on initramfs-tools), zstd (initramfs-tools
# and our builder compress with it), Python with pip, and the builder's dependencies as the
# distribution packages them.
PACKAGES = (
    *debian.PACKAGES,
    "linux-image-cloud-amd64",
    "zstd",
    "python3",
    "python3-pip",
    "python3-cffi",
    "python3-pyelftools",
    "python3-construct",
)
# What goes from this checkout into the image; any byte changed rebuilds it.
SOURCES = ("overlayroot", "initrd", "hooks", "pyproject.toml", "README.md")
STANDALONE_NAME = "initrd.img-overlayroot"
INITRAMFS_TOOLS_NAME = "initrd.img-initramfs-tools"
PYTHON = "/usr/bin/python3"


class TrixieUnavailable(RuntimeError):
    """The image could not be built: the message says which step failed and its output."""


@dataclass(frozen=True)
class TrixieImage:
    root: Path
    """The image's root tree (read-only to its users: ``deployment_root`` copies it)."""
    kernel: Kernel
    """The image's own kernel, with its modules inside ``root``."""
    standalone: Path
    """Our standalone initramfs, built inside the image."""
    initramfs_tools: Path
    """initramfs-tools' image with our hooks, made by ``update-initramfs`` inside the image."""
    python_version: str
    """``major.minor`` of the image's /usr/bin/python3."""


def source_key() -> str:
    """A digest of the recipe and of every file of SOURCES (names and bytes)."""
    digest = hashlib.sha256(debian.recipe_key(SUITE, PACKAGES).encode())
    for name in SOURCES:
        top = REPO_ROOT / name
        paths = (
            [top]
            if top.is_file()
            else sorted(p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        )
        for path in paths:
            digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def trixie_image(cache: Path | None = None) -> TrixieImage:
    """The built image, from the cache or built now (a few minutes: mmdebstrap, then the
    install and the two initramfs builds inside)."""
    cache = cache or cache_dir()
    entry = cache / "trixie" / source_key()
    if not is_complete(entry):
        try:
            base = debian.debian_base(cache, SUITE, PACKAGES)
        except debian.DebianUnavailable as e:
            raise TrixieUnavailable(str(e)) from None
        build_once(entry, lambda staging: _build(base, staging))
    (entry / USED).touch()
    prune(entry)
    return _image(entry)


USED = ".used"
UNUSED_FOR = 24 * 3600.0  # seconds


def prune(current: Path, now: float | None = None) -> list[Path]:
    """Remove the images built from other sources that no one has asked for in UNUSED_FOR
    seconds: each is a couple of hundred MB, and a checkout under development makes one per
    change of the packages or hooks. One in use (a benchmark, a test run, another checkout
    sharing the cache) was asked for recently and stays. Returns what was removed."""
    now = time.time() if now is None else now
    removed = []
    for other in current.parent.iterdir():
        if other == current or not is_complete(other):
            continue
        stamp = other / USED if (other / USED).exists() else other / ".complete"
        try:
            if now - stamp.stat().st_mtime < UNUSED_FOR:
                continue
        except OSError:
            continue
        shutil.rmtree(other, ignore_errors=True)
        removed.append(other)
    return removed


def _image(entry: Path) -> TrixieImage:
    (vmlinuz,) = (entry / "boot").glob("vmlinuz-*")
    version = vmlinuz.name.removeprefix("vmlinuz-")
    return TrixieImage(
        root=entry / "root",
        kernel=Kernel(vmlinuz, entry / "root" / "usr" / "lib" / "modules" / version, version),
        standalone=entry / "boot" / STANDALONE_NAME,
        initramfs_tools=entry / "boot" / INITRAMFS_TOOLS_NAME,
        python_version=(entry / "python-version").read_text().strip(),
    )


def _build(base: Path, staging: Path) -> None:
    root = staging / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True)
    (version,) = [p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*")]

    # 2. The wheel, installed by the image's pip from a file, its dependencies already there.
    try:
        wheel = build_wheel(staging / "wheel")
    except WheelBuildFailed as e:
        raise TrixieUnavailable(str(e)) from None
    shutil.copy2(wheel, root / "tmp" / wheel.name)
    in_chroot(
        root,
        PYTHON,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-cache-dir",
        "--break-system-packages",
        "--root-user-action=ignore",
        "--quiet",
        f"overlayroot[build] @ file:///tmp/{wheel.name}",
    )
    (root / "tmp" / wheel.name).unlink()

    # 3. Our initramfs-tools hooks where docs/integrations.md puts them, then update-initramfs.
    for part in ("hooks/overlayroot", "scripts/local-bottom/overlayroot"):
        target = root / "etc" / "initramfs-tools" / part
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / "hooks" / "initramfs-tools" / part, target)
    in_chroot(root, "update-initramfs", "-u", "-k", version)

    # 4. The standalone image, by the command pip installed.
    in_chroot(
        root,
        "/usr/local/bin/overlayroot",
        "initrd",
        "build",
        "--modules",
        f"/usr/lib/modules/{version}",
        "-o",
        f"/boot/{STANDALONE_NAME}",
    )

    boot = staging / "boot"
    boot.mkdir()
    shutil.move(root / "boot" / f"vmlinuz-{version}", boot / f"vmlinuz-{version}")
    shutil.move(root / "boot" / f"initrd.img-{version}", boot / INITRAMFS_TOOLS_NAME)
    shutil.move(root / "boot" / STANDALONE_NAME, boot / STANDALONE_NAME)
    for leftover in (root / "boot").iterdir():
        leftover.unlink()
    # The links Debian's kernel package keeps in / point into /boot, which is empty now.
    for name in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"):
        if (root / name).is_symlink():
            (root / name).unlink()
    python = in_chroot(
        root, PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"
    ).strip()
    (staging / "python-version").write_text(python + "\n")


CHROOT = Path(__file__).resolve().parent / "guest" / "chroot.sh"
# A clean environment, as a build system's chroot step has: nothing of the host's PATH,
# virtualenv or Python settings leaks into the image's tools.
_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}


def in_chroot(root: Path, *command: str) -> str:
    """Run ``command`` inside ``root``; its output, or TrixieUnavailable with the tail."""
    result = subprocess.run(
        ["unshare", "--mount", "sh", str(CHROOT), str(root), *command],
        capture_output=True,
        text=True,
        env=_ENV,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise TrixieUnavailable(
            f"in the trixie image, {' '.join(command)} exited with {result.returncode}:\n{tail}"
        )
    return result.stdout


def deployment_root(image: TrixieImage, dest: Path) -> Path:
    """A copy of the image's root at ``dest`` (which must not exist) with what the test adds to
    every Debian deployment (qemu.debian): a tmpfs on /tmp as docs/integrations.md asks,
    overlayroot-bless.service enabled, the hostname and the report unit."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--reflink=auto", str(image.root), str(dest)], check=True)
    debian.enable_tmp_mount(dest)
    debian.install_unit(dest, debian.BLESS_UNIT)
    debian.add_test_unit(dest)
    return dest


def initrd_member(initrd: Path, member: str) -> bytes:
    """One file of an initramfs image, early microcode segment or not: unpacked by Debian's
    ``unmkinitramfs`` (into ``early/`` and ``main/`` when there are segments, else flat)."""
    with tempfile.TemporaryDirectory(prefix="unmkinitramfs.") as work:
        result = subprocess.run(
            ["unmkinitramfs", str(initrd), work], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise TrixieUnavailable(f"unmkinitramfs {initrd} failed: {result.stderr.strip()}")
        for top in (Path(work), Path(work) / "main"):
            if (top / member).is_file():
                return (top / member).read_bytes()
    raise FileNotFoundError(f"{initrd} has no {member}")


def main() -> None:
    """``python -m qemu.trixie``: build (or find) the image and say where its parts are."""
    image = trixie_image()
    print(
        f"trixie root {image.root}\n  kernel {image.kernel.version}: {image.kernel.vmlinuz}\n"
        f"  python {image.python_version}\n  standalone {image.standalone}"
        f" ({os.path.getsize(image.standalone)} bytes)\n  initramfs-tools"
        f" {image.initramfs_tools} ({os.path.getsize(image.initramfs_tools)} bytes)"
    )


if __name__ == "__main__":
    main()
