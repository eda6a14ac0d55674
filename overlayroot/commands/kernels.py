"""A deployment's own kernel, found in the root ``overlayroot deploy`` stages (issue 9).

Two conventions are read from the root tree:

- bootc's: ``/usr/lib/modules/<kver>/vmlinuz`` and, built with the image,
  ``/usr/lib/modules/<kver>/initramfs.img``;
- Debian's: ``/boot/vmlinuz-<kver>`` and ``/boot/initrd.img-<kver>``.

Where a root holds several kernels, the newest (version sort) is the deployment's unless
``--kernel VERSION`` names one. The deployment's kernel arguments are ``--karg`` options after
those of ``/usr/lib/bootc/kargs.d/*.toml`` (bootc's format: ``kargs = ["a", "b"]``, optional
``match-architectures = ["x86_64", ...]``), files read in name order.

Nothing here follows a symlink: a root's absolute link would lead into the host.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from pathlib import Path

from overlayroot.core import files, layout
from overlayroot.core.errors import BootError

MODULE_DIRS = ("usr/lib/modules", "lib/modules")
BOOT_DIR = "boot"
KARGS_DIR = "usr/lib/bootc/kargs.d"
KARGS_FILE_LIMIT = 1 << 16
KARGS_KEYS = ("kargs", "match-architectures")
# x86 boot protocol (Documentation/arch/x86/boot.rst): "HdrS" at 0x202, and at 0x20E the
# offset (less 0x200) of a NUL-terminated version string, "6.1.0-27-cloud-amd64 (…) #1 …".
X86_MAGIC = (0x202, b"HdrS")
X86_VERSION_POINTER = 0x20E
# arm64 Image: "ARM\x64" at 0x38; an EFI zboot image (compressed arm64 or riscv): "MZ", then
# "zimg" at 4. riscv Image: "RSC\x05" at 0x38.
FORMATS = {
    "x86_64": ((X86_MAGIC,), "an x86 bzImage"),
    "i686": ((X86_MAGIC,), "an x86 bzImage"),
    "aarch64": (((0x38, b"ARM\x64"), (4, b"zimg")), "an arm64 Image or EFI zboot image"),
    "riscv64": (((0x38, b"RSC\x05"), (4, b"zimg")), "a riscv Image or EFI zboot image"),
}


class Found:
    """A kernel in a root: its release, its image, its initramfs if the root has one, and its
    modules directory if the root has one (what an initramfs is built from)."""

    __slots__ = ("initramfs", "modules", "version", "vmlinuz")

    def __init__(
        self, version: str, vmlinuz: Path, initramfs: Path | None, modules: Path | None
    ) -> None:
        self.version = version
        self.vmlinuz = vmlinuz
        self.initramfs = initramfs
        self.modules = modules

    def __repr__(self) -> str:
        return (
            f"Found({self.version!r}, {self.vmlinuz}, initramfs={self.initramfs},"
            f" modules={self.modules})"
        )


def _real_dir(root: Path, relative: str) -> Path | None:
    """``root/relative`` when every component below ``root`` is a directory, not a symlink."""
    path = root
    for part in relative.split("/"):
        path = path / part
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return None
        except OSError:
            return None
    return path


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        raise BootError(f"cannot list {path}: {e.strerror}") from None


def find(root: Path) -> list[Found]:
    """The kernels in the root tree at ``root``, oldest first (version sort)."""
    modules: dict[str, Path] = {}
    vmlinuz: dict[str, Path] = {}
    initramfs: dict[str, Path] = {}
    for relative in MODULE_DIRS:
        directory = _real_dir(root, relative)
        if directory is None:
            continue
        for name in _listdir(directory):
            if not layout.is_kernel_version(name):
                continue
            kver = directory / name
            if _real_dir(directory, name) is None:
                continue
            modules.setdefault(name, kver)
            if _regular(kver / "vmlinuz"):
                vmlinuz.setdefault(name, kver / "vmlinuz")
                if _regular(kver / "initramfs.img"):
                    initramfs.setdefault(name, kver / "initramfs.img")
    boot = _real_dir(root, BOOT_DIR)
    if boot is not None:
        for name in _listdir(boot):
            version = name.removeprefix("vmlinuz-")
            if (
                version == name
                or not layout.is_kernel_version(version)
                or version in vmlinuz
                or not _regular(boot / name)
            ):
                continue
            vmlinuz[version] = boot / name
            if _regular(boot / f"initrd.img-{version}"):
                initramfs[version] = boot / f"initrd.img-{version}"
    return [
        Found(v, vmlinuz[v], initramfs.get(v), modules.get(v))
        for v in sorted(vmlinuz, key=version_key)
    ]


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a kernel release: runs of digits compare as numbers ("6.12" after "6.9"),
    other runs as text, a number after text (as ``sort -V`` does)."""
    return tuple(
        (1, int(part)) if part.isdigit() else (0, part)
        for part in re.findall(r"[0-9]+|[^0-9]+", version)
    )


def choose(found: list[Found], version: str | None, source: Path) -> Found | None:
    """The deployment's kernel: the one ``version`` names, else the newest; None for none."""
    if version is None:
        return found[-1] if found else None
    for kernel in found:
        if kernel.version == version:
            return kernel
    have = ", ".join(k.version for k in found) or "none"
    raise BootError(
        f"--kernel {version}: {source} has no such kernel (kernels there: {have};"
        " looked for /usr/lib/modules/<version>/vmlinuz and /boot/vmlinuz-<version>)"
    )


def check_image(path: Path, version: str, machine: str | None = None) -> None:
    """Refuse a file that is not a kernel image for this machine's architecture, or whose own
    version string (x86) is another release than ``version``."""
    machine = machine or os.uname().machine
    try:
        with open(path, "rb") as f:
            head = f.read(0x1000)
            if machine not in FORMATS:
                return  # an architecture we know no magic of: the stage's kexec will tell
            magics, what = FORMATS[machine]
            if not any(head[at : at + len(magic)] == magic for at, magic in magics):
                raise BootError(
                    f"{path} is not {what}, the kernel format of this machine ({machine}):"
                    " deploy a root built for it, or give --no-kernel to boot it under the"
                    " running kernel"
                )
            if magics[0] != X86_MAGIC or len(head) < X86_VERSION_POINTER + 2:
                return
            (pointer,) = struct.unpack_from("<H", head, X86_VERSION_POINTER)
            if pointer == 0:
                return
            f.seek(pointer + 0x200)
            text = f.read(256).split(b"\0", 1)[0].split(b" ", 1)[0].decode("ascii", "replace")
    except OSError as e:
        raise BootError(f"cannot read the kernel {path}: {e.strerror}") from None
    if text and text != version:
        raise BootError(
            f"{path} is kernel {text}, not {version} as its name says: the root's"
            " kernel files are mixed up; rebuild the image"
        )


def read_kargs_dir(root: Path, machine: str | None = None) -> list[str]:
    """The kernel arguments of the root's ``/usr/lib/bootc/kargs.d/*.toml`` files, in file name
    order, leaving out those whose ``match-architectures`` do not name this machine's."""
    import tomllib

    machine = machine or os.uname().machine
    directory = _real_dir(root, KARGS_DIR)
    if directory is None:
        return []
    kargs: list[str] = []
    for name in _listdir(directory):
        if not name.endswith(".toml"):
            continue
        path = directory / name
        where = f"/{KARGS_DIR}/{name} in {root}"
        try:
            data = tomllib.loads(files.read_regular(path, KARGS_FILE_LIMIT).decode())
        except OSError as e:
            raise BootError(f"cannot read {where}: {e.strerror}") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise BootError(
                f'{where} is not TOML ({e}): write it as kargs = ["arg", ...]'
            ) from None
        except RecursionError:  # tomllib recurses once per level of nesting
            raise BootError(
                f"{where} nests arrays or tables too deep for a kargs file: write"
                ' it as kargs = ["arg", ...]'
            ) from None
        unknown = sorted(set(data) - set(KARGS_KEYS))
        if unknown:
            raise BootError(
                f"{where}: unknown key(s) {', '.join(unknown)}: a kargs.d file holds"
                " kargs = [...] and, optionally, match-architectures = [...]"
            )
        file_kargs = data.get("kargs")
        if not isinstance(file_kargs, list) or not all(isinstance(a, str) for a in file_kargs):
            raise BootError(
                f"{where}: kargs is missing or not a list of strings: write it as"
                ' kargs = ["arg", ...]'
            )
        arches = data.get("match-architectures")
        if arches is not None and (
            not isinstance(arches, list) or not all(isinstance(a, str) for a in arches)
        ):
            raise BootError(
                f"{where}: match-architectures is not a list of strings: write it"
                ' as match-architectures = ["x86_64", "aarch64"]'
            )
        if arches is not None and machine not in arches:
            continue
        for arg in file_kargs:
            try:
                kargs.append(layout.check_karg(arg))
            except ValueError as e:
                raise BootError(f"{where}: {e}") from None
    return kargs


def check_kargs(kargs: list[str]) -> list[str]:
    """``--karg`` options, checked as the manifest will be."""
    for arg in kargs:
        try:
            layout.check_karg(arg)
        except ValueError as e:
            raise BootError(f"--karg {arg!r}: {e}") from None
    if len(" ".join(kargs)) > layout.MAX_KARGS_LENGTH:
        raise BootError(
            f"the deployment's kernel arguments are longer than"
            f" {layout.MAX_KARGS_LENGTH} characters: {' '.join(kargs)[:60]}…"
        )
    return kargs


NO_INITRAMFS_HELP = (
    "build one inside the image when it is built (`overlayroot initrd build --modules"
    " /usr/lib/modules/{version} -o /usr/lib/modules/{version}/initramfs.img`, or dracut with"
    " the overlayroot module), install the builder where deploy runs (pip install"
    " 'overlayroot[build]') so that deploy builds one, or give --no-kernel to boot the root"
    " under the running kernel"
)
