"""``Manifest.sha256`` and ``Manifest.blake2b``: the digests of an image file, or of a canonical
walk of a tree.

One hashing loop for the boot stage (which checks an image before its first boot) and for
``deploy`` (which records the digests). Not ``hashlib``: it would pull OpenSSL's libcrypto into
the initramfs; the interpreter's own modules serve (``_sha256`` up to Python 3.11, ``_sha2``
from 3.12, ``_blake2``). The stage checks BLAKE2b-256 where the manifest has it: CPython's
BLAKE2b takes 14 instructions a byte, its sha256 48 (callgrind), and a first boot hashes the
whole image.
"""

from __future__ import annotations

import os
import stat
import sys

from overlayroot.core import files

# Asked by version, not by trying: a failed import searches every sys.path entry.
if sys.version_info >= (3, 12):
    from _sha2 import sha256  # type: ignore[import-not-found]
else:
    from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]
try:  # in every CPython unless built without it; then manifests keep to sha256
    from _blake2 import blake2b as _blake2b

    HAS_BLAKE2B = True
except ImportError:  # pragma: no cover - no such interpreter here
    HAS_BLAKE2B = False

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    class _Digest(Protocol):
        def update(self, data: bytes, /) -> None: ...

    class Hasher(_Digest, Protocol):
        def hexdigest(self) -> str: ...


CHUNK = 1 << 20


def hasher() -> Hasher:
    """A new sha256 object (``update``, ``hexdigest``), for digests of data in passing."""
    new: Hasher = sha256()
    return new


def file_sha256(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> str:
    """The digest of the regular file at ``path`` (never through a symlink: one to /dev/zero
    would be read forever). Raises ``OSError``."""
    digest = sha256()
    _read_into(path, digest, 0, progress)
    return str(digest.hexdigest())


def file_blake2b(path: str | os.PathLike[str]) -> str:
    """The BLAKE2b-256 digest of the regular file at ``path``, as ``file_sha256`` reads it.
    Only where ``HAS_BLAKE2B``."""
    digest = _blake2b(digest_size=32)
    _read_into(path, digest, 0, None)
    return str(digest.hexdigest())


class _Both:
    """Feeds one read to two digests."""

    __slots__ = ("first", "second")

    def __init__(self, first: _Digest, second: _Digest) -> None:
        self.first, self.second = first, second

    def update(self, data: bytes, /) -> None:
        self.first.update(data)
        self.second.update(data)


def image_digests(
    path: str | os.PathLike[str], progress: Callable[[int], None] | None = None
) -> tuple[str, str | None]:
    """``Manifest.sha256`` and ``Manifest.blake2b`` of a staged image, in one read: the file's
    digests, or for a ``dir`` deployment the digest of a canonical walk (``tree_sha256``) and
    None (a tree is not checked at boot). ``progress`` is told the bytes read so far."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        return tree_sha256(path, progress), None
    first = sha256()
    if not HAS_BLAKE2B:
        _read_into(path, first, 0, progress)
        return str(first.hexdigest()), None
    second = _blake2b(digest_size=32)
    _read_into(path, _Both(first, second), 0, progress)
    return str(first.hexdigest()), str(second.hexdigest())


def image_sha256(
    path: str | os.PathLike[str], progress: Callable[[int], None] | None = None
) -> str:
    """``Manifest.sha256`` of a staged image (see ``image_digests``)."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        return tree_sha256(path, progress)
    return file_sha256(path, progress)


def _read_into(
    path: str | os.PathLike[str] | bytes,
    digest: _Digest,
    done: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Feed the regular file at ``path`` to ``digest`` in 1 MiB chunks, telling ``progress``
    the bytes read so far (``done`` before this file); returns the new count."""
    with files.open_regular(os.fsdecode(path)) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done)
    return done


def tree_sha256(root: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> str:
    """Digest of a directory tree that depends on names, types, modes, owners, xattrs, symlink
    targets, device numbers and file contents, not on mtimes, inode numbers or the order the
    filesystem lists entries in. Entries are visited depth first, names sorted bytewise; each
    field is length-prefixed so no name can forge a boundary."""
    digest = sha256()
    done = 0

    def field(value: bytes) -> None:
        digest.update(b"%d:" % len(value) + value)

    def visit(path: bytes, rel: bytes) -> None:
        nonlocal done
        st = os.lstat(path)
        field(rel)
        field(b"%o %d %d" % (st.st_mode, st.st_uid, st.st_gid))
        for attr in sorted(os.listxattr(path, follow_symlinks=False)):
            field(os.fsencode(attr) + b"=" + os.getxattr(path, attr, follow_symlinks=False))
        if stat.S_ISREG(st.st_mode):
            content = sha256()
            done = _read_into(path, content, done, progress)
            field(content.digest())
        elif stat.S_ISLNK(st.st_mode):
            field(os.readlink(path))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            field(b"%d,%d" % (os.major(st.st_rdev), os.minor(st.st_rdev)))
        elif stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(path))
            field(b"%d" % len(names))
            for name in names:
                visit(path + b"/" + name, rel + b"/" + name if rel else name)

    visit(os.fsencode(root), b"")
    return str(digest.hexdigest())
