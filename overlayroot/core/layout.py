"""The on-disk model of the state filesystem (docs/design.md §3).

```
overlayroot/deployments/<id>/{root.erofs|root.squashfs|root/}, manifest.json
overlayroot/deployments/<id>/vmlinuz, initramfs.img     (a deployment with a kernel of its own)
overlayroot/etc/<id>/{upper,work}
overlayroot/var/  overlayroot/home/
```

Reading is done by the boot stage, writing by ``overlayroot deploy``; both go through here.
The boot stage imports this module, so it avoids ``dataclasses`` (which pulls in ``inspect``,
~20 ms of import on a fast host and many times that under emulation): plain slotted classes.
"""

from __future__ import annotations

import os

from overlayroot.core import files
from overlayroot.core.errors import BootError
from overlayroot.core.safejson import format_json, parse_json

# Type-only imports: the boot stage must not pay for importing ``collections`` (or ``typing``).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

TOP = "overlayroot"
MANIFEST = "manifest.json"
MANIFEST_LIMIT = 1 << 16


class ImageFormat:
    """One way a deployment's root is stored, the one table every part reads: its name in
    manifests and ``deploy --format``, the file (or directory) in the deployment's directory,
    the filesystem type that mounts it (None: a tree, bind-mounted), and the tool that makes it
    with the Debian package that has the tool. ``blkid.SUPERBLOCKS`` recognises the images by
    the same filesystem type."""

    __slots__ = ("fstype", "image", "mkfs", "name", "package")

    def __init__(
        self,
        name: str,
        image: str,
        fstype: str | None = None,
        mkfs: str | None = None,
        package: str | None = None,
    ) -> None:
        self.name = name
        self.image = image
        self.fstype = fstype
        self.mkfs = mkfs
        self.package = package

    def __repr__(self) -> str:
        return f"ImageFormat({self.name!r})"


FORMATS = {
    f.name: f
    for f in (
        ImageFormat("erofs", "root.erofs", "erofs", "mkfs.erofs", "erofs-utils"),
        ImageFormat("squashfs", "root.squashfs", "squashfs", "mksquashfs", "squashfs-tools"),
        ImageFormat("dir", "root"),
    )
}
# What every deployment's root must have: the stage mounts /etc, /var, /home, /run and the API
# filesystems on them (a read-only root cannot grow a directory at boot). deploy refuses a root
# without them; the stage refuses to switch to one.
MOUNT_POINTS = ("etc", "var", "home", "run", "proc", "sys", "dev")
IMAGE_FORMATS = tuple(name for name, f in FORMATS.items() if f.fstype)  # made with a mkfs
# Ids become directory names and appear on the kernel command line: 1 to 64 of these, the first
# a letter or digit.
ID_MAX = 64
_ID_PUNCTUATION = "._+-"


def is_id(name: str) -> bool:
    """Whether ``name`` is a deployment id (ASCII only: ``str.isalnum`` takes "é" and "٣")."""
    return (
        0 < len(name) <= ID_MAX
        and name.isascii()
        and name[0].isalnum()
        and all(c.isalnum() or c in _ID_PUNCTUATION for c in name)
    )


# A deployment's own kernel: its two files, next to the root image (fixed names, as the image's).
KERNEL_FILE = "vmlinuz"
INITRAMFS_FILE = "initramfs.img"
# ``uname -r``: the kernel's release field holds at most 64 characters.
KERNEL_VERSION_MAX = 64
_KERNEL_VERSION_PUNCTUATION = "._+~-"


def is_kernel_version(name: str) -> bool:
    """Whether ``name`` can be a kernel release (``uname -r``): 1 to 64 ASCII letters, digits
    and ``._+~-``, the first a letter or digit."""
    return (
        0 < len(name) <= KERNEL_VERSION_MAX
        and name.isascii()
        and name[0].isalnum()
        and all(c.isalnum() or c in _KERNEL_VERSION_PUNCTUATION for c in name)
    )


def is_hex256(text: str) -> bool:
    """Whether ``text`` is a 256-bit digest (sha256, BLAKE2b-256) in lower-case hex."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def is_karg(word: str) -> bool:
    """Whether ``word`` is one word of a kernel command line: printable ASCII with no white
    space and no double quote (either would merge or split words)."""
    return bool(word) and all("!" <= c <= "~" and c != '"' for c in word)


MAX_KARGS_LENGTH = 1024  # of the arguments joined by spaces; x86's whole command line is 2048
# Arguments that belong to the machine (which state filesystem, which deployment), not to a
# deployment: the stage writes them itself.
RESERVED_KARGS = ("root", "rootfstype", "rootflags", "--")
RESERVED_KARG_PREFIX = "overlayroot."


def check_id(deployment_id: str) -> str:
    if not is_id(deployment_id):
        raise BootError(
            f"invalid deployment id {deployment_id!r}: use 1-64 letters, digits, '.', '_', '+'"
            " or '-', starting with a letter or digit"
        )
    return deployment_id


def check_karg(arg: str) -> str:
    """``arg`` if it may be one of a deployment's kernel arguments; a ValueError says why not."""
    if not is_karg(arg):
        raise ValueError(
            f"kernel argument {arg!r} is not one word of printable ASCII without quotes"
        )
    key = arg.partition("=")[0]
    if key in RESERVED_KARGS or key.startswith(RESERVED_KARG_PREFIX):
        raise ValueError(
            f"kernel argument {arg!r} is the machine's, not a deployment's: the"
            " boot stage sets root=, rootfstype=, rootflags= and overlayroot.* itself"
        )
    return arg


class Kernel:
    """A deployment's own kernel (``manifest.json``'s ``kernel``): its release, its two files
    in the deployment's directory with their digests, and the arguments it boots with."""

    __slots__ = ("initramfs", "initramfs_sha256", "kargs", "version", "vmlinuz", "vmlinuz_sha256")

    def __init__(
        self,
        *,
        version: str,
        vmlinuz_sha256: str,
        initramfs_sha256: str,
        kargs: list[str],
        vmlinuz: str = KERNEL_FILE,
        initramfs: str = INITRAMFS_FILE,
    ) -> None:
        self.version = version  # ``uname -r`` of the kernel
        self.vmlinuz = vmlinuz  # KERNEL_FILE, relative to the deployment's directory
        self.initramfs = initramfs  # INITRAMFS_FILE, likewise
        self.vmlinuz_sha256 = vmlinuz_sha256
        self.initramfs_sha256 = initramfs_sha256
        self.kargs = list(kargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            name: list(self.kargs) if name == "kargs" else getattr(self, name)
            for name in self.__slots__
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Kernel) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.version, self.vmlinuz_sha256, self.initramfs_sha256))

    def __repr__(self) -> str:
        return f"Kernel({self.to_dict()!r})"


class Manifest:
    """What ``manifest.json`` says of one deployment. Immutable once staged.

    ``kernel`` is None for a deployment without a kernel of its own: it boots under whatever
    kernel runs. Such a manifest is written without the field, as before kernels existed.
    ``blake2b`` (BLAKE2b-256 of an image file, which the boot stage checks three times faster
    than its sha256) is None for a tree and in manifests written before it existed; a stage
    without it, or whose Python lacks ``_blake2``, checks ``sha256``."""

    __slots__ = (
        "blake2b",
        "created",
        "format",
        "id",
        "image",
        "kernel",
        "origin",
        "sha256",
        "size",
    )

    def __init__(
        self,
        *,
        id: str,
        created: str,
        format: str,
        image: str,
        sha256: str,
        size: int,
        origin: str,
        kernel: Kernel | None = None,
        blake2b: str | None = None,
    ) -> None:
        self.id = id
        self.created = created  # RFC 3339, UTC
        self.format = format  # a key of FORMATS
        self.image = image  # FORMATS[format].image, relative to the deployment's directory
        self.sha256 = sha256  # of the image file, or of a dir deployment's canonical walk
        self.blake2b = blake2b
        self.size = size
        self.origin = origin
        self.kernel = kernel

    def to_dict(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            name: getattr(self, name)
            for name in self.__slots__
            if name not in ("kernel", "blake2b")
        }
        if self.blake2b is not None:
            fields["blake2b"] = self.blake2b
        if self.kernel is not None:
            fields["kernel"] = self.kernel.to_dict()
        return fields

    def to_json(self) -> str:
        return format_json(self.to_dict(), indent=2) + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"Manifest({self.to_dict()!r})"

    @classmethod
    def from_json(cls, text: str, where: str | os.PathLike[str]) -> Manifest:
        """The manifest in ``text``, read from ``where``; a BootError naming it for anything
        else."""
        try:
            manifest = cls(**_manifest_fields(parse_json(text)))
        except ValueError as e:
            raise BootError(
                f"{where}: not a valid deployment manifest ({e}); this deployment"
                " cannot be used: deploy its image again"
            ) from None
        known = FORMATS.get(manifest.format)
        if known is None or known.image != manifest.image:
            raise BootError(
                f"{where}: format {manifest.format!r} does not match image {manifest.image!r}"
            )
        return manifest


MAX_SIZE = 2**63 - 1  # what a file (off_t) can hold


def _manifest_fields(data: object) -> dict[str, Any]:
    """The fields of a parsed manifest, checked; a ValueError says what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    fields = {"origin": "", "kernel": None, "blake2b": None, **data}
    for name in Manifest.__slots__:
        if name not in fields:
            raise ValueError(f"no {name!r}")
        if name in ("size", "kernel") or (name == "blake2b" and fields[name] is None):
            continue
        if not isinstance(fields[name], str):
            raise ValueError(f"{name!r} is not a string")
        if name in ("sha256", "blake2b") and not is_hex256(fields[name]):
            raise ValueError(f"{name!r} is not 64 lowercase hexadecimal digits")
    size = fields["size"]
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_SIZE:
        raise ValueError(f"'size' is not a whole number of bytes from 0 to {MAX_SIZE}")
    result = {name: fields[name] for name in Manifest.__slots__}
    if fields["kernel"] is not None:
        result["kernel"] = Kernel(**_kernel_fields(fields["kernel"]))
    return result


def _kernel_fields(data: object) -> dict[str, Any]:
    """The fields of a manifest's ``kernel``, checked; a ValueError says what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("'kernel' is neither null nor a JSON object")
    for name in Kernel.__slots__:
        if name not in data:
            raise ValueError(f"no 'kernel.{name}'")
        if name != "kargs" and not isinstance(data[name], str):
            raise ValueError(f"'kernel.{name}' is not a string")
    if not is_kernel_version(data["version"]):
        raise ValueError(f"'kernel.version' {data['version']!r} is not a kernel release")
    for name, expected in (("vmlinuz", KERNEL_FILE), ("initramfs", INITRAMFS_FILE)):
        if data[name] != expected:
            raise ValueError(f"'kernel.{name}' is {data[name]!r}, not {expected!r}")
    for name in ("vmlinuz_sha256", "initramfs_sha256"):
        if not is_hex256(data[name]):
            raise ValueError(f"'kernel.{name}' is not 64 lowercase hexadecimal digits")
    kargs = data["kargs"]
    if not isinstance(kargs, list) or not all(isinstance(a, str) for a in kargs):
        raise ValueError("'kernel.kargs' is not a list of strings")
    for arg in kargs:
        check_karg(arg)
    if len(" ".join(kargs)) > MAX_KARGS_LENGTH:
        raise ValueError(f"'kernel.kargs' are longer than {MAX_KARGS_LENGTH} characters")
    return {name: data[name] for name in Kernel.__slots__}


class StateLayout:
    """Paths inside a state filesystem mounted at ``root``, as ``str``: the boot stage does
    without ``pathlib`` (which imports ``re``, ``fnmatch``, ``urllib.parse``, ``ipaddress``…)."""

    __slots__ = ("root",)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)

    @property
    def top(self) -> str:
        return os.path.join(self.root, TOP)

    def file(self, name: str) -> str:
        """A file of the whole state in ``top``: ``boot.json``, ``history.jsonl``, ``.lock``."""
        return os.path.join(self.top, name)

    @property
    def deployments(self) -> str:
        return os.path.join(self.top, "deployments")

    @property
    def etc(self) -> str:
        """The parent of every deployment's ``/etc`` upper and work directories."""
        return os.path.join(self.top, "etc")

    @property
    def var(self) -> str:
        return os.path.join(self.top, "var")

    @property
    def home(self) -> str:
        return os.path.join(self.top, "home")

    def deployment_dir(self, deployment_id: str) -> str:
        return os.path.join(self.deployments, check_id(deployment_id))

    def etc_dir(self, deployment_id: str) -> str:
        """The ``upper`` and ``work`` of one deployment's ``/etc`` overlay."""
        return os.path.join(self.etc, check_id(deployment_id))

    def etc_upper(self, deployment_id: str) -> str:
        return os.path.join(self.etc_dir(deployment_id), "upper")

    def etc_work(self, deployment_id: str) -> str:
        return os.path.join(self.etc_dir(deployment_id), "work")

    def image_path(self, manifest: Manifest) -> str:
        return os.path.join(self.deployment_dir(manifest.id), manifest.image)

    def kernel_path(self, manifest: Manifest) -> str:
        """The deployment's own kernel image; a BootError if it has none."""
        return os.path.join(self.deployment_dir(manifest.id), _kernel_of(manifest).vmlinuz)

    def initramfs_path(self, manifest: Manifest) -> str:
        """The deployment's own initramfs; a BootError if it has no kernel of its own."""
        return os.path.join(self.deployment_dir(manifest.id), _kernel_of(manifest).initramfs)

    def exists(self) -> bool:
        """Whether the state is here: real directories, not symlinks that lead elsewhere."""
        return all(os.path.isdir(p) and not os.path.islink(p) for p in (self.top, self.deployments))

    def deployment_ids(self) -> list[str]:
        """Staged deployments, sorted; half-staged directories (``.``-prefixed) are not ones."""
        try:
            names = os.listdir(self.deployments)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_id(n))

    def read_manifest(self, deployment_id: str) -> Manifest:
        path = os.path.join(self.deployment_dir(deployment_id), MANIFEST)
        try:
            data = files.read_regular(path, MANIFEST_LIMIT)
        except FileNotFoundError:
            raise BootError(f"deployment {deployment_id!r} has no manifest at {path}") from None
        except OSError as e:
            raise BootError(f"cannot read {path}: {e.strerror}") from None
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            raise BootError(
                f"{path}: not a valid deployment manifest (not UTF-8 text:"
                f" {e.reason} at byte {e.start})"
            ) from None
        manifest = Manifest.from_json(text, path)
        if manifest.id != deployment_id:
            raise BootError(f"{path}: manifest id {manifest.id!r} != directory {deployment_id!r}")
        return manifest

    def manifests(self) -> list[Manifest]:
        return [self.read_manifest(i) for i in self.deployment_ids()]


def _kernel_of(manifest: Manifest) -> Kernel:
    if manifest.kernel is None:
        raise BootError(
            f"deployment {manifest.id!r} has no kernel of its own: it boots under"
            " the running kernel"
        )
    return manifest.kernel


def created_stamp(epoch: int) -> str:
    """``Manifest.created`` for a UNIX time: RFC 3339 UTC to the second, so that strings sort
    in time order (``gc`` and a rebuilt boot state compare them as strings)."""
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
