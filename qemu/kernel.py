"""The kernels the harness boots: from the environment, or Debian's cloud kernels fetched with apt.

The first is bookworm's 6.1 (the machine's own apt sources). The second, for deployments that
carry a kernel of their own (issue 9), is a 6.12, another version and module ABI: the one Debian
12 ships in bookworm-security (``linux-image-6.12-cloud-amd64``), else bookworm-backports'. For
backports the host's apt sources are left alone: its index is fetched into an apt directory of
the harness's own (``<cache>/apt/bookworm-backports``), with Debian's archive key. (Backports'
6.12.95 crashes in early boot under QEMU 7.2's TCG, slab corruption while probing virtio-pci,
booted directly as much as by kexec; bookworm-security's 6.12.117 boots.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qemu.paths import build_once, cache_dir, entry_lock, is_complete

METAPACKAGE = "linux-image-cloud-amd64"
SECOND_METAPACKAGE = "linux-image-6.12-cloud-amd64"  # bookworm-security
_CLOUD_IMAGE = re.compile(r"^linux-image-(6\.[0-9.]+-[0-9]+)-cloud-amd64$")
# Debian 12 names its 6.12 kernels by upstream version: 6.12.117+deb12(.1)-cloud-amd64.
_SECOND_IMAGE = re.compile(
    r"^linux-image-(6\.[0-9]+\.[0-9]+\+deb[0-9]+(?:\.[0-9]+)?)"
    r"-cloud-amd64$"
)
BACKPORTS_SUITE = "bookworm-backports"
BACKPORTS_SOURCE = (
    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    f" http://deb.debian.org/debian {BACKPORTS_SUITE} main\n"
)
LISTS_MAX_AGE = 86400  # seconds before the harness's own apt index is fetched again


class KernelUnavailable(RuntimeError):
    """No kernel can be had: the message says why and what to do."""


@dataclass(frozen=True)
class Kernel:
    vmlinuz: Path
    modules: Path  # the /lib/modules/<kver> directory
    version: str


def kernel_from_env() -> Kernel | None:
    """`OVERLAYROOT_KERNEL=/path/vmlinuz` and `OVERLAYROOT_KERNEL_MODULES=/lib/modules/<kver>`."""
    return _kernel_named_by("OVERLAYROOT_KERNEL", "the kernel's")


def second_kernel_from_env() -> Kernel | None:
    """`OVERLAYROOT_KERNEL_B=/path/vmlinuz` and `OVERLAYROOT_KERNEL_B_MODULES=/lib/modules/<kver>`:
    the kernel a deployment carries, instead of Debian's 6.12 cloud kernel."""
    return _kernel_named_by("OVERLAYROOT_KERNEL_B", "that kernel's")


def _kernel_named_by(variable: str, whose: str) -> Kernel | None:
    """The kernel `$variable` and `${variable}_MODULES` name, None when the first is unset."""
    vmlinuz = os.environ.get(variable)
    if not vmlinuz:
        return None
    modules = os.environ.get(f"{variable}_MODULES")
    if not modules:
        raise KernelUnavailable(
            f"{variable} is set but {variable}_MODULES is not: "
            f"point it at {whose} /lib/modules/<kver> directory"
        )
    kernel = Kernel(Path(vmlinuz), Path(modules), Path(modules).name)
    for path in (kernel.vmlinuz, kernel.modules):
        if not path.exists():
            raise KernelUnavailable(f"{path} (from the environment) does not exist")
    return kernel


def second_cloud_kernel(cache: Path | None = None) -> Kernel:
    """Debian's 6.12 cloud kernel: bookworm-security's through the host's apt sources, else
    bookworm-backports' through the harness's own apt directory; downloaded and unpacked into
    the cache once, like :func:`debian_cloud_kernel`."""
    cache = cache or cache_dir()
    apt: list[str] = []
    names = _depends(_apt_cache("depends", SECOND_METAPACKAGE))
    if not names:
        apt = _backports_apt(cache / "apt" / BACKPORTS_SUITE)
        names = _depends(_run_apt(["apt-cache", *apt, "depends", METAPACKAGE]))
    if not names:
        raise KernelUnavailable(
            f"neither the host's apt ({SECOND_METAPACKAGE}) nor {BACKPORTS_SUITE}"
            f" ({METAPACKAGE}, apt directory {cache / 'apt' / BACKPORTS_SUITE}) names a"
            " linux-image-6.*+deb*-cloud-amd64; run apt-get update, or set OVERLAYROOT_KERNEL_B"
            " and OVERLAYROOT_KERNEL_B_MODULES to another kernel"
        )
    package = names[0]
    kver = package.removeprefix("linux-image-")
    root = cache / "kernels" / package
    if not is_complete(root):
        _unpack(package, kver, root, apt)
    return Kernel(root / "boot" / f"vmlinuz-{kver}", root / "lib" / "modules" / kver, kver)


def _depends(text: str) -> list[str]:
    """The 6.12-style cloud kernel packages an ``apt-cache depends`` output names."""
    names = [
        line.strip().removeprefix("Depends:").strip()
        for line in text.splitlines()
        if line.strip().startswith("Depends:")
    ]
    return [n for n in names if _SECOND_IMAGE.match(n)]


def _backports_apt(directory: Path) -> list[str]:
    """apt options for an apt directory that knows bookworm-backports only; its index is
    fetched when missing or older than a day. The host's sources and lists are not touched."""
    lists = directory / "lists"
    for sub in (
        lists / "partial",
        directory / "cache" / "archives" / "partial",
        directory / "sources.list.d",
    ):
        sub.mkdir(parents=True, exist_ok=True)
    sources = directory / "sources.list"
    options = [
        "-o",
        f"Dir::Etc::SourceList={sources}",
        "-o",
        f"Dir::Etc::SourceParts={directory / 'sources.list.d'}",
        "-o",
        f"Dir::State::Lists={lists}",
        "-o",
        f"Dir::Cache={directory / 'cache'}",
        "-o",
        "APT::Sandbox::User=root",
    ]
    # One writer at a time: apt refuses a second update on the same lists, and the sources
    # are rewritten only when they differ, never under a reader.
    with entry_lock(directory):
        if not sources.exists() or sources.read_text() != BACKPORTS_SOURCE:
            sources.write_text(BACKPORTS_SOURCE)
        fetched = [p for p in lists.glob("*_Packages*") if p.is_file()]
        if not fetched or min(time.time() - p.stat().st_mtime for p in fetched) > LISTS_MAX_AGE:
            _run_apt(["apt-get", *options, "-q", "update"])
    return options


def _run_apt(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise KernelUnavailable(f"{' '.join(argv[:1] + argv[-2:])} failed: {result.stderr.strip()}")
    return result.stdout


def debian_cloud_kernel(cache: Path | None = None) -> Kernel:
    """Debian's cloud kernel, downloaded with apt-get and unpacked into the cache once."""
    cache = cache or cache_dir()
    package = _cloud_kernel_package()
    kver = package.removeprefix("linux-image-")
    root = cache / "kernels" / package
    if not is_complete(root):
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


def _unpack(package: str, kver: str, root: Path, apt: list[str] | None = None) -> None:
    """Download, extract and depmod into a temp dir, then rename (``build_once``): a crash
    leaves no half kernel, and a second process that wants it meanwhile waits for this one."""

    def fill(staging: Path) -> None:
        downloads = root.parent / "debs"
        downloads.mkdir(parents=True, exist_ok=True)
        deb = _download(package, downloads, apt or [])
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
        subprocess.run(["depmod", "-b", str(staging), kver], check=True)

    build_once(root, fill)


def _download(package: str, downloads: Path, apt: list[str]) -> Path:
    existing = sorted(downloads.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        result = subprocess.run(
            ["apt-get", *apt, "download", package], cwd=tmp, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise KernelUnavailable(
                f"apt-get download {package} failed: {result.stderr.strip()} "
                "(run apt-get update, or set OVERLAYROOT_KERNEL and OVERLAYROOT_KERNEL_MODULES)"
            )
        (deb,) = Path(tmp).glob("*.deb")
        return deb.rename(downloads / deb.name)


def main() -> None:
    """``python -m qemu.kernel``: fetch the test kernels into the cache (scripts/setup runs
    it)."""
    kernel = kernel_from_env() or debian_cloud_kernel()
    print(f"test kernel {kernel.version}: {kernel.vmlinuz}")
    try:
        second = second_kernel_from_env() or second_cloud_kernel()
    except KernelUnavailable as e:
        # Only the tests of deployments with their own kernel need it; they skip without it.
        print(f"no second test kernel: {e}", file=sys.stderr)
        return
    print(f"second test kernel (deployments' own) {second.version}: {second.vmlinuz}")


if __name__ == "__main__":
    main()
