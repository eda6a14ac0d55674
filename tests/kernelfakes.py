"""Fake kernels for the deployment side of issue 9: files with just enough of an x86 bzImage
header (``HdrS`` at 0x202, the version string the header points at) for deploy's checks."""

from __future__ import annotations

import struct
from pathlib import Path

VERSION_AT = 0x300


def bzimage(version: str, body: bytes = b"") -> bytes:
    image = bytearray(0x400)
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x20E, VERSION_AT - 0x200)
    text = f"{version} (builder@fake) #1 SMP PREEMPT_DYNAMIC".encode() + b"\0"
    image[VERSION_AT:VERSION_AT + len(text)] = text
    return bytes(image) + body


def add_kernel(root: Path, version: str, *, convention: str = "bootc",
               initramfs: bytes | None = b"initramfs of ", modules: bool = True) -> Path:
    """Put kernel ``version`` into the root tree at ``root`` the way ``convention`` (bootc or
    debian) does; ``initramfs`` None leaves it without one. Returns the kernel's path."""
    moddir = root / "usr/lib/modules" / version
    if modules or convention == "bootc":
        moddir.mkdir(parents=True, exist_ok=True)
        (moddir / "modules.order").write_text("")
    if convention == "bootc":
        kernel = moddir / "vmlinuz"
        initrd = moddir / "initramfs.img"
    else:
        (root / "boot").mkdir(exist_ok=True)
        kernel = root / "boot" / f"vmlinuz-{version}"
        initrd = root / "boot" / f"initrd.img-{version}"
    kernel.write_bytes(bzimage(version, f"kernel {version}".encode()))
    if initramfs is not None:
        initrd.write_bytes(initramfs + version.encode())
    return kernel
