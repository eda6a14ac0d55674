"""Tiny busybox initramfs images for probing and for testing the harness itself."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qemu.kernel import Kernel

BUSYBOX = Path("/bin/busybox")

# Mounts what a busybox script needs, then loads the modules listed by make_busybox_initramfs.
_PRELUDE = """\
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
while read -r module; do insmod "$module"; done < /etc/modules.load
"""


def make_busybox_initramfs(
    dest: Path,
    script: str,
    *,
    kernel: Kernel | None = None,
    modules: Sequence[str] = (),
) -> Path:
    """A newc cpio whose /init is a busybox shell script.

    The script runs after /proc, /sys and /dev are mounted, the applets are linked into /bin and
    `modules` (names like "virtio_blk", with their dependencies) are loaded.
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for directory in ("bin", "etc", "dev", "proc", "sys", "tmp", "newroot"):
            (root / directory).mkdir()
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")
        load_order = _module_closure(kernel, modules) if modules else []
        for relative in load_order:
            target = root / "lib" / "modules" / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            assert kernel is not None
            shutil.copy2(kernel.modules / relative, target)
        (root / "etc" / "modules.load").write_text(
            "".join(f"/lib/modules/{relative}\n" for relative in load_order)
        )
        init = root / "init"
        init.write_text(_PRELUDE + script)
        init.chmod(0o755)
        write_cpio(root, dest)
    return dest


def write_cpio(root: Path, dest: Path) -> None:
    """Pack a directory as a newc cpio owned by root, with the `cpio` command."""
    entries = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with dest.open("wb") as out:
        subprocess.run(
            ["cpio", "--create", "--format=newc", "--quiet", "--owner=0:0"],
            input="\n".join(entries).encode() + b"\n",
            stdout=out,
            cwd=root,
            check=True,
        )


def _module_closure(kernel: Kernel | None, names: Sequence[str]) -> list[str]:
    """Module paths relative to the modules dir, dependencies first, from modules.dep."""
    if kernel is None:
        raise ValueError("loading modules needs the kernel they belong to")
    depends: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        path, _, deps = line.partition(":")
        depends[path] = deps.split()
        by_name[_module_name(path)] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in depends[path]:
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key not in by_name:
            raise ValueError(f"module {name} is not in {kernel.modules}/modules.dep")
        visit(by_name[key])
    return order


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")
