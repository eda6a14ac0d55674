"""Whole images: the frozen stage runs in a chroot of the image, builds are byte-identical."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import shutil
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest

from initrd.build import BuildConfig, BuildResult, Compression, build_initramfs
from initrd.freeze import DEFAULT_ENTRIES
from qemu.kernel import debian_cloud_kernel, kernel_from_env

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chroot and device nodes"),
    pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no /usr/bin/python3"),
]

PYTHON = os.path.realpath("/usr/bin/python3")  # the target the builder defaults to
XY = os.path.basename(PYTHON).removeprefix("python")  # "3.11"
ZIP = f"usr/lib/python{XY.replace('.', '')}.zip"
DYNLOAD = f"usr/lib/python{XY}/lib-dynload"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


def modules_dir() -> Path:
    """The test kernel's modules: the one the QEMU tests boot (scripts/setup fetches it)."""
    return (kernel_from_env() or debian_cloud_kernel()).modules


def build(output: Path, **options: object) -> BuildResult:
    config = BuildConfig(modules_dir=modules_dir(), output=output, **options)  # type: ignore[arg-type]
    return build_initramfs(config)


def in_image(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROOT, str(root), *argv], capture_output=True, text=True, env={}, check=False
    )


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    build(tmp_path / "payload", payload=True)
    return tmp_path / "payload"


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    package = tmp_path / "src/overlayroot"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "boot").mkdir()
    (package / "boot/__init__.py").write_text("")
    (package / "boot/priority.py").write_text("def hurry():\n    pass\n")
    (package / "boot/init.py").write_text(
        "import json\n\ndef main():\n    print(json.dumps('ran'))\n"
    )
    return tmp_path / "src"


LIST_ORIGINS = (
    "import sys\n"
    + "".join(f"import {entry}\n" for entry in DEFAULT_ENTRIES)
    + "for m in list(sys.modules.values()):\n"
    "    o = getattr(getattr(m, '__spec__', None), 'origin', None)\n"
    "    print(o)\n"
)


def test_the_stage_imports_in_the_image_with_nothing_outside_the_frozen_set(
    payload: Path,
) -> None:
    proc = in_image(payload, PYTHON, "-IS", "-c", LIST_ORIGINS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no "could not find platform libraries" warning either
    for origin in proc.stdout.split():
        assert origin in ("None", "built-in", "frozen") or origin.startswith(
            (f"/{ZIP}/", f"/{DYNLOAD}/")
        ), origin


def test_the_stage_fails_to_import_when_a_frozen_module_is_removed(payload: Path) -> None:
    archive = payload / ZIP
    with zipfile.ZipFile(archive) as old:
        members = {i.filename: old.read(i) for i in old.infolist()}
    del members["overlayroot/core/errors.pyc"]
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as new:
        for name, data in members.items():
            new.writestr(name, data)
    proc = in_image(payload, PYTHON, "-IS", "-c", LIST_ORIGINS)
    assert proc.returncode != 0
    assert "No module named 'overlayroot.core.errors'" in proc.stderr


def test_init_runs_main_of_the_frozen_stage(tmp_path: Path, stand_in: Path) -> None:
    build(tmp_path / "p", payload=True, source_root=stand_in)
    proc = in_image(tmp_path / "p", "/init")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, '"ran"\n', "")


def test_image_layout_follows_the_internals_contract(payload: Path) -> None:
    init = (payload / "init").read_text().splitlines()
    assert init[0] == f"#!{PYTHON} -IS"
    # The stage's priority goes up before its imports (overlayroot/boot/priority.py).
    assert init.index("hurry()") < init.index("from overlayroot.boot.init import main")
    console = (payload / "dev/console").lstat()
    assert stat.S_ISCHR(console.st_mode) and stat.S_IMODE(console.st_mode) == 0o600
    assert (os.major(console.st_rdev), os.minor(console.st_rdev)) == (5, 1)
    for directory in ("proc", "sys", "run", "sysroot", "tmp", DYNLOAD):
        assert (payload / directory).is_dir()
    # The loader is where PT_INTERP says, through the same links as on the host.
    assert (payload / "lib64").is_symlink()
    assert in_image(payload, "/lib64/ld-linux-x86-64.so.2", "--version").returncode == 0
    info = json.loads((payload / "usr/lib/overlayroot/build.json").read_text())
    lines = (payload / "usr/lib/overlayroot/modules.list").read_text().splitlines()
    listed = [line.split()[0] for line in lines]
    frozen = zipfile.ZipFile(payload / ZIP).namelist()
    assert info["frozen_modules"] == len([n for n in frozen if n.endswith(".pyc")])
    assert {
        "overlayroot/boot/init.pyc",
        "overlayroot/boot/prepare.pyc",
        "encodings/__init__.pyc",
    } <= set(frozen)
    assert info["python"] == PYTHON
    assert listed == [f"/lib/modules/{info['kernel_version']}/{p}" for p in _relative(listed, info)]
    for path in listed:
        assert (payload / path.lstrip("/")).resolve().is_relative_to(payload)
        assert (payload / path.lstrip("/")).read_bytes()[:4] == b"\x7fELF"
    assert {"virtio_pci", "erofs", "softdog"} <= set(info["modules"])
    needs = {os.path.basename(line.split()[0]): line.split()[1:] for line in lines}
    assert needs["virtio_pci.ko"] == []  # at the start
    assert needs["loop.ko"] == ["loop"]  # where an image does not mount from its file
    assert (needs["erofs.ko"], needs["squashfs.ko"]) == (["fs-erofs"], ["fs-squashfs"])
    assert needs["softdog.ko"] == needs["watchdog.ko"] == ["watchdog"]
    # The same list named by the release: two kernels' images concatenated keep one each.
    own = payload / f"usr/lib/overlayroot/modules.d/{info['kernel_version']}.list"
    assert own.read_text().splitlines() == lines


# A seccomp filter that makes getrandom(2) fail with EAGAIN, as it does early in a boot when the
# kernel's random pool is not ready yet: then Python reads /dev/urandom for its hash seed.
_AUDIT_ARCH_X86_64 = 0xC000003E
_SYS_GETRANDOM_X86_64 = 318
_FILTER = (  # (code, jt, jf, k): struct sock_filter
    (0x20, 0, 0, 4),  # load seccomp_data.arch
    (0x15, 0, 3, _AUDIT_ARCH_X86_64),  # not x86-64: allow
    (0x20, 0, 0, 0),  # load seccomp_data.nr
    (0x15, 0, 1, _SYS_GETRANDOM_X86_64),
    (0x06, 0, 0, 0x00050000 | errno.EAGAIN),  # SECCOMP_RET_ERRNO
    (0x06, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
)


def _getrandom_not_ready() -> None:
    """preexec_fn: from here on, getrandom() answers EAGAIN."""

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_ushort),
            ("jt", ctypes.c_ubyte),
            ("jf", ctypes.c_ubyte),
            ("k", ctypes.c_uint),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    libc = ctypes.CDLL(None, use_errno=True)
    program = (SockFilter * len(_FILTER))(*(SockFilter(*f) for f in _FILTER))
    fprog = SockFprog(len(_FILTER), program)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the filter knows x86-64 only")
def test_python_takes_its_hash_seed_from_the_image_when_the_kernel_has_no_random_bytes(
    payload: Path,
) -> None:
    seed = (payload / "dev/urandom").lstat()
    assert stat.S_ISREG(seed.st_mode) and (payload / "dev/urandom").read_bytes() == bytes(64)
    show_hash = ["-IS", "-c", "print(hash('overlayroot'))"]
    zero_seed = subprocess.run(
        ["/usr/bin/python3.11", *show_hash[1:]],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "0"},
    ).stdout
    early = subprocess.run(
        [CHROOT, str(payload), "/usr/bin/python3.11", *show_hash],
        capture_output=True,
        text=True,
        env={},
        preexec_fn=_getrandom_not_ready,
        check=False,
    )
    # Started at once, seeded from the file: the hash of PYTHONHASHSEED=0.
    assert (early.returncode, early.stderr, early.stdout) == (0, "", zero_seed)
    # With the kernel's random bytes at hand, the file is not read: a random seed.
    later = {in_image(payload, "/usr/bin/python3.11", *show_hash).stdout for _ in range(3)}
    assert zero_seed not in later and len(later) > 1


def _relative(listed: list[str], info: dict[str, object]) -> list[str]:
    prefix = f"/lib/modules/{info['kernel_version']}/"
    return [p.removeprefix(prefix) for p in listed]


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    for compress in (Compression.NONE, Compression.GZIP):
        first = build(tmp_path / f"a/initrd.{compress}", compress=compress)
        second = build(tmp_path / f"b/initrd.{compress}", compress=compress)
        assert first.size == second.size
        assert (tmp_path / f"a/initrd.{compress}").read_bytes() == (
            tmp_path / f"b/initrd.{compress}"
        ).read_bytes()


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is not installed")
def test_zstd_image_holds_the_same_archive(tmp_path: Path) -> None:
    build(tmp_path / "plain", compress=Compression.NONE)
    build(tmp_path / "small", compress=Compression.ZSTD)
    unpacked = subprocess.run(
        ["zstd", "-dc", str(tmp_path / "small")], capture_output=True, check=True
    ).stdout
    assert unpacked == (tmp_path / "plain").read_bytes()


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is not installed")
def test_archive_unpacks_to_the_payload_tree(tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    build(payload, payload=True, source_date_epoch=1700000000)
    # A payload never has the rescue shell's busybox: the archive is built without it too.
    result = build(
        tmp_path / "initrd", compress=Compression.NONE, source_date_epoch=1700000000, busybox="none"
    )
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    with open(tmp_path / "initrd", "rb") as archive:
        subprocess.run(["cpio", "-idm", "--quiet"], stdin=archive, cwd=unpacked, check=True)
    assert tree(unpacked) == tree(payload)
    assert result.entries == len(tree(payload))
    assert (unpacked / "init").stat().st_mtime == 1700000000
    assert (payload / "usr/lib").stat().st_mtime == 1700000000
    imported = in_image(unpacked, PYTHON, "-IS", "-c", "import overlayroot.core.safejson")
    assert imported.returncode == 0, imported.stderr


def tree(root: Path) -> dict[str, tuple[int, object]]:
    out: dict[str, tuple[int, object]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        key = str(path.relative_to(root))
        if stat.S_ISREG(st.st_mode):
            out[key] = (st.st_mode, path.read_bytes())
        elif stat.S_ISLNK(st.st_mode):
            out[key] = (st.st_mode, os.readlink(path))
        else:
            out[key] = (st.st_mode, st.st_rdev)
    return out


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the filter knows x86-64 only")
def test_the_hooks_prepare_takes_its_hash_seed_from_the_environment(tmp_path: Path) -> None:
    """Under a generator's devtmpfs, /dev/urandom is the device, which early in a boot waits
    for the kernel's random pool; the hooks start prepare with PYTHONHASHSEED=0 instead, and
    any other PYTHON* variable makes it start itself again isolated (``-IS``). Here, with no
    /dev/urandom at all, a Python that wants random bytes cannot start: which runs shows which
    read its seed where."""
    payload = tmp_path / "hooks-payload"
    build(payload, payload=True, entries=("overlayroot.boot.prepare",))
    (payload / "dev/urandom").unlink()
    script = (payload / "usr/lib/overlayroot/prepare").read_text()
    assert script.startswith(f"#!{PYTHON} -sSP\n")
    # Hurried before its imports, after the restart that an environment may ask for.
    assert script.index("os.execv") < script.index("hurry()") < script.index("import main")

    def prepare(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CHROOT, str(payload), "/usr/lib/overlayroot/prepare"],
            capture_output=True,
            text=True,
            env=env,
            preexec_fn=_getrandom_not_ready,
            check=False,
        )

    seeded = prepare({"PYTHONHASHSEED": "0"})
    assert seeded.returncode == 2
    assert seeded.stderr.startswith("usage: python -m overlayroot.boot.prepare SYSROOT\n")
    for env in ({}, {"PYTHONHASHSEED": "0", "PYTHONPATH": "/elsewhere"}):
        unseeded = prepare(env)
        assert unseeded.returncode != 0 and "Fatal Python error" in unseeded.stderr, env
        assert "random" in unseeded.stderr, env


def test_the_hooks_prepare_leaves_without_the_interpreters_teardown(tmp_path: Path) -> None:
    """The teardown frees every object one by one (7 M instructions) in a process that exits
    anyway: prepare leaves with os._exit. ``-v`` makes Python print each module it frees."""
    payload = tmp_path / "hooks-payload"
    build(payload, payload=True, entries=("overlayroot.boot.prepare",))
    verbose = subprocess.run(
        [CHROOT, str(payload), PYTHON, "-v", "-IS", "/usr/lib/overlayroot/prepare"],
        capture_output=True,
        text=True,
        env={},
        check=False,
    )
    assert verbose.returncode == 2
    assert "usage: python -m overlayroot.boot.prepare SYSROOT" in verbose.stderr
    assert "import 'overlayroot.boot.prepare'" in verbose.stderr
    assert "# cleanup" not in verbose.stderr
