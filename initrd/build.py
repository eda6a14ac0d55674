"""Assemble the standalone initramfs of docs/internals.md, or its payload tree, reproducibly."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath

from initrd.cpio import write_cpio
from initrd.elf import ElfClosureError, resolve_closure
from initrd.errors import BuildError
from initrd.freeze import DEFAULT_ENTRIES, Frozen, freeze
from initrd.kmod import DEFAULT_MODULES, ModuleSet, decompress, resolve_modules
from initrd.tree import Tree, TreeError, write_directory
from overlayroot.core import files

SOURCE_ROOT = Path(__file__).resolve().parent.parent
STAGE_DIR = PurePosixPath("/usr/lib/overlayroot")
EMPTY_DIRS = ("/dev", "/proc", "/sys", "/run", "/sysroot", "/tmp")
PREPARE_ENTRY = "overlayroot.boot.prepare"
PREPARE_SCRIPT = STAGE_DIR / "prepare"
HASH_SEED = bytes(64)
"""What Python reads as its hash seed when the kernel has no random bytes yet: zeros, more than
the 24 bytes it reads."""
# Where the rescue shell (overlayroot/boot/rescue.py) looks for busybox: not in /bin, which the
# interpreter's /bin -> usr/bin link may take.
BUSYBOX_PATH = STAGE_DIR / "busybox"
# Where ``--busybox auto`` looks, in order: Debian's busybox and busybox-static install
# /usr/bin/busybox (/bin is a link to it on merged /usr).
BUSYBOX_SEARCH = ("/usr/bin/busybox", "/bin/busybox", "/usr/sbin/busybox", "/sbin/busybox")


class Compression(StrEnum):
    ZSTD = "zstd"
    GZIP = "gzip"
    NONE = "none"


@dataclass(frozen=True)
class BuildConfig:
    modules_dir: Path | None
    """The kernel's ``/lib/modules/<version>``; None builds an image without kernel modules."""
    output: Path
    """The archive to write, or the directory to fill when ``payload`` is set."""
    python: Path = Path("/usr/bin/python3")
    compress: Compression = Compression.ZSTD
    extra_modules: tuple[str, ...] = ()
    source_date_epoch: int = 0
    payload: bool = False
    """Write the tree into ``output`` (a directory) for another initramfs generator to copy."""
    source_root: Path = SOURCE_ROOT
    """Where the ``overlayroot`` package to freeze lives."""
    entries: tuple[str, ...] = DEFAULT_ENTRIES
    busybox: str = "auto"
    """The rescue shell's busybox: a path, ``auto`` (BUSYBOX_SEARCH, none when absent) or
    ``none``. A payload never has one: the generator that takes it brings its own shell."""


@dataclass(frozen=True)
class BuildResult:
    output: Path
    compression: str
    size: int
    """Bytes written: the compressed archive, or the payload's file bytes."""
    uncompressed_size: int
    entries: int
    kernel_version: str | None
    kernel_modules: tuple[str, ...]
    frozen_modules: int
    extension_modules: tuple[str, ...]
    libraries: int
    python: str
    busybox: str | None
    """The busybox put in the image (its path on the build host), if any."""
    seconds: float = field(compare=False)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["output"] = str(self.output)
        return data


def build_initramfs(config: BuildConfig) -> BuildResult:
    """Build the image ``config`` describes; raise BuildError for anything the user can fix."""
    started = time.monotonic()
    _check_output(config)
    frozen = freeze(config.python, config.source_root, config.entries, config.source_date_epoch)
    kernel = (
        resolve_modules(config.modules_dir, (*DEFAULT_MODULES, *config.extra_modules))
        if config.modules_dir is not None
        else None
    )
    busybox = find_busybox(config)
    tree, libraries = make_tree(frozen, kernel, busybox)
    if PREPARE_ENTRY in config.entries:
        tree.add_file(PREPARE_SCRIPT, prepare_script(frozen.python), 0o755)
    members = list(tree.members())
    if config.payload:
        try:
            config.output.mkdir(parents=True, exist_ok=True)
            if any(config.output.iterdir()):
                raise BuildError(
                    f"{config.output}: payload directory is not empty; give an empty one"
                )
            write_directory(config.output, members, config.source_date_epoch)
        except OSError as e:
            raise BuildError(f"{config.output}: cannot write the payload ({e})") from e
        size = uncompressed = sum(len(m.data) for m in members)
    else:
        archive = io.BytesIO()
        write_cpio(archive, members, config.source_date_epoch)
        data = compress(archive.getvalue(), config.compress)
        _write_atomically(config.output, data)
        size, uncompressed = len(data), archive.tell()
    return BuildResult(
        output=config.output,
        compression="payload" if config.payload else str(config.compress),
        size=size,
        uncompressed_size=uncompressed,
        entries=len(members),
        kernel_version=kernel.kernel_version if kernel else None,
        kernel_modules=tuple(m.name for m in kernel.modules) if kernel else (),
        frozen_modules=len(frozen.modules),
        extension_modules=tuple(e.name for e in frozen.extensions),
        libraries=libraries,
        python=str(frozen.python),
        busybox=str(busybox) if busybox else None,
        seconds=round(time.monotonic() - started, 3),
    )


def find_busybox(config: BuildConfig) -> Path | None:
    """The busybox ``config.busybox`` asks for; BuildError when a named one is unusable."""
    if config.busybox == "none":
        return None
    if config.busybox == "auto":
        if config.payload:
            return None
        found = next((p for p in BUSYBOX_SEARCH if os.access(p, os.X_OK)), None)
        return Path(found) if found else None
    if config.payload:
        raise BuildError(
            f"--busybox {config.busybox}: a payload (--payload-dir) has no rescue shell of its"
            " own, the initramfs generator that takes it brings one; leave --busybox out"
        )
    path = Path(config.busybox)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise BuildError(
            f"--busybox {path}: no such executable file; give the path of a busybox binary"
            " (apt-get install busybox-static puts one at /usr/bin/busybox), auto or none"
        )
    return path


def make_tree(
    frozen: Frozen, kernel: ModuleSet | None, busybox: Path | None = None
) -> tuple[Tree, int]:
    """The image tree, and how many shared libraries it holds."""
    tree = Tree()
    for directory in EMPTY_DIRS:
        tree.mkdir(directory)
    tree.add_char_device("/dev/console", 5, 1, 0o600)
    # Python seeds its str hash at start, before /init mounts devtmpfs: with getrandom() when
    # the kernel's random pool is ready, else from /dev/urandom, and it dies when that cannot be
    # read. The device would wait for the pool (Linux >= 5.18: about a second on a CPU without
    # RDRAND, as QEMU's default one); this file answers at once with Python's fixed seed (that
    # of PYTHONHASHSEED=0, which -I does not let the environment set). devtmpfs hides it.
    tree.add_file("/dev/urandom", HASH_SEED, 0o444)
    tree.add_char_device("/dev/null", 1, 3, 0o666)

    extension_sources = {PurePosixPath(e.source) for e in frozen.extensions}
    own = set(extension_sources)  # closure files that go elsewhere or are not libraries
    try:
        closure = resolve_closure([Path(frozen.python), *(Path(p) for p in extension_sources)])
    except ElfClosureError as e:
        raise BuildError(f"cannot collect the interpreter's libraries: {e}") from e
    busybox_closure = None
    if busybox is not None:
        try:
            busybox_closure = resolve_closure([busybox])
        except ElfClosureError as e:
            raise BuildError(
                f"--busybox {busybox}: not a usable program for the image: {e}"
                " (give a busybox binary, or none)"
            ) from e
        own.add(PurePosixPath(os.path.realpath(busybox)))
    try:
        # Links first: /lib → usr/lib must exist before anything is added under /lib.
        closures = [closure, *([busybox_closure] if busybox_closure else [])]
        links = {link.path: link for c in closures for link in c.symlinks}
        for link in links.values():
            tree.add_symlink(link.path, link.target)
        paths = sorted({path for c in closures for path in c.files} - own)
        for path in paths:
            tree.add_file(path, Path(path), _perm(Path(path)))
        if busybox is not None:
            tree.add_file(BUSYBOX_PATH, busybox, 0o755)
        tree.add_file(frozen.zip_path, frozen.zip_data)
        tree.mkdir(frozen.dynload_dir)
        for ext in frozen.extensions:
            tree.add_file(ext.path, ext.source, _perm(ext.source))
        tree.add_file("/init", init_script(frozen.python), 0o755)

        module_paths = []
        if kernel is not None:
            base = PurePosixPath("/lib/modules") / kernel.kernel_version
            for module in kernel.modules:
                tree.add_file(base / module.relative, decompress(module.source))
                module_paths.append(
                    " ".join((str(base / module.relative), *module.needs, *module.cpus))
                )
        listing = "".join(f"{p}\n" for p in module_paths).encode()
        tree.add_file(STAGE_DIR / "modules.list", listing)
        if kernel is not None:
            # Named by the release too: where initramfs images of two kernels are concatenated
            # (the boot pair's bridge, docs/kernels.md), each kernel still finds its own list.
            tree.add_file(STAGE_DIR / "modules.d" / f"{kernel.kernel_version}.list", listing)
        tree.add_file(STAGE_DIR / "build.json", build_info(frozen, kernel, busybox))
    except TreeError as e:
        raise BuildError(f"cannot lay out the image: {e}") from e
    libraries = len(paths) - 1  # the interpreter is not a library
    return tree, libraries


# The scripts' first step: the stage's priority, before its imports
# (:mod:`overlayroot.boot.priority`).
HURRY = "from overlayroot.boot.priority import hurry\n\nhurry()\n"


# How the hooks' prepare ends: without the interpreter's teardown, which frees every object one
# by one (7 M instructions, 7 ms of the instruction clock, for a process that exits anyway; its
# messages are flushed as they are written).
LEAVE = "os._exit"


def init_script(python: PurePosixPath) -> bytes:
    return f"#!{python} -IS\n{HURRY}from overlayroot.boot.init import main\n\nmain()\n".encode()


def prepare_script(python: PurePosixPath) -> bytes:
    """``/usr/lib/overlayroot/prepare SYSROOT``: what the dracut, initramfs-tools and mkinitcpio
    hooks run (``-m`` would need runpy, which is not frozen).

    The hooks start it with ``PYTHONHASHSEED=0`` (the standalone image's file of zeros cannot
    help here: the generator's devtmpfs has the real /dev/urandom). Without a seed, Python
    reads its ``str`` hash seed from /dev/urandom, which early in a boot waits for the kernel's
    random pool: over a second under QEMU without RDRAND. ``-I`` would ignore the variable, so
    the script runs with ``-sSP`` (no user site, no site, no script directory on the path) and
    starts itself again isolated (``-IS``, paying the wait) when the environment holds any other
    ``PYTHON*`` variable, which could change what it imports or how it runs."""
    return (
        f"#!{python} -sSP\nimport os\nimport sys\n\n"
        "if not sys.flags.ignore_environment and any(\n"
        '    name.startswith("PYTHON") and name != "PYTHONHASHSEED" for name in os.environ\n'
        "):\n"
        '    os.execv(sys.executable, [sys.executable, "-IS", *sys.argv])\n'
        f"{HURRY}from overlayroot.boot.prepare import main\n\n"
        f"{LEAVE}(main())\n"
    ).encode()


def build_info(frozen: Frozen, kernel: ModuleSet | None, busybox: Path | None = None) -> bytes:
    info = {
        "busybox": str(BUSYBOX_PATH) if busybox else None,
        "kernel_version": kernel.kernel_version if kernel else None,
        "python": str(frozen.python),
        "python_version": ".".join(map(str, frozen.version)),
        "modules": [m.name for m in kernel.modules] if kernel else [],
        "builtin_modules": list(kernel.builtin) if kernel else [],
        "frozen_modules": len(frozen.modules),
        "extension_modules": [e.name for e in frozen.extensions],
    }
    return (json.dumps(info, indent=2, sort_keys=True) + "\n").encode()


def compress(data: bytes, method: Compression) -> bytes:
    """Compress deterministically in a format the kernel's initramfs unpacker reads."""
    if method is Compression.GZIP:
        # Level 9 is 0.6 % smaller than 6 on this image for three times the time.
        return gzip.compress(data, compresslevel=6, mtime=0)
    if method is Compression.ZSTD:
        zstd = shutil.which("zstd")
        if zstd is None:
            raise BuildError(
                "the zstd command is not installed; install zstd or use --compress gzip"
            )
        # -19: 4.0 MB in 14 s against 4.6 MB in 0.7 s at -9 (12 MB cpio). A real image is built
        # once per kernel update and lives in a small /boot; quick test builds use "none". One
        # thread, so the output does not depend on the machine's core count.
        return subprocess.run(
            [zstd, "-19", "-T1", "-q", "-c"], input=data, capture_output=True, check=True
        ).stdout
    return data


def _check_output(config: BuildConfig) -> None:
    parent = config.output if config.payload else config.output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BuildError(
            f"{config.output}: cannot write there; {parent} is not a writable directory"
        )
    if not config.payload and config.output.is_dir():
        raise BuildError(f"{config.output}: is a directory; give the image file name with -o")
    if config.modules_dir is not None and not config.modules_dir.is_dir():
        raise BuildError(
            f"{config.modules_dir}: no such modules directory; pass the kernel's "
            "/lib/modules/<version> directory with --modules, or leave it out"
        )


def _write_atomically(path: Path, data: bytes) -> None:
    """The image, durably: a power cut while writing /boot/initrd.img leaves the old one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomically(str(path), data)
    except OSError as e:
        raise BuildError(f"{path}: cannot write the image ({e.strerror}); choose another -o") from e


def _perm(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode) & 0o755
