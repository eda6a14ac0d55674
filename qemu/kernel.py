"""The kernel the harness boots: from the environment, or Debian's cloud kernel fetched with apt."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qemu.paths import cache_dir, cache_entry

METAPACKAGE = "linux-image-cloud-amd64"
_CLOUD_IMAGE = re.compile(r"^linux-image-(6\.[0-9.]+-[0-9]+)-cloud-amd64$")


class KernelUnavailable(RuntimeError):
    """No kernel can be had: the message says why and what to do."""


@dataclass(frozen=True)
class Kernel:
    vmlinuz: Path
    modules: Path  # the /lib/modules/<kver> directory
    version: str


def kernel_from_env() -> Kernel | None:
    """`OVERLAYROOT_KERNEL=/path/vmlinuz` and `OVERLAYROOT_KERNEL_MODULES=/lib/modules/<kver>`."""
    vmlinuz = os.environ.get("OVERLAYROOT_KERNEL")
    if not vmlinuz:
        return None
    modules = os.environ.get("OVERLAYROOT_KERNEL_MODULES")
    if not modules:
        raise KernelUnavailable(
            "OVERLAYROOT_KERNEL is set but OVERLAYROOT_KERNEL_MODULES is not: "
            "point it at the kernel's /lib/modules/<kver> directory"
        )
    kernel = Kernel(Path(vmlinuz), Path(modules), Path(modules).name)
    for path in (kernel.vmlinuz, kernel.modules):
        if not path.exists():
            raise KernelUnavailable(f"{path} (from the environment) does not exist")
    return kernel


def debian_cloud_kernel(cache: Path | None = None) -> Kernel:
    """Debian's cloud kernel, downloaded with apt-get and unpacked into the cache once."""
    cache = cache or cache_dir()
    package = _cloud_kernel_package()
    kver = package.removeprefix("linux-image-")
    root = cache / "kernels" / package
    if not (root / ".complete").exists():
        _unpack(package, kver, root)
    return Kernel(root / "boot" / f"vmlinuz-{kver}", root / "lib" / "modules" / kver, kver)


def _cloud_kernel_package() -> str:
    """The concrete package behind the metapackage, else the newest one apt knows."""
    depends = _apt_cache("depends", METAPACKAGE)
    for line in depends.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and _CLOUD_IMAGE.match(name):
            return name
    names = [n for n in _apt_cache("pkgnames", "linux-image-6.").split() if _CLOUD_IMAGE.match(n)]
    if not names:
        raise KernelUnavailable(
            f"apt knows neither {METAPACKAGE} nor any linux-image-6.*-cloud-amd64: "
            "run apt-get update"
        )
    return max(names, key=_version_key)


def _version_key(package: str) -> list[int]:
    match = _CLOUD_IMAGE.match(package)
    assert match is not None
    return [int(part) for part in re.split(r"[.-]", match.group(1)) if part]


def _apt_cache(*args: str) -> str:
    result = subprocess.run(["apt-cache", *args], capture_output=True, text=True)
    if "No packages found" in result.stderr or "no package lists" in result.stderr.lower():
        return ""
    return result.stdout if result.returncode == 0 else ""


def _unpack(package: str, kver: str, root: Path) -> None:
    """Download, extract and depmod into a temp dir, then rename: a crash leaves no half kernel."""
    downloads = root.parent / "debs"
    downloads.mkdir(parents=True, exist_ok=True)
    deb = _download(package, downloads)
    with cache_entry(root) as staging:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
        subprocess.run(["depmod", "-b", str(staging), kver], check=True)


def _download(package: str, downloads: Path) -> Path:
    existing = sorted(downloads.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        result = subprocess.run(
            ["apt-get", "download", package], cwd=tmp, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise KernelUnavailable(
                f"apt-get download {package} failed: {result.stderr.strip()} "
                "(run apt-get update, or set OVERLAYROOT_KERNEL and OVERLAYROOT_KERNEL_MODULES)"
            )
        (deb,) = Path(tmp).glob("*.deb")
        return deb.rename(downloads / deb.name)


def main() -> None:
    """``python -m qemu.kernel``: fetch the test kernel into the cache (scripts/setup runs it)."""
    kernel = kernel_from_env() or debian_cloud_kernel()
    print(f"test kernel {kernel.version}: {kernel.vmlinuz}")


if __name__ == "__main__":
    main()
