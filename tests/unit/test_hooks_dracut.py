"""The dracut module, driven through dracut's module API with stand-ins that record calls.

The QEMU tests build real dracut images with it; these check each function's contract quickly:
check/depends/installkernel answers, install() in both dracut modes and when the builder fails,
and the pre-pivot hook being sourced (it must `return`, never `exit`).
"""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[2] / "hooks" / "dracut" / "90overlayroot"
BUILDER = Path(sys.executable).parent / "overlayroot"
PREPARE = "/usr/lib/overlayroot/prepare"

# dracut's functions and variables as stand-ins; each call is recorded as "name args" in $LOG.
STANDINS = r"""
record() { printf '%s\n' "$*" >> "$LOG"; }
derror() { record derror "$@"; }
dfatal() { record dfatal "$@"; }
dwarn() { record dwarn "$@"; }
instmods() { record instmods "hostonly=$hostonly" "$@"; }
inst_multiple() { record inst_multiple "$@"; }
inst_simple() { record inst_simple "$@"; }
inst_hook() { record inst_hook "$@"; }
dracut_module_included() { [[ " $INCLUDED " == *" $1 "* ]]; }
SYSTEMCTL=systemctl_standin
systemctl_standin() { record systemctl "$@"; }
hostonly=yes
moddir=$MODULE
systemdsystemunitdir=/usr/lib/systemd/system
"""


def initramfs(tmp_path: Path) -> Path:
    """dracut's ``$initdir`` (made once): a merged /usr, /lib a link to usr/lib."""
    initdir = tmp_path / "initramfs"
    if not initdir.exists():
        (initdir / "usr" / "lib").mkdir(parents=True)
        (initdir / "lib").symlink_to("usr/lib")
    return initdir


def dracut(
    tmp_path: Path, calls: str, *, included: str = "", builder: str = str(BUILDER)
) -> tuple[subprocess.CompletedProcess[str], list[str], Path]:
    log, initdir, tmpdir = tmp_path / "log", initramfs(tmp_path), tmp_path / "dracut-tmp"
    tmpdir.mkdir(exist_ok=True)
    script = f'{STANDINS}\n. "$MODULE/module-setup.sh"\n{calls}\n'
    env = dict(
        os.environ,
        LOG=str(log),
        MODULE=str(MODULE),
        initdir=str(initdir),
        DRACUT_TMPDIR=str(tmpdir),
        INCLUDED=included,
        OVERLAYROOT_COMMAND=builder,
    )
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    return proc, log.read_text().splitlines() if log.exists() else [], initdir


@pytest.fixture(autouse=True)
def needs_builder() -> None:
    if not os.access(BUILDER, os.X_OK):
        pytest.skip(f"{BUILDER} is not installed (pip install -e .)")


def test_check_includes_the_module_only_when_asked(tmp_path: Path) -> None:
    proc, _, _ = dracut(tmp_path, "check; echo check=$?; depends")
    assert proc.stdout.split() == ["check=255", "rootfs-block"]


def test_check_refuses_without_the_builder(tmp_path: Path) -> None:
    proc, calls, _ = dracut(tmp_path, 'PATH=/nonexistent; check; echo "check=$?"', builder="")
    assert "check=1" in proc.stdout
    assert any(
        c.startswith("derror overlayroot: the overlayroot command is not installed") for c in calls
    )


def test_installkernel_adds_the_modules_even_in_host_only_mode(tmp_path: Path) -> None:
    _, calls, _ = dracut(tmp_path, "installkernel")
    assert calls == ["instmods hostonly= overlay loop erofs squashfs softdog"]


KERNEL = "6.12.0-test"


DEP = (
    "kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz\n"
    "kernel/fs/overlayfs/overlay.ko.xz:\n"
    "kernel/fs/btrfs/btrfs.ko.xz: kernel/lib/libcrc32c.ko.xz\n"
)


def fake_modules(tmp_path: Path, initdir: Path, files: dict[str, bytes], dep: str) -> Path:
    """A kernel's module directory (``$srcmods``) with the modules.dep ``dep``, and ``files``
    as dracut's instmods put them into the image (``.xz`` ones compressed)."""
    srcmods = tmp_path / "srcmods"
    srcmods.mkdir()
    (srcmods / "modules.dep").write_text(dep)
    modules = initdir / "lib" / "modules" / KERNEL
    for name, content in files.items():
        path = modules / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(content) if name.endswith(".xz") else content)
    return srcmods


def installkernel(
    tmp_path: Path, files: dict[str, bytes], path: str = "", dep: str = DEP
) -> tuple[subprocess.CompletedProcess[str], list[str], Path]:
    srcmods = fake_modules(tmp_path, initramfs(tmp_path), files, dep)
    setup = f"srcmods={srcmods}/; kernel={KERNEL}; {path} installkernel; echo installkernel=$?"
    return dracut(tmp_path, setup)


def test_installkernel_stores_the_stages_modules_and_their_needs_decompressed(
    tmp_path: Path,
) -> None:
    files = {
        "kernel/fs/erofs/erofs.ko.xz": b"erofs module",
        "kernel/lib/libcrc32c.ko.xz": b"crc module",
        "kernel/fs/overlayfs/overlay.ko.xz": b"overlay module",
        "kernel/fs/btrfs/btrfs.ko.xz": b"btrfs module",
    }
    proc, calls, initdir = installkernel(tmp_path, files)
    assert "installkernel=0" in proc.stdout, proc.stderr
    modules = initdir / "lib" / "modules" / KERNEL
    for name in ("fs/erofs/erofs", "lib/libcrc32c", "fs/overlayfs/overlay"):
        assert (modules / f"kernel/{name}.ko").read_bytes() == files[f"kernel/{name}.ko.xz"]
        assert not (modules / f"kernel/{name}.ko.xz").exists()
    # Not the stage's: left as dracut installed it.
    assert (
        lzma.decompress((modules / "kernel/fs/btrfs/btrfs.ko.xz").read_bytes()) == b"btrfs module"
    )
    assert not any(c.startswith("dwarn") for c in calls)


def test_installkernel_leaves_a_module_compressed_without_the_tool(tmp_path: Path) -> None:
    files = {"kernel/fs/overlayfs/overlay.ko.xz": b"overlay module"}
    bin_dir = tmp_path / "bin"  # grep, but no xz
    bin_dir.mkdir()
    grep = shutil.which("grep")
    assert grep is not None
    (bin_dir / "grep").symlink_to(grep)
    proc, calls, initdir = installkernel(tmp_path, files, path=f"PATH={bin_dir}")
    assert "installkernel=0" in proc.stdout, proc.stderr
    assert (initdir / "lib/modules" / KERNEL / "kernel/fs/overlayfs/overlay.ko.xz").is_file()
    assert not (initdir / "lib/modules" / KERNEL / "kernel/fs/overlayfs/overlay.ko").exists()
    assert not any(c.startswith("dwarn") for c in calls)


def test_installkernel_warns_of_a_module_it_cannot_decompress(tmp_path: Path) -> None:
    proc, calls, initdir = installkernel(
        tmp_path,
        {"kernel/fs/overlayfs/overlay.ko.gz": b"not gzip"},
        dep="kernel/fs/overlayfs/overlay.ko.gz:\n",
    )
    assert "installkernel=0" in proc.stdout, proc.stderr
    broken = initdir / "lib/modules" / KERNEL / "kernel/fs/overlayfs/overlay.ko.gz"
    assert broken.read_bytes() == b"not gzip"
    assert f"dwarn overlayroot: could not decompress {broken}; it stays as it is" in calls


def test_install_for_the_shell_init_adds_an_early_pre_pivot_hook(tmp_path: Path) -> None:
    proc, calls, initdir = dracut(tmp_path, "install; echo install=$?")
    assert "install=0" in proc.stdout, proc.stderr
    assert f"inst_hook pre-pivot 10 {MODULE}/overlayroot-prepare.sh" in calls
    assert not any("overlayroot-prepare.service" in c for c in calls)
    prepare = initdir / PREPARE.lstrip("/")
    assert os.access(prepare, os.X_OK)
    assert (initdir / "usr/lib/python311.zip").is_file()
    assert (initdir / "lib").is_symlink()  # dracut's link kept, not replaced by the payload's
    assert not (initdir / "init").exists()
    assert not list((tmp_path / "dracut-tmp").iterdir()), "payload left behind"


def test_install_for_the_systemd_initrd_adds_the_unit_to_initrd_root_fs(tmp_path: Path) -> None:
    proc, calls, _ = dracut(tmp_path, "install; echo install=$?", included="systemd")
    assert "install=0" in proc.stdout, proc.stderr
    assert (
        f"inst_simple {MODULE}/overlayroot-prepare.service"
        " /usr/lib/systemd/system/overlayroot-prepare.service"
    ) in calls
    assert (
        f"systemctl -q --root {tmp_path}/initramfs add-wants initrd-root-fs.target"
        " overlayroot-prepare.service"
    ) in calls
    assert not any(c.startswith("inst_hook") for c in calls)


def test_install_stops_dracut_when_the_builder_fails(tmp_path: Path) -> None:
    proc, calls, initdir = dracut(tmp_path, "install; echo install=$?", builder="/bin/false")
    # dracut ignores install()'s status, so the module exits dracut itself.
    assert proc.returncode == 1
    assert "install=" not in proc.stdout
    assert any(c.startswith("dfatal overlayroot:") for c in calls)
    assert not (initdir / PREPARE.lstrip("/")).exists()


def pre_pivot(tmp_path: Path, prepare_status: int) -> tuple[list[str], str]:
    """The pre-pivot hook sourced as dracut's /init sources it, prepare replaced by a stub."""
    log = tmp_path / "log"
    stub = tmp_path / "prepare"
    stub.write_text(
        '#!/bin/sh\necho "prepare $*" >> "$LOG"\n'
        'echo "hash seed ${PYTHONHASHSEED-unset}" >> "$LOG"\n'
        f"exit {prepare_status}\n"
    )
    stub.chmod(0o755)
    hook = (MODULE / "overlayroot-prepare.sh").read_text()
    assert hook.count(PREPARE) == 1
    (tmp_path / "hook.sh").write_text(hook.replace(PREPARE, str(stub)))
    script = f"""
record() {{ echo "$*" >> "$LOG"; }}
getarg() {{ return 1; }}
modprobe() {{ record modprobe "$@"; }}
emergency_shell() {{ record emergency_shell "$@"; }}
NEWROOT=/sysroot
source_hook() {{ . "$1"; }}
source_hook {tmp_path}/hook.sh
record init goes on
"""
    proc = subprocess.run(
        ["sh", "-c", script],
        env=dict(os.environ, LOG=str(log)),
        capture_output=True,
        text=True,
        check=True,
    )
    return log.read_text().splitlines(), proc.stdout


def test_pre_pivot_hook_prepares_newroot_and_returns(tmp_path: Path) -> None:
    calls, _ = pre_pivot(tmp_path, 0)
    # No modprobe process: the stage loads its modules from the image's modules.dep.
    assert calls[0] == "prepare /sysroot"
    # No wait for the kernel's random pool (initrd/build.py, prepare_script).
    assert calls[calls.index("prepare /sysroot") + 1] == "hash seed 0"
    assert not any(c.startswith("emergency_shell") for c in calls)
    assert calls[-1] == "init goes on"


def test_pre_pivot_hook_sends_a_failure_to_dracuts_emergency_path(tmp_path: Path) -> None:
    calls, _ = pre_pivot(tmp_path, 1)
    assert (
        "emergency_shell -n overlayroot overlayroot could not assemble the root; the"
        " reason is above"
    ) in calls
    assert calls[-1] == "init goes on"  # returned, not exited


def test_a_deployed_state_filesystem_passes_dracuts_root_check(tmp_path: Path) -> None:
    # dracut's shell init unmounts a root= without proc, sys and dev (usable_root in
    # dracut-lib.sh) before any pre-pivot hook runs; the state filesystem is that root=.
    from overlayroot.commands.staging import deploy

    tree = tmp_path / "tree"
    for name in ("etc", "var", "home", "run", "proc", "sys", "dev"):
        (tree / name).mkdir(parents=True)
    state = tmp_path / "state"
    state.mkdir()
    deploy(state, tree, deployment_id="v1", fmt="dir", created=0)
    assert all((state / name).is_dir() for name in ("proc", "sys", "dev"))
