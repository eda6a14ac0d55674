"""The boot pair: one kernel and one initramfs that a single static bootloader entry loads
(docs/kernels.md), promoted by ``overlayroot bless`` (and ``overlayroot promote``) to the kernel
of the newest good deployment that has one.

The pair lives in a directory the bootloader can read and the running system can write: by
default ``overlayroot/boot/`` on the state filesystem (``/run/overlayroot/state/overlayroot/boot``
in a booted system; GRUB and extlinux read ext4, btrfs and xfs), or, with ``--boot-dir`` or the
one line of ``/etc/overlayroot/boot-dir``, a directory on the ESP (vfat, for systemd-boot):

```
<boot-dir>/vmlinuz  <boot-dir>/initrd.img  <boot-dir>/pair.json
```

A promotion from kernel A (with initramfs IA) to kernel B (with IB) writes each file whole under
a temporary name, fsyncs it, renames it over the old one and fsyncs the directory, in this order:

1. ``initrd.img`` := the current ``initrd.img`` followed by IB: the *bridge*. The kernel unpacks
   concatenated archives in turn, later files replacing earlier ones, so the bridge is IB's
   stage with both kernels' modules (``/lib/modules/<release>/`` and each kernel's own list,
   ``/usr/lib/overlayroot/modules.d/<release>.list``): it boots under A and under B;
2. ``vmlinuz`` := B (the bridge boots it);
3. ``initrd.img`` := IB alone;
4. ``pair.json`` := what the pair holds (for people; ``status`` checks the files themselves).

So at every point the bootloader finds a whole kernel and a whole initramfs that works with it:
(A, IA), (A, IA+IB), (B, IA+IB), (B, IB). A promotion cut short is finished by the next one,
which starts from whatever pair is there. Each step is one rename over an existing name: on
vfat, Linux writes the renamed file's first cluster and size into the target's directory entry
in place, then frees the source's entry; with the directory's entries in one sector (``TEMPORARY``)
both reach the disk in one write, so the name points at the old file or the new one.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from overlayroot.commands import target
from overlayroot.core import bootstate, digest, files, layout
from overlayroot.core.errors import BootError
from overlayroot.core.safejson import parse_json

KERNEL = "vmlinuz"
INITRD = "initrd.img"
RECORD = "pair.json"
# Each file is written under a temporary name first. The names are short (8.3, lower case:
# vfat gives such a name one directory entry, no long-name entries), so that the directory's
# few entries share its first sector, and a rename's two entry updates reach the disk together.
TEMPORARY = {KERNEL: "vmlinuz.new", INITRD: "initrd.new", RECORD: "pair.new"}
BOOT_DIR = "boot"  # under overlayroot/ on the state filesystem
CONFIG = "/etc/overlayroot/boot-dir"
CONFIG_LIMIT = 4096
RECORD_LIMIT = 1 << 16


class Disk:
    """The writes a promotion makes, one call each, so that a test can cut the power between
    any two of them (tests/host/test_bootpair.py)."""

    def create(self, path: Path) -> int:
        return os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, source: Path, destination: Path) -> None:
        os.replace(source, destination)

    def fsync_dir(self, path: Path) -> None:
        files.fsync_dir(path)

    def unlink(self, path: Path) -> None:
        os.unlink(path)


def default_dir(paths: layout.StateLayout) -> Path:
    return Path(paths.top) / BOOT_DIR


def boot_dir(where: target.Target, option: str | None) -> Path:
    """``--boot-dir``, else (in the booted system) the directory ``/etc/overlayroot/boot-dir``
    names, else ``overlayroot/boot`` on the state filesystem."""
    if option is not None:
        return Path(option)
    if where.booted is not None:
        try:
            text = files.read_regular(CONFIG, CONFIG_LIMIT).decode().strip()
        except FileNotFoundError:
            text = ""
        except OSError as e:
            raise BootError(
                f"cannot read {CONFIG}: {e.strerror}: it names the boot pair's"
                " directory in one line, e.g. /boot/efi/overlayroot"
            ) from None
        except UnicodeDecodeError:
            raise BootError(
                f"{CONFIG} is not UTF-8 text: write one absolute directory there,"
                " e.g. /boot/efi/overlayroot"
            ) from None
        if text:
            if not text.startswith("/") or "\n" in text:
                raise BootError(
                    f"{CONFIG} holds {text!r}: write one absolute directory there,"
                    " e.g. /boot/efi/overlayroot"
                )
            return Path(text)
    return default_dir(where.layout)


def choose(
    state: bootstate.BootState, manifests: dict[str, layout.Manifest], prefer: str | None
) -> layout.Manifest | None:
    """The deployment whose kernel the pair should hold: ``prefer`` if it is good and has a
    kernel, else the newest good deployment with one; None when no good one has a kernel."""
    good = [
        m
        for k, m in manifests.items()
        if m.kernel is not None
        and k in state.entries
        and state.entries[k].successful
        and not state.entries[k].bad
    ]
    for manifest in good:
        if manifest.id == prefer:
            return manifest
    return max(good, key=lambda m: (m.created, m.id), default=None)


def _sha(path: Path) -> str | None:
    try:
        return digest.file_sha256(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BootError(f"cannot read {path}: {e.strerror}") from None


def _install(disk: Disk, path: Path, parts: list[tuple[Path, str | None]]) -> None:
    """Make ``path`` the concatenation of ``parts`` (each checked against its digest when one is
    given) by a whole new file renamed over it."""
    tmp = path.with_name(TEMPORARY[path.name])
    fd = disk.create(tmp)
    try:
        for source, expected in parts:
            hashed = digest.hasher()
            with files.open_regular(source) as f:
                while chunk := f.read(digest.CHUNK):
                    hashed.update(chunk)
                    disk.write(fd, chunk)
            if expected is not None and hashed.hexdigest() != expected:
                raise BootError(
                    f"{source} does not match the digest in its deployment's"
                    " manifest: it is damaged; the boot pair was left as it was"
                )
        disk.fsync(fd)
    except BaseException:
        disk.close(fd)
        disk.unlink(tmp)
        raise
    disk.close(fd)
    disk.replace(tmp, path)
    disk.fsync_dir(path.parent)


def _write_record(disk: Disk, directory: Path, manifest: layout.Manifest) -> None:
    import json

    assert manifest.kernel is not None
    record = {
        "deployment": manifest.id,
        "version": manifest.kernel.version,
        "vmlinuz_sha256": manifest.kernel.vmlinuz_sha256,
        "initramfs_sha256": manifest.kernel.initramfs_sha256,
        "kargs": manifest.kernel.kargs,
    }
    tmp = directory / TEMPORARY[RECORD]
    fd = disk.create(tmp)
    try:
        disk.write(fd, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        disk.fsync(fd)
    finally:
        disk.close(fd)
    disk.replace(tmp, directory / RECORD)
    disk.fsync_dir(directory)


def promote(
    directory: Path, paths: layout.StateLayout, manifest: layout.Manifest, disk: Disk | None = None
) -> bool:
    """Make the pair in ``directory`` hold ``manifest``'s kernel and initramfs, in an order
    that leaves a bootable pair at every step (this module's docstring). Returns whether
    anything changed. Raises BootError."""
    disk = disk or Disk()
    kernel = manifest.kernel
    if kernel is None:
        raise BootError(f"deployment {manifest.id!r} has no kernel of its own to promote")
    new_kernel = (Path(paths.kernel_path(manifest)), kernel.vmlinuz_sha256)
    new_initrd = (Path(paths.initramfs_path(manifest)), kernel.initramfs_sha256)
    vmlinuz, initrd = directory / KERNEL, directory / INITRD
    try:
        os.makedirs(directory, 0o755, exist_ok=True)
        for leftover in TEMPORARY.values():
            if os.path.lexists(directory / leftover):
                disk.unlink(directory / leftover)
        kernel_sha, initrd_sha = _sha(vmlinuz), _sha(initrd)
        record = read_record(directory)
        if (kernel_sha, initrd_sha) == (kernel.vmlinuz_sha256, kernel.initramfs_sha256):
            if record is None or record.get("deployment") != manifest.id:
                _write_record(disk, directory, manifest)
            return False
        if kernel_sha is not None and kernel_sha != kernel.vmlinuz_sha256 and initrd_sha:
            _install(disk, initrd, [(initrd, None), new_initrd])  # 1. the bridge
        if kernel_sha != kernel.vmlinuz_sha256:
            _install(disk, vmlinuz, [new_kernel])  # 2.
        _install(disk, initrd, [new_initrd])  # 3.
        _write_record(disk, directory, manifest)  # 4.
    except OSError as e:
        raise BootError(
            f"cannot promote {manifest.id}'s kernel to the boot pair in {directory}:"
            f" {e.strerror} ({e.filename}){target.advice(e.errno)}"
        ) from None
    return True


def read_record(directory: Path) -> dict[str, object] | None:
    """``pair.json``, or None when it is missing or damaged (it is only a note)."""
    try:
        data = parse_json(files.read_regular(directory / RECORD, RECORD_LIMIT))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(directory: Path, manifests: dict[str, layout.Manifest]) -> dict[str, object] | None:
    """What the pair in ``directory`` holds, from its files' digests: the deployment whose kernel
    it is (``deployment``, None when none on the state has it), ``version``, and ``complete``
    (False while a promotion is cut short: the bridge initramfs). None for no pair."""
    kernel_sha = _sha(directory / KERNEL)
    if kernel_sha is None:
        return None
    initrd_sha = _sha(directory / INITRD)
    record = read_record(directory) or {}
    owners = [
        m
        for m in manifests.values()
        if m.kernel is not None and m.kernel.vmlinuz_sha256 == kernel_sha
    ]
    owners.sort(
        key=lambda m: (
            m.kernel is not None and m.kernel.initramfs_sha256 == initrd_sha,
            m.id == record.get("deployment"),
        ),
        reverse=True,
    )
    if owners and owners[0].kernel is not None:
        owner: str | None = owners[0].id
        version: object = owners[0].kernel.version
        complete = owners[0].kernel.initramfs_sha256 == initrd_sha
    elif record.get("vmlinuz_sha256") == kernel_sha:
        owner, version = None, record.get("version")
        complete = record.get("initramfs_sha256") == initrd_sha
    else:
        owner, version, complete = None, None, False
    return {
        "dir": str(directory),
        "deployment": owner,
        "version": version,
        "complete": complete,
        "recorded": record.get("deployment"),
    }


def summary(pair: dict[str, object] | None, directory: Path) -> str:
    if pair is None:
        return (
            f"boot pair: none yet in {directory} (bless or `overlayroot promote` a"
            " deployment with a kernel of its own)"
        )
    if pair["deployment"] is not None:
        held = f"the kernel {pair['version']} of {pair['deployment']}"
    elif pair["version"] is not None:
        held = (
            f"the kernel {pair['version']} of {pair['recorded']}, a deployment no longer on"
            " the state filesystem"
        )
    else:
        held = "a kernel of no deployment here"
    state = (
        ""
        if pair["complete"]
        else (
            " (a promotion was cut short: its initramfs is the bridge; the next bless finishes it)"
        )
    )
    return f"boot pair in {directory}: {held}{state}"


def run_promote(args: argparse.Namespace) -> int:
    where = target.find(args.sysroot)
    where.require_state()
    target.require_root("overlayroot promote", where)
    directory = boot_dir(where, args.boot_dir)
    with target.locked(where.layout):
        state = where.load()
        if args.id is not None:
            where.check_known(state, args.id)
            manifest = where.layout.read_manifest(args.id)
            if manifest.kernel is None:
                raise BootError(
                    f"{args.id} has no kernel of its own (it boots under the running"
                    " kernel): there is nothing to promote"
                )
        else:
            found = choose(state, _manifests(where, state), None)
            if found is None:
                raise BootError(
                    f"no known-good deployment on {where.where} has a kernel of its"
                    " own: deploy one with its kernel and bless it, or name one"
                )
            manifest = found
        changed = promote(directory, where.layout, manifest)
    assert manifest.kernel is not None
    verb = "promoted" if changed else "already held"
    print(
        f"{verb}: the boot pair in {directory} holds the kernel {manifest.kernel.version} of"
        f" {manifest.id}"
    )
    return 0


def after_bless(where: target.Target, blessed: str, option: str | None) -> str | None:
    """Promote the newest good deployment's kernel (``blessed``'s, if it has one) after a
    bless; a line to print, or None when no good deployment has a kernel."""
    directory = boot_dir(where, option)
    with target.locked(where.layout):
        state = where.load()
        manifest = choose(state, _manifests(where, state), blessed)
        if manifest is None or manifest.kernel is None:
            return None
        changed = promote(directory, where.layout, manifest)
    verb = "promoted to" if changed else "already holds"
    return (
        f"the boot pair in {directory} {verb} the kernel {manifest.kernel.version} of {manifest.id}"
    )


def _manifests(where: target.Target, state: bootstate.BootState) -> dict[str, layout.Manifest]:
    found = {}
    for k in state.entries:
        try:
            found[k] = where.layout.read_manifest(k)
        except BootError:
            continue  # status and gc say so; a damaged manifest is never promoted
    return found
