"""Raw disk images with an ext4 filesystem, built and read without mounting anything."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

SECTOR = 512
ALIGN = 1024 * 1024
BLOCK = 4096
DEFAULT_DISK_GUID = "6f7c1e52-9a1d-4c3b-8a0e-000000000001"
LINUX_FILESYSTEM = "8300"


def make_state_disk(
    path: Path,
    content_dir: Path,
    *,
    size_mb: int,
    fs_label: str,
    fs_uuid: str,
    partlabel: str,
    partuuid: str,
    disk_guid: str = DEFAULT_DISK_GUID,
) -> Path:
    """A GPT disk with one 1 MiB-aligned partition holding ext4 populated from `content_dir`.

    The partition spans from 1 MiB to 1 MiB before the end, leaving room for the backup GPT.
    """
    if size_mb < 4:
        raise ValueError(f"a state disk of {size_mb} MiB has no room for a partition")
    _allocate(path, size_mb)
    first = ALIGN // SECTOR
    last = (size_mb * ALIGN - ALIGN) // SECTOR - 1
    _run(
        "sgdisk",
        "--disk-guid", disk_guid,
        "--new", f"1:{first}:{last}",
        "--typecode", f"1:{LINUX_FILESYSTEM}",
        "--change-name", f"1:{partlabel}",
        "--partition-guid", f"1:{partuuid}",
        str(path),
    )  # fmt: skip
    _mkfs(path, content_dir, ALIGN, (size_mb - 2) * ALIGN, fs_label, fs_uuid)
    return path


def copy_for_boot(source: Path, dest: Path) -> Path:
    """``dest``: a copy of the disk image ``source`` for one boot, its holes kept, and already on
    the host's disk (fsync) when the guest starts.

    A boot benchmark must not time the host's own writeback: a fresh copy sits dirty in the
    host's page cache (writeback starts only after 30 s), so the guest's first cache flush (an
    ``fsync``, ext4's remount read-write, journald's flush) would wait while QEMU's
    ``fdatasync`` writes the whole copy out, and whoever flushes first in the boot pays for it.
    """
    subprocess.run(["cp", "--sparse=always", "--", str(source), str(dest)], check=True)
    fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return dest


def make_raw_fs_disk(path: Path, content_dir: Path, size_mb: int, label: str, uuid: str) -> Path:
    """ext4 on the whole disk, no partition table."""
    _allocate(path, size_mb)
    _mkfs(path, content_dir, 0, size_mb * ALIGN, label, uuid)
    return path


def partition_offset(disk: Path, number: int = 1) -> int:
    """Byte offset of a GPT partition in a disk image."""
    info = _run("sgdisk", "--info", str(number), str(disk))
    match = re.search(r"^First sector: (\d+)", info, re.MULTILINE)
    if match is None:
        raise ValueError(f"{disk} has no partition {number}")
    return int(match.group(1)) * SECTOR


def read_file(disk: Path, partition_offset: int, path_in_fs: str) -> bytes:
    """A file's content from the ext4 filesystem at `partition_offset` bytes into `disk`."""
    result = subprocess.run(
        ["debugfs", "-R", f"cat {path_in_fs}", f"{disk}?offset={partition_offset}"],
        capture_output=True,
        check=True,
    )
    # debugfs exits 0 when a file is missing, so its complaint is the only signal.
    if b"File not found" in result.stderr:
        raise FileNotFoundError(f"{path_in_fs} on {disk} at offset {partition_offset}")
    return result.stdout


def write_file(disk: Path, partition_offset: int, path_in_fs: str, data: bytes) -> None:
    """Replace (or create) a file in the ext4 filesystem at `partition_offset` bytes into `disk`,
    owned by root, mode 0644."""
    directory, _, name = path_in_fs.rpartition("/")
    with tempfile.NamedTemporaryFile() as source:
        source.write(data)
        source.flush()
        _debugfs_w(disk, partition_offset, [
            f"cd {directory or '/'}", f"rm {name}", f"write {source.name} {name}",
            f"sif {name} mode 0100644", f"sif {name} uid 0", f"sif {name} gid 0",
        ])  # fmt: skip
    if read_file(disk, partition_offset, path_in_fs) != data:
        raise RuntimeError(f"debugfs did not write {path_in_fs} on {disk}")


def delete_file(disk: Path, partition_offset: int, path_in_fs: str) -> None:
    """Remove a file from the ext4 filesystem at `partition_offset` bytes into `disk`."""
    _debugfs_w(disk, partition_offset, [f"rm {path_in_fs}"])
    try:
        read_file(disk, partition_offset, path_in_fs)
    except FileNotFoundError:
        return
    raise RuntimeError(f"debugfs did not remove {path_in_fs} from {disk}")


def _debugfs_w(disk: Path, partition_offset: int, commands: list[str]) -> None:
    # debugfs reports most failures (a missing file to rm, say) on stderr and exits 0: callers
    # check the result instead.
    subprocess.run(
        ["debugfs", "-w", "-f", "-", f"{disk}?offset={partition_offset}"],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )


def _allocate(path: Path, size_mb: int) -> None:
    path.unlink(missing_ok=True)
    with path.open("wb") as image:
        image.truncate(size_mb * ALIGN)


def _mkfs(path: Path, content: Path, offset: int, size: int, label: str, uuid: str) -> None:
    _run(
        "mke2fs", "-q", "-F",
        "-t", "ext4",
        "-b", str(BLOCK),
        "-L", label,
        "-U", uuid,
        "-E", f"offset={offset},root_owner=0:0,hash_seed={uuid}",
        "-d", str(content),
        str(path),
        str(size // BLOCK),
    )  # fmt: skip


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout
