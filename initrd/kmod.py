"""Kernel modules by name, with their dependencies, in the order they must be loaded.

Uses ``modules.dep``, ``modules.softdep`` and ``modules.alias`` when ``depmod`` made them, and
otherwise reads each module's ``.modinfo`` section (``depends=``, ``softdep=``, ``alias=``), so
a kernel unpacked with ``dpkg -x`` works as well as an installed one. The alias index is built
only when a soft dependency names something that is not a module name (``crc32c``).
Names compare with ``-`` and ``_`` equal, as modprobe does. A name listed in
``modules.builtin`` (or an alias of a built-in module) needs nothing and is skipped.
"""

from __future__ import annotations

import fnmatch
import gzip
import lzma
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from initrd.errors import BuildError

# softdog: the watchdog a trial boot arms when the machine has no hardware one.
DEFAULT_MODULES = ("overlay", "loop", "erofs", "squashfs", "virtio_blk", "virtio_pci", "softdog")
_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class ModuleError(BuildError):
    """A kernel module is missing, unreadable or its dependencies are broken."""


@dataclass(frozen=True)
class ModInfo:
    """What a module declares about itself."""

    depends: tuple[str, ...] = ()
    pre: tuple[str, ...] = ()
    post: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class KernelModule:
    name: str
    source: Path
    """The file in the modules directory (possibly compressed)."""
    relative: str
    """Its path in the image under ``/lib/modules/<kver>/``, always ending in ``.ko``."""
    needs: tuple[str, ...] = ()
    """Empty: the boot stage loads it at its start. Else only when it comes to one of these
    needs (docs/internals.md): ``fs-<type>`` (a filesystem module's own alias) before it mounts
    a filesystem of that type, ``watchdog`` before it arms a watchdog and the machine has
    none."""
    cpus: tuple[str, ...] = ()
    """Its ``cpu:`` modalias patterns (a module for a CPU feature, as crc32c-intel for SSE 4.2):
    the boot stage skips it on a CPU that matches none, as udev would not load it there."""


@dataclass(frozen=True)
class ModuleSet:
    kernel_version: str
    modules: tuple[KernelModule, ...]
    """In load order: dependencies and soft pre-dependencies before the module."""
    builtin: tuple[str, ...] = field(default=())
    """Requested names (or their dependencies) the kernel has built in."""


def normalize(name: str) -> str:
    return name.replace("-", "_")


def decompress(path: Path) -> bytes:
    """The plain ELF contents of a ``.ko``, ``.ko.xz``, ``.ko.gz`` or ``.ko.zst`` file."""
    data = path.read_bytes()
    try:
        if path.name.endswith(".xz"):
            return lzma.decompress(data)
        if path.name.endswith(".gz"):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile: OSError
        raise ModuleError(
            f"{path}: cannot decompress it ({e}); reinstall the kernel's modules"
        ) from None
    if path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ModuleError(f"{path}: is zstd-compressed; install the zstd command")
        result = subprocess.run([zstd, "-dcq"], input=data, capture_output=True)
        if result.returncode != 0:
            raise ModuleError(
                f"{path}: cannot decompress it (zstd:"
                f" {result.stderr.decode(errors='replace').strip()}); reinstall"
                " the kernel's modules"
            )
        return result.stdout
    return data


def parse_modinfo(elf_bytes: bytes, origin: Path) -> ModInfo:
    """Read the ``key=value`` strings of a module's ``.modinfo`` section."""
    data = _modinfo_section(elf_bytes, origin)
    depends: list[str] = []
    pre: list[str] = []
    post: list[str] = []
    aliases: list[str] = []
    for raw in data.split(b"\0"):
        key, sep, value = raw.decode(errors="replace").partition("=")
        if not sep:
            continue
        if key == "depends":
            depends += [normalize(d) for d in value.split(",") if d]
        elif key == "alias":
            aliases.append(value)
        elif key == "softdep":
            p, q = _parse_softdep(value.split())
            pre += p
            post += q
    return ModInfo(tuple(depends), tuple(pre), tuple(post), tuple(aliases))


def _modinfo_section(elf_bytes: bytes, origin: Path) -> bytes:
    """The ``.modinfo`` bytes, found through the section headers alone.

    pyelftools' ``get_section_by_name`` builds every section object of the file (9 ms a
    module); the lazy alias index reads all ~1,100 modules of a distro kernel, so the section
    header table is read here with ``struct`` instead (0.1 ms a module).
    """
    # Slices, not indexes: a file of 4 or 5 bytes has no elf_bytes[5].
    magic, elf_class, byte_order = elf_bytes[:4], elf_bytes[4:5], elf_bytes[5:6]
    if magic != b"\x7fELF" or elf_class not in (b"\1", b"\2") or byte_order not in (b"\1", b"\2"):
        raise ModuleError(f"{origin}: not a kernel module (no ELF header)")
    wide = elf_bytes[4] == 2
    order = "<" if elf_bytes[5] == 1 else ">"
    head = _EHDR64 if wide else _EHDR32
    shdr = _SHDR64 if wide else _SHDR32
    try:
        shoff, shentsize, shnum, shstrndx = struct.unpack_from(order + head, elf_bytes, 0)
        sections = [
            struct.unpack_from(order + shdr, elf_bytes, shoff + i * shentsize) for i in range(shnum)
        ]
        _, str_offset, _ = sections[shstrndx]
        for name_offset, offset, size in sections:
            end = elf_bytes.index(b"\0", str_offset + name_offset)
            if elf_bytes[str_offset + name_offset : end] == b".modinfo":
                return elf_bytes[offset : offset + size]
    except (struct.error, IndexError, ValueError, OverflowError) as e:  # offsets past 2**63
        raise ModuleError(f"{origin}: not a kernel module (bad ELF section table: {e})") from e
    raise ModuleError(f"{origin}: has no .modinfo section; is it a kernel module?")


# Only the fields used: e_shoff, e_shentsize, e_shnum, e_shstrndx; sh_name, sh_offset, sh_size.
_EHDR64 = "40xQ10xHHH"
_EHDR32 = "32xI10xHHH"
_SHDR64 = "I20xQQ"
_SHDR32 = "I12xII"


class ModulesDir:
    """The modules of one kernel: ``/lib/modules/<kver>``."""

    def __init__(self, path: Path) -> None:
        if not path.is_dir():
            raise ModuleError(
                f"{path}: no such modules directory; pass the /lib/modules/<version> "
                "directory of the kernel the image is for"
            )
        self.path = path
        self.kernel_version = path.name
        self._info: dict[str, ModInfo] = {}

    @cached_property
    def files(self) -> dict[str, Path]:
        """Module name → file, from modules.dep or a walk of the directory."""
        found: dict[str, Path] = {}
        dep = self.path / "modules.dep"
        if dep.is_file():
            for line in dep.read_text().splitlines():
                rel = line.partition(":")[0].strip()
                if rel:
                    found.setdefault(_module_name(rel), self.path / rel)
            return found
        for file in sorted(self.path.rglob("*.ko*")):
            if file.name.endswith(_SUFFIXES) and file.is_file():
                found.setdefault(_module_name(file.name), file)
        return found

    @cached_property
    def builtin(self) -> frozenset[str]:
        names: set[str] = set()
        listing = self.path / "modules.builtin"
        if listing.is_file():
            names.update(_module_name(line) for line in listing.read_text().split() if line)
        return frozenset(names)

    @cached_property
    def builtin_aliases(self) -> dict[str, list[str]]:
        """Alias pattern → built-in module names, from modules.builtin.modinfo."""
        aliases: dict[str, list[str]] = {}
        info = self.path / "modules.builtin.modinfo"
        if info.is_file():
            for raw in info.read_bytes().split(b"\0"):
                key, _, value = raw.decode(errors="replace").partition("=")
                module, _, attr = key.partition(".")
                if attr == "alias":
                    aliases.setdefault(value, []).append(normalize(module))
        return aliases

    @cached_property
    def aliases(self) -> dict[str, list[str]]:
        """Alias pattern → module names, from modules.alias or every module's .modinfo."""
        aliases: dict[str, list[str]] = {}
        listing = self.path / "modules.alias"
        if listing.is_file():
            for line in listing.read_text().splitlines():
                words = line.split()
                if len(words) == 3 and words[0] == "alias":
                    aliases.setdefault(words[1], []).append(normalize(words[2]))
            return aliases
        for name in sorted(self.files):
            for alias in self.info(name).aliases:
                aliases.setdefault(alias, []).append(name)
        return aliases

    @cached_property
    def softdeps(self) -> dict[str, tuple[list[str], list[str]]]:
        """Soft dependencies from modules.softdep (depmod writes them there)."""
        result: dict[str, tuple[list[str], list[str]]] = {}
        listing = self.path / "modules.softdep"
        if listing.is_file():
            for line in listing.read_text().splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) >= 3 and words[0] == "softdep":
                    result[normalize(words[1])] = _parse_softdep(words[2:])
        return result

    def info(self, name: str) -> ModInfo:
        if name not in self._info:
            path = self.files[name]
            self._info[name] = parse_modinfo(decompress(path), path)
        return self._info[name]

    def depends(self, name: str) -> tuple[str, ...]:
        dep = self.path / "modules.dep"
        if dep.is_file():
            return self._dep_index.get(name, ())
        return self.info(name).depends

    def soft(self, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if name in self.softdeps:
            pre, post = self.softdeps[name]
            return tuple(pre), tuple(post)
        if (self.path / "modules.dep").is_file():
            return (), ()
        info = self.info(name)
        return info.pre, info.post

    def lookup(self, name: str) -> list[str] | None:
        """Modules that ``name`` (a module name or an alias) stands for; [] if built in."""
        norm = normalize(name)
        if norm in self.files:
            return [norm]
        if norm in self.builtin:
            return []
        matches = self._match_alias(name)
        if matches:
            return matches
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.builtin_aliases):
            return []
        return None

    def _match_alias(self, name: str) -> list[str]:
        matches: list[str] = []
        for pattern, modules in self.aliases.items():
            if fnmatch.fnmatchcase(name, pattern):
                matches += [m for m in modules if m in self.files and m not in matches]
        return sorted(matches)

    @cached_property
    def _dep_index(self) -> dict[str, tuple[str, ...]]:
        index: dict[str, tuple[str, ...]] = {}
        for line in (self.path / "modules.dep").read_text().splitlines():
            rel, _, deps = line.partition(":")
            if rel.strip():
                index[_module_name(rel)] = tuple(_module_name(d) for d in deps.split())
        return index


# Requested modules loaded only for a need (besides filesystems, by their fs- alias): a loop
# device only where an image does not mount from its file (before Linux 6.12, squashfs).
ON_DEMAND = {"softdog": "watchdog", "loop": "loop"}


def resolve_modules(modules_dir: Path, names: list[str] | tuple[str, ...]) -> ModuleSet:
    """The modules to load for ``names``, dependencies first. Built-in names are skipped.

    A requested filesystem module (and its dependencies that nothing loaded at the start needs)
    gets its ``fs-<type>`` alias as its need; a requested module of ``ON_DEMAND`` gets that need.

    Raises ModuleError naming the module and the directory when a requested module exists
    neither as a file nor as a built-in. A soft dependency that exists nowhere is skipped, as
    modprobe does; a hard one is an error (the modules directory is broken).
    """
    kernel = ModulesDir(modules_dir)
    order: list[str] = []
    builtin: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, requested_by: str | None, soft: bool) -> None:
        found = kernel.lookup(name)
        if found is None:
            if soft:
                return
            who = f"needed by {requested_by}" if requested_by else "requested"
            raise ModuleError(
                f"kernel module {name} ({who}) is neither a file in {modules_dir} nor "
                "listed in its modules.builtin; check the name and the kernel version"
            )
        if not found:
            builtin.append(normalize(name))
        for module in found:
            if module in order or module in visiting:
                continue
            visiting.add(module)
            pre, post = kernel.soft(module)
            for dep in pre:
                visit(dep, module, soft=True)
            for dep in kernel.depends(module):
                visit(dep, module, soft=False)
            visiting.discard(module)
            if module not in order:
                order.append(module)
            for dep in post:
                visit(dep, module, soft=True)

    for name in names:
        visit(name, None, soft=False)
    needs = _needs(kernel, names, order)
    modules = tuple(
        KernelModule(
            name,
            kernel.files[name],
            _image_path(kernel.path, kernel.files[name]),
            needs[name],
            _cpu_aliases(kernel, name),
        )
        for name in order
    )
    return ModuleSet(kernel.kernel_version, modules, tuple(dict.fromkeys(builtin)))


def _needs(
    kernel: ModulesDir, names: list[str] | tuple[str, ...], order: list[str]
) -> dict[str, tuple[str, ...]]:
    """Per module of ``order``: the needs it is loaded for, or () to load it at the start."""
    at_start: set[str] = set()
    wanted: dict[str, set[str]] = {name: set() for name in order}
    for requested in names:
        for module in kernel.lookup(requested) or []:
            need = ON_DEMAND.get(module) or next(
                (a for a in _aliases_of(kernel, module) if a.startswith("fs-")), None
            )
            for member in _closure(kernel, module, set(order)):
                if need is None:
                    at_start.add(member)
                else:
                    wanted[member].add(need)
    return {name: () if name in at_start else tuple(sorted(wanted[name])) for name in order}


def _cpu_aliases(kernel: ModulesDir, name: str) -> tuple[str, ...]:
    return tuple(a for a in _aliases_of(kernel, name) if a.startswith("cpu:"))


def _aliases_of(kernel: ModulesDir, name: str) -> list[str]:
    """A module's aliases: from depmod's modules.alias when there is one (the modules are not
    read then), else from its own .modinfo."""
    if (kernel.path / "modules.alias").is_file():
        return sorted(p for p, modules in kernel.aliases.items() if name in modules)
    return list(kernel.info(name).aliases)


def _closure(kernel: ModulesDir, module: str, present: set[str]) -> set[str]:
    """``module`` and what it loads with it (dependencies, soft ones), among ``present``."""
    found: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in found or name not in present:
            continue
        found.add(name)
        pre, post = kernel.soft(name)
        for dep in (*pre, *kernel.depends(name), *post):
            todo.extend(kernel.lookup(dep) or [])
    return found


def _parse_softdep(words: list[str]) -> tuple[list[str], list[str]]:
    pre: list[str] = []
    post: list[str] = []
    target = pre
    for word in words:
        if word == "pre:":
            target = pre
        elif word == "post:":
            target = post
        else:
            target.append(word)
    return pre, post


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES[::-1]:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return normalize(base)


def _image_path(modules_dir: Path, file: Path) -> str:
    rel = file.relative_to(modules_dir).as_posix()
    for suffix in (".xz", ".zst", ".gz"):
        if rel.endswith(".ko" + suffix):
            return rel[: -len(suffix)]
    return rel
