"""Kernel module resolution on generated modules directories and on a real Debian kernel."""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from initrd.kmod import DEFAULT_MODULES, ModuleError, decompress, resolve_modules
from qemu.kernel import Kernel


def fake_ko(modinfo: dict[str, list[str]] | list[str]) -> bytes:
    """A minimal ELF64 relocatable whose only content is a ``.modinfo`` section."""
    pairs = (
        modinfo
        if isinstance(modinfo, list)
        else [f"{k}={v}" for k, values in modinfo.items() for v in values]
    )
    info = b"".join(p.encode() + b"\0" for p in pairs)
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    info_off = 64
    str_off = info_off + len(info)
    sh_off = (str_off + len(shstrtab) + 7) & ~7
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 3, 2)
    body = header + info + shstrtab
    body += bytes(sh_off - len(body))
    sections = bytes(64)
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, info_off, len(info), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, str_off, len(shstrtab), 0, 0, 1, 0)
    return body + sections


def add(root: Path, rel: str, **info: list[str]) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = fake_ko({"name": [Path(rel).name.split(".")[0].replace("-", "_")], **info})
    if rel.endswith(".xz"):
        data = lzma.compress(data)
    elif rel.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture
def kdir(tmp_path: Path) -> Path:
    """Modules laid out like erofs on Debian 6.1, without depmod's index files."""
    root = tmp_path / "6.1.0-test"
    add(root, "kernel/fs/erofs/erofs.ko", depends=["libcrc32c"], alias=["fs-erofs"])
    add(root, "kernel/lib/libcrc32c.ko", depends=[""], softdep=["pre: crc32c"])
    add(root, "kernel/arch/x86/crypto/crc32c-intel.ko.xz", alias=["crypto-crc32c", "crc32c"])
    add(root, "kernel/drivers/virtio/virtio_pci_modern_dev.ko")
    add(root, "kernel/drivers/virtio/virtio_pci_legacy_dev.ko.gz")
    add(
        root,
        "kernel/drivers/virtio/virtio_pci.ko",
        depends=["virtio_pci_modern_dev,virtio_pci_legacy_dev"],
    )
    (root / "modules.builtin").write_text(
        "kernel/fs/ext4/ext4.ko\nkernel/crypto/crc32c_generic.ko\n"
    )
    (root / "modules.builtin.modinfo").write_bytes(b"crc32c_generic.alias=crc32c\0")
    return root


def names(kdir: Path, *wanted: str) -> list[str]:
    return [m.name for m in resolve_modules(kdir, wanted).modules]


def test_dependencies_and_soft_pre_dependencies_load_first(kdir: Path) -> None:
    assert names(kdir, "erofs") == ["crc32c_intel", "libcrc32c", "erofs"]
    assert names(kdir, "virtio_pci") == [
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio_pci",
    ]


def test_filesystems_and_softdog_are_loaded_for_their_needs_the_rest_at_the_start(
    kdir: Path,
) -> None:
    add(kdir, "kernel/fs/xfs/xfs.ko", depends=["libcrc32c"], alias=["fs-xfs"])
    add(kdir, "kernel/drivers/watchdog/watchdog.ko")
    add(kdir, "kernel/drivers/watchdog/softdog.ko", depends=["watchdog"])
    add(kdir, "kernel/drivers/block/loop.ko", alias=["devname:loop-control"])
    needs = {
        m.name: m.needs for m in resolve_modules(kdir, ["erofs", "xfs", "softdog", "loop"]).modules
    }
    assert needs == {
        "crc32c_intel": ("fs-erofs", "fs-xfs"),
        "libcrc32c": ("fs-erofs", "fs-xfs"),
        "erofs": ("fs-erofs",),
        "xfs": ("fs-xfs",),
        "watchdog": ("watchdog",),
        "softdog": ("watchdog",),
        "loop": ("loop",),  # only where an image does not mount from its file
    }
    # A dependency that something loaded at the start needs is loaded at the start.
    add(kdir, "kernel/drivers/md/needs_crc.ko", depends=["libcrc32c"])
    needs = {m.name: m.needs for m in resolve_modules(kdir, ["erofs", "needs_crc"]).modules}
    assert needs == {"crc32c_intel": (), "libcrc32c": (), "erofs": ("fs-erofs",), "needs_crc": ()}


def test_dash_and_underscore_are_the_same_name(kdir: Path) -> None:
    assert names(kdir, "crc32c-intel") == names(kdir, "crc32c_intel") == ["crc32c_intel"]


def test_builtin_modules_are_skipped_without_error(kdir: Path) -> None:
    result = resolve_modules(kdir, ["ext4", "erofs"])
    assert result.builtin == ("ext4",)
    assert "ext4" not in [m.name for m in result.modules]


def test_compressed_modules_are_decompressed_under_a_ko_name(kdir: Path) -> None:
    modules = {m.name: m for m in resolve_modules(kdir, ["erofs", "virtio_pci"]).modules}
    intel = modules["crc32c_intel"]
    assert intel.relative == "kernel/arch/x86/crypto/crc32c-intel.ko"
    assert decompress(intel.source).startswith(b"\x7fELF")
    assert decompress(modules["virtio_pci_legacy_dev"].source).startswith(b"\x7fELF")


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is not installed")
def test_zstd_modules_are_decompressed_with_the_zstd_command(kdir: Path) -> None:
    plain = kdir / "kernel/fs/erofs/erofs.ko"
    subprocess.run(["zstd", "-q", "--rm", str(plain)], check=True)
    assert decompress(plain.with_suffix(".ko.zst")) == fake_ko(
        {"name": ["erofs"], "depends": ["libcrc32c"], "alias": ["fs-erofs"]}
    )
    assert names(kdir, "erofs")[-1] == "erofs"


def test_a_missing_module_names_itself_and_the_directory(kdir: Path) -> None:
    with pytest.raises(ModuleError, match=rf"kernel module nosuch \(requested\).*{kdir}"):
        resolve_modules(kdir, ["erofs", "nosuch"])


def test_a_missing_hard_dependency_names_who_needs_it(kdir: Path) -> None:
    add(kdir, "kernel/fs/broken.ko", depends=["gone"])
    with pytest.raises(ModuleError, match=r"kernel module gone \(needed by broken\)"):
        resolve_modules(kdir, ["broken"])


def test_a_missing_modules_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModuleError, match="no such modules directory"):
        resolve_modules(tmp_path / "nope", ["loop"])


def test_a_file_that_is_not_a_module_is_a_clear_error(kdir: Path) -> None:
    (kdir / "kernel/fs/junk.ko").write_bytes(b"not elf")
    with pytest.raises(ModuleError, match=r"junk\.ko: not a kernel module"):
        resolve_modules(kdir, ["junk"])


def test_depmod_index_files_are_used_when_present(kdir: Path) -> None:
    (kdir / "modules.dep").write_text(
        "kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko\n"
        "kernel/lib/libcrc32c.ko:\n"
        "kernel/arch/x86/crypto/crc32c-intel.ko.xz:\n"
    )
    (kdir / "modules.softdep").write_text("# Soft dependencies\nsoftdep libcrc32c pre: crc32c\n")
    (kdir / "modules.alias").write_text("alias crc32c crc32c_intel\n")
    # The .ko files are not read at all now: break one to prove it.
    (kdir / "kernel/lib/libcrc32c.ko").write_bytes(b"")
    assert names(kdir, "erofs") == ["crc32c_intel", "libcrc32c", "erofs"]


def test_debian_cloud_kernel_defaults_resolve_in_a_loadable_order(kernel: Kernel) -> None:
    kdir = kernel.modules
    order = [m.name for m in resolve_modules(kdir, DEFAULT_MODULES).modules]
    assert set(DEFAULT_MODULES) <= set(order)
    assert order.index("libcrc32c") < order.index("erofs")
    crc = [n for n in order if n.startswith("crc32c")]
    assert crc and order.index(crc[0]) < order.index("libcrc32c")
    for dep in ("virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"):
        assert order.index(dep) < order.index("virtio_pci")
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_blk")
