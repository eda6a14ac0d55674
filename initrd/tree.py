"""The image as an in-memory tree of paths, written out as a cpio archive or a directory.

Adding a path resolves its parent directories through the links already in the tree, so once
``/lib`` is the link ``usr/lib`` a file added at ``/lib/modules/…`` lands under ``/usr/lib``
exactly as it would when the kernel unpacks the archive.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from initrd.cpio import Member


class TreeError(Exception):
    """Two things were asked to live at the same path."""


@dataclass(frozen=True)
class Node:
    mode: int
    data: bytes | Path | str = b""
    """Contents (bytes, or a host file read when written), or a link's target (str)."""
    rdev: tuple[int, int] = (0, 0)


class Tree:
    def __init__(self) -> None:
        self._nodes: dict[PurePosixPath, Node] = {PurePosixPath("/"): Node(stat.S_IFDIR | 0o755)}

    def __contains__(self, path: str | PurePosixPath) -> bool:
        return self.resolve(path) in self._nodes

    def mkdir(self, path: str | PurePosixPath, perm: int = 0o755) -> PurePosixPath:
        """Make ``path`` and its parents; return where it landed."""
        real = self.resolve(path)
        node = self._nodes.get(real)
        if node is None:
            self.mkdir(real.parent)
            self._nodes[real] = Node(stat.S_IFDIR | perm)
        elif not stat.S_ISDIR(node.mode):
            raise TreeError(f"{path}: wanted a directory, the image already has a file there")
        return real

    def add_file(self, path: str | PurePosixPath, data: bytes | Path, perm: int = 0o644) -> None:
        self._add(path, Node(stat.S_IFREG | perm, data))

    def add_symlink(self, path: str | PurePosixPath, target: str) -> None:
        self._add(path, Node(stat.S_IFLNK | 0o777, target))

    def add_char_device(
        self, path: str | PurePosixPath, major: int, minor: int, perm: int = 0o600
    ) -> None:
        self._add(path, Node(stat.S_IFCHR | perm, rdev=(major, minor)))

    def resolve(self, path: str | PurePosixPath) -> PurePosixPath:
        """``path`` with its parent directories resolved through the tree's links."""
        path = PurePosixPath(os.path.normpath(PurePosixPath("/") / path))
        if path == PurePosixPath("/"):
            return path
        parent = self._resolve_dir(path.parent, 0)
        return parent / path.name

    def members(self) -> Iterator[Member]:
        """Every entry but ``/``, parents before children, in a fixed order."""
        for path in sorted(self._nodes, key=lambda p: p.parts):
            if path == PurePosixPath("/"):
                continue
            node = self._nodes[path]
            name = str(path)[1:]
            data = node.data
            if isinstance(data, Path):
                data = data.read_bytes()
            elif isinstance(data, str):
                data = data.encode()
            yield Member(name, node.mode, data, node.rdev)

    def _add(self, path: str | PurePosixPath, node: Node) -> None:
        real = self.resolve(path)
        existing = self._nodes.get(real)
        if existing is not None:
            if existing == node:
                return
            raise TreeError(f"{path}: the image already has a different entry there")
        self.mkdir(real.parent)
        self._nodes[real] = node

    def _resolve_dir(self, path: PurePosixPath, depth: int) -> PurePosixPath:
        if depth > 40:
            raise TreeError(f"{path}: too many levels of symbolic links in the image")
        current = PurePosixPath("/")
        for part in path.parts[1:]:
            candidate = current / part
            node = self._nodes.get(candidate)
            if node is not None and stat.S_ISLNK(node.mode):
                target = PurePosixPath(str(node.data))
                joined = target if target.is_absolute() else current / target
                current = self._resolve_dir(PurePosixPath(os.path.normpath(joined)), depth + 1)
            else:
                current = candidate
        return current


def write_directory(dest: Path, members: Iterable[Member], mtime: int = 0) -> None:
    """Materialise ``members`` under ``dest`` (for initramfs generators that copy a payload)."""
    written = []
    for member in members:
        target = dest / member.name
        kind = stat.S_IFMT(member.mode)
        perm = stat.S_IMODE(member.mode)
        if kind == stat.S_IFDIR:
            target.mkdir(exist_ok=True)
            target.chmod(perm)
        elif kind == stat.S_IFREG:
            target.write_bytes(member.data)
            target.chmod(perm)
        elif kind == stat.S_IFLNK:
            target.symlink_to(member.data.decode())
        elif kind == stat.S_IFCHR:
            os.mknod(target, member.mode, os.makedev(*member.rdev))
            target.chmod(perm)  # mknod applies the umask
        written.append(target)
    # Children last touched their parent directories: stamp in reverse order.
    for target in reversed(written):
        os.utime(target, (mtime, mtime), follow_symlinks=False)
