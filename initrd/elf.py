"""The shared-library closure of ELF binaries, resolved the way glibc's ld.so resolves it.

Compared with lddtree this honours three details that matter for a working image:

- ``DT_RUNPATH`` applies only to the object's own ``DT_NEEDED`` entries, while ``DT_RPATH``
  (ignored when the same object has a ``DT_RUNPATH``) is inherited down the chain of loaders
  and the executable's ``DT_RPATH`` is always tried;
- ``/etc/ld.so.conf`` (with ``include`` globs) stands in for ``ld.so.cache``, tried after the
  paths above and before the default directories; candidates of the wrong ELF class or machine
  are skipped, as ld.so does;
- every symbolic link met on the way to a file is recorded (``/lib64`` → ``usr/lib64``,
  ``ld-linux-x86-64.so.2`` → ``…``), so the image holds each file at its real path and the same
  links in front of it. The image therefore reproduces the host's merged-``/usr`` links instead
  of copying files to the names the loader asks for: every path the host's loader would open
  opens the same file in the image, with no duplicate copies.

A library found only through ``ld.so.conf`` gets an extra link in the first default directory,
because the image carries no ``ld.so.cache``. ``dlopen()`` calls stay invisible, as for every
static tool; ``glibc-hwcaps`` subdirectories are not searched.
"""

from __future__ import annotations

import glob
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

# Debian multiarch triplets by (ELF class, e_machine); glibc's configured search dirs use them.
_MULTIARCH = {
    (64, "EM_X86_64"): "x86_64-linux-gnu",
    (32, "EM_386"): "i386-linux-gnu",
    (64, "EM_AARCH64"): "aarch64-linux-gnu",
    (32, "EM_ARM"): "arm-linux-gnueabihf",
    (64, "EM_RISCV"): "riscv64-linux-gnu",
    (64, "EM_PPC64"): "powerpc64le-linux-gnu",
    (64, "EM_S390"): "s390x-linux-gnu",
}
# Dynamic tags whose value is a string, and the DynamicTag attribute pyelftools gives it under.
_STRING_TAGS = {
    "DT_NEEDED": "needed",
    "DT_RPATH": "rpath",
    "DT_RUNPATH": "runpath",
    "DT_SONAME": "soname",
}
_PLATFORM = {"EM_X86_64": "x86_64", "EM_386": "i686", "EM_AARCH64": "aarch64"}


class ElfClosureError(Exception):
    """A binary is not a usable ELF file or one of its libraries cannot be found."""


@dataclass(frozen=True)
class ElfInfo:
    """The dynamic-linking facts of one ELF file."""

    path: PurePosixPath
    elf_class: int
    machine: str
    interpreter: PurePosixPath | None
    soname: str | None
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]


@dataclass(frozen=True)
class Symlink:
    """A symbolic link at ``path`` (absolute, in the image as on the host) reading ``target``."""

    path: PurePosixPath
    target: str


@dataclass(frozen=True)
class Closure:
    """Everything an image needs so that the given binaries start."""

    files: tuple[PurePosixPath, ...]
    """Real files (no link among them), sorted, host paths = image paths."""
    symlinks: tuple[Symlink, ...]
    """Links to reproduce in front of those files, sorted by path."""
    libraries: dict[str, PurePosixPath]
    """Each ``DT_NEEDED`` name → the path the loader opens for it."""


def read_elf(path: Path, root: Path = Path("/")) -> ElfInfo:
    """Read ``path`` (an absolute path inside ``root``) as ELF; raise ElfClosureError if not."""
    host = _host(root, PurePosixPath(path))
    try:
        with open(host, "rb") as f:
            elf = ELFFile(f)
            interp: PurePosixPath | None = None
            for segment in elf.iter_segments():
                if isinstance(segment, InterpSegment):
                    interp = PurePosixPath(segment.get_interp_name())
            strings: dict[str, list[str]] = {attr: [] for attr in _STRING_TAGS.values()}
            for section in elf.iter_sections():
                if isinstance(section, DynamicSection):
                    for tag in section.iter_tags():
                        attr = _STRING_TAGS.get(tag.entry.d_tag)
                        if attr is not None:
                            strings[attr].append(str(getattr(tag, attr)))
            return ElfInfo(
                path=PurePosixPath(path),
                elf_class=elf.elfclass,
                machine=elf["e_machine"],
                interpreter=interp,
                soname=strings["soname"][0] if strings["soname"] else None,
                needed=tuple(strings["needed"]),
                rpath=tuple(p for value in strings["rpath"] for p in value.split(":") if p),
                runpath=tuple(p for value in strings["runpath"] for p in value.split(":") if p),
            )
    except (ELFError, OSError) as e:
        raise ElfClosureError(f"{path}: not a readable ELF file ({e})") from e


def ld_so_conf_dirs(root: Path = Path("/"), conf: str = "/etc/ld.so.conf") -> list[str]:
    """The directories listed by ``ld.so.conf`` and its ``include`` files, in order."""
    dirs: list[str] = []
    seen: set[str] = set()

    def parse(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        try:
            text = _host(root, PurePosixPath(name)).read_text()
        except OSError:
            return
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("include") and line[7:8].isspace():
                for pattern in line[7:].split():
                    if not pattern.startswith("/"):
                        pattern = str(PurePosixPath(name).parent / pattern)
                    for match in sorted(glob.glob(str(_host(root, PurePosixPath(pattern))))):
                        parse("/" + os.path.relpath(match, root))
            elif line.startswith("hwcap "):
                continue
            else:
                dirs.extend(d for d in line.replace(",", " ").split() if d.startswith("/"))

    parse(conf)
    return list(dict.fromkeys(dirs))


def default_dirs(elf_class: int, machine: str) -> list[str]:
    """glibc's built-in search directories (``ld.so --help``) for this class and machine.

    Debian's glibc searches the multiarch directories, then ``/lib`` and ``/usr/lib``; distros
    without multiarch use ``/lib64`` and ``/usr/lib64`` for 64-bit objects.
    """
    triplet = _MULTIARCH.get((elf_class, machine))
    if triplet is not None:
        return [f"/lib/{triplet}", f"/usr/lib/{triplet}", "/lib", "/usr/lib"]
    if elf_class == 64:
        return ["/lib64", "/usr/lib64", "/lib", "/usr/lib"]
    return ["/lib", "/usr/lib"]


def resolve_closure(binaries: list[Path], root: Path = Path("/")) -> Closure:
    """The files and links every binary in ``binaries`` needs, loader included.

    Dependencies are loaded breadth-first as ld.so does, and a name already loaded (by path
    name or ``DT_SONAME``) is not searched again. Raises ElfClosureError naming the library
    and the object that needs it when a dependency cannot be found.
    """
    files: set[PurePosixPath] = set()
    links: dict[PurePosixPath, str] = {}
    libraries: dict[str, PurePosixPath] = {}
    conf = ld_so_conf_dirs(root)

    def add_path(path: PurePosixPath) -> PurePosixPath:
        real, chain = _follow(root, path)
        files.add(real)
        for link in chain:
            links[link.path] = link.target
        return real

    for binary in binaries:
        exe = read_elf(binary, root)
        add_path(exe.path)
        if exe.interpreter is not None:
            add_path(exe.interpreter)
        defaults = default_dirs(exe.elf_class, exe.machine)
        loaded: dict[str, PurePosixPath] = {}
        loader_of: dict[PurePosixPath, ElfInfo | None] = {exe.path: None}
        origin = {exe.path: _realpath(root, exe.path).parent}
        queue: deque[ElfInfo] = deque([exe])
        while queue:
            obj = queue.popleft()
            for name in obj.needed:
                if name in loaded:
                    continue
                found, via_conf = _search(root, name, obj, exe, loader_of, origin, conf, defaults)
                if found is None:
                    raise ElfClosureError(
                        f"{obj.path}: needs {name}, which is in none of the search paths "
                        f"({', '.join(defaults + conf)})"
                    )
                lib = read_elf(Path(found), root)
                loaded[name] = found
                if lib.soname:
                    loaded.setdefault(lib.soname, found)
                libraries.setdefault(name, found)
                add_path(found)
                if via_conf:
                    links.setdefault(PurePosixPath(defaults[0]) / name, str(found))
                if found not in loader_of:
                    loader_of[found] = obj
                    origin[found] = found.parent
                    queue.append(lib)
    return Closure(
        files=tuple(sorted(files)),
        symlinks=tuple(Symlink(p, t) for p, t in sorted(links.items())),
        libraries=dict(sorted(libraries.items())),
    )


def _search(
    root: Path,
    name: str,
    obj: ElfInfo,
    exe: ElfInfo,
    loader_of: dict[PurePosixPath, ElfInfo | None],
    origin: dict[PurePosixPath, PurePosixPath],
    conf: list[str],
    defaults: list[str],
) -> tuple[PurePosixPath | None, bool]:
    """Where ld.so finds ``name`` for ``obj``; the flag says it came from ld.so.conf only."""
    if "/" in name:
        path = PurePosixPath(name)
        return (path if _matches(root, path, obj) else None), False
    candidates: list[str] = []
    if not obj.runpath:
        chain: ElfInfo | None = obj
        while chain is not None:
            if not chain.runpath:
                candidates += _expand(chain.rpath, origin[chain.path], chain)
            chain = loader_of.get(chain.path)
        if not exe.runpath:
            candidates += _expand(exe.rpath, origin[exe.path], exe)
    candidates += _expand(obj.runpath, origin[obj.path], obj)
    for directory in candidates:
        path = PurePosixPath(directory) / name
        if _matches(root, path, obj):
            return path, False
    for directory in conf:
        path = PurePosixPath(directory) / name
        if _matches(root, path, obj):
            return path, directory not in defaults
    for directory in defaults:
        path = PurePosixPath(directory) / name
        if _matches(root, path, obj):
            return path, False
    return None, False


def _expand(paths: tuple[str, ...], origin: PurePosixPath, obj: ElfInfo) -> list[str]:
    triplet = _MULTIARCH.get((obj.elf_class, obj.machine))
    lib = f"lib/{triplet}" if triplet else ("lib64" if obj.elf_class == 64 else "lib")
    subst = {
        "ORIGIN": str(origin),
        "LIB": lib,
        "PLATFORM": _PLATFORM.get(obj.machine, ""),
    }
    out = []
    for p in paths:
        for key, value in subst.items():
            p = p.replace("${" + key + "}", value).replace("$" + key, value)
        out.append(os.path.normpath(p))
    return out


def _matches(root: Path, path: PurePosixPath, obj: ElfInfo) -> bool:
    """The file exists and has ``obj``'s class and machine (ld.so skips other ones)."""
    host = _host(root, path)
    if not host.is_file():
        return False
    try:
        with open(host, "rb") as f:
            elf = ELFFile(f)
            return bool(elf.elfclass == obj.elf_class and elf["e_machine"] == obj.machine)
    except (ELFError, OSError):
        return False


def _host(root: Path, path: PurePosixPath) -> Path:
    return root / str(path).lstrip("/")


def _realpath(root: Path, path: PurePosixPath) -> PurePosixPath:
    return _follow(root, path)[0]


def _follow(root: Path, path: PurePosixPath) -> tuple[PurePosixPath, list[Symlink]]:
    """Resolve ``path`` inside ``root`` component by component, recording every link met."""
    links: list[Symlink] = []
    pending = list(PurePosixPath(os.path.normpath(path)).parts[1:])
    current = PurePosixPath("/")
    for _ in range(256):
        if not pending:
            return current, links
        part = pending.pop(0)
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        host = _host(root, candidate)
        if host.is_symlink():
            target = os.readlink(host)
            links.append(Symlink(candidate, target))
            rest = PurePosixPath(target).parts
            if target.startswith("/"):
                current = PurePosixPath("/")
                rest = rest[1:]
            pending[:0] = list(rest)
        else:
            current = candidate
    raise ElfClosureError(f"{path}: too many levels of symbolic links")
