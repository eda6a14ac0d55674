"""Kernels for the deployment side of issue 9: fake ones, with just enough of an x86 bzImage
header (``HdrS`` at 0x202, the version string the header points at) for deploy's checks; and
the check that a boot pair is one the bootloader can boot (real kernels and initramfs too)."""

from __future__ import annotations

import stat
import struct
from pathlib import Path

VERSION_AT = 0x300
LIST_DIR = "usr/lib/overlayroot/modules.d"


def bzimage(version: str, body: bytes = b"") -> bytes:
    image = bytearray(0x400)
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x20E, VERSION_AT - 0x200)
    text = f"{version} (builder@fake) #1 SMP PREEMPT_DYNAMIC".encode() + b"\0"
    image[VERSION_AT : VERSION_AT + len(text)] = text
    return bytes(image) + body


def add_kernel(
    root: Path,
    version: str,
    *,
    convention: str = "bootc",
    initramfs: bytes | None = b"initramfs of ",
    modules: bool = True,
) -> Path:
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


def archives(data: bytes) -> dict[str, bytes]:
    """The files of concatenated newc archives as the kernel unpacks them (a later one replaces
    an earlier one; zero padding between archives skipped), symlinks as ``b"->" + target``;
    AssertionError for bytes that are not whole archives."""
    found: dict[str, bytes] = {}
    at = 0
    while at < len(data):
        if data[at] == 0:
            at += 1
            continue
        while True:
            header = data[at : at + 110]
            assert len(header) == 110 and header[:6] == b"070701", f"no cpio header at {at}"
            fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
            size, namesize = fields[6], fields[11]
            name_end = at + 110 + namesize
            name = data[at + 110 : name_end - 1].decode()
            start = name_end + (-name_end % 4)
            end = start + size
            assert end <= len(data), f"{name} is cut short"
            at = end + (-end % 4)
            if name == "TRAILER!!!":
                break
            if stat.S_ISREG(fields[1]):
                found[name] = data[start:end]
            elif stat.S_ISLNK(fields[1]):
                found[name] = b"->" + data[start:end]
    return found


def lookup(image: dict[str, bytes], path: str) -> bytes | None:
    """The file at absolute ``path`` in ``image`` (from :func:`archives`), through symlinks in
    its directories (``/lib`` → ``usr/lib``)."""
    parts = path.strip("/").split("/")
    resolved: list[str] = []
    for hops, part in enumerate(parts):
        resolved.append(part)
        entry = image.get("/".join(resolved))
        if entry is not None and entry.startswith(b"->") and hops < len(parts) - 1:
            target = entry[2:].decode()
            resolved = (
                target.strip("/").split("/")
                if target.startswith("/")
                else [*resolved[:-1], *target.split("/")]
            )
    return image.get("/".join(resolved))


def release_of(kernel: bytes) -> str:
    pointer = int.from_bytes(kernel[0x20E:0x210], "little") + 0x200
    return kernel[pointer:].split(b" ", 1)[0].decode()


def assert_bootable(
    directory: Path, kernels: dict[str, bytes], *, zstd: bool = False, module: bytes | None = None
) -> str:
    """The pair in ``directory`` is a whole kernel of ``kernels`` and a whole initramfs whose
    stage finds that kernel's own module list, and every module in it (``module``: what each
    holds; None: any ELF file); returns the release. ``zstd``: the initramfs is zstd frames."""
    kernel = (directory / "vmlinuz").read_bytes()
    assert kernel in kernels.values(), "vmlinuz is no whole kernel"
    release = release_of(kernel)
    data = (directory / "initrd.img").read_bytes()
    if zstd:
        import subprocess

        result = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True)
        assert result.returncode == 0, f"initrd.img is not whole zstd frames: {result.stderr!r}"
        data = result.stdout
    image = archives(data)
    assert "init" in image
    listing = image.get(f"{LIST_DIR}/{release}.list")
    assert listing is not None, f"the initramfs has no module list for {release}"
    # One module a line: its path, then the needs it is loaded for (fs-erofs, watchdog, cpu:…).
    for path in (line.split()[0] for line in listing.decode().splitlines() if line.strip()):
        content = lookup(image, path)
        assert content is not None, f"{path} is listed but missing"
        if module is None:
            assert content[:4] == b"\x7fELF", path
        else:
            assert content == module.replace(b"{release}", release.encode()), path
    return release
