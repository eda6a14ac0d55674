"""Host tests: real mounts, loop devices and mkfs tools, in a private mount namespace.

The whole test process enters its own mount namespace once, with every mount private, so
nothing a test mounts is seen by the host, and it all goes away with the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from overlayroot.boot import kexec
from overlayroot.boot.assemble import Booted, assemble
from overlayroot.boot.cmdline import parse_options
from overlayroot.boot.console import Console
from overlayroot.boot.prepare import prepare_root
from overlayroot.commands import bootpair, cli, health, target
from overlayroot.commands.staging import deploy
from overlayroot.core import bootstate, statefile, syscalls
from overlayroot.core.layout import Manifest, StateLayout
from qemu.mounts import mounts_under
from tests.trees import make_tree

CLONE_NEWNS = 0x00020000
_entered = False
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of this directory is a host test (``-m host`` selects them, ``-m 'not host'``
    leaves them out). When tests are spread over workers, one worker runs them all
    (tests/workers.py)."""
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.host)


def enter_private_mount_namespace() -> None:
    global _entered
    if _entered:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "unshare(CLONE_NEWNS)")
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    _entered = True


@pytest.fixture
def mount_ns(tmp_path: Path) -> Iterator[Path]:
    """A private mount namespace, and every mount below ``tmp_path`` undone afterwards."""
    if os.geteuid() != 0:
        pytest.skip("host mount tests need root (they mount loop devices and overlays)")
    enter_private_mount_namespace()
    yield tmp_path
    for point in reversed(mounts_under(tmp_path)):
        with contextlib.suppress(OSError):
            syscalls.umount(point, syscalls.MNT_DETACH)


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup installs them)")


def mkfs_ext4(image: Path, size_mb: int = 64, label: str = "state") -> None:
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, str(image)], check=True)


# -- a state filesystem, and a machine booted from it --------------------------------------


class Env:
    """A state filesystem (ext4 on a loop device) mounted on ``sysroot``, as /init leaves it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.sysroot = base / "sysroot"
        self.run = base / "run"
        self.sysroot.mkdir()
        self.run.mkdir()
        image = base / "state.img"
        mkfs_ext4(image)
        # mount(8) sets up the loop device with autoclear, so it goes with the mount.
        subprocess.run(["mount", "-o", "loop", str(image), str(self.sysroot)], check=True)

    def deploy(self, name: str, fmt: str = "erofs", *, init: bool = True) -> str:
        tree = make_tree(self.base / f"tree-{name}", init=init)
        (tree / "etc/release").write_text(f"{name}\n")
        deploy(self.sysroot, tree, deployment_id=name, fmt=fmt, created=1_700_000_000)
        return name

    def assemble(
        self, cmdline: str = "", deployment: str | None = None, repairs: list[str] | None = None
    ) -> Booted:
        """Assemble ``deployment`` (default: the only one, else the newest id)."""
        opts, _ = parse_options(cmdline)
        layout = StateLayout(self.sysroot)
        manifest = layout.read_manifest(deployment or max(layout.deployment_ids()))
        return assemble(
            str(self.sysroot), str(self.run), opts, manifest, device="/dev/test", repairs=repairs
        )

    @property
    def state(self) -> Path:
        return self.run / "state"


@pytest.fixture
def env(mount_ns: Path) -> Env:
    require_tools("mkfs.ext4", "mkfs.erofs", "mksquashfs")
    return Env(mount_ns)


NO_WATCHDOG = "overlayroot.watchdog=0"


class Kexeced(BaseException):
    """The stage asked to start a deployment's own kernel (the fake ``kexec.restart``); like
    the real restart it never returns to the stage (which takes any Exception for a failed
    candidate)."""


class System:
    """A machine booted from ``env``'s state filesystem: ``/`` is ``env.sysroot``, the state
    filesystem is at ``env.run/state`` and ``booted.json`` in ``env.run``.

    Its kernel: the bootloader starts the boot pair's (``overlayroot/boot`` on the state, what
    ``bless`` promotes), or the host's when there is none; a kexec the stage asks for is
    simulated (``kexec.load`` records the command line, ``kexec.restart`` ends the boot) and the
    machine boots again under the deployment's kernel with that command line."""

    def __init__(self, env: Env, capsys: pytest.CaptureFixture[str]) -> None:
        self.env = env
        self.capsys = capsys
        self.console = ""
        self.up = False
        self.loaded: tuple[str, str, str] | None = None  # deployment, its kernel, command line
        self.kernel = os.uname().release  # what the last boot ran

    @property
    def state(self) -> StateLayout:
        return StateLayout(self.env.state if self.up else self.env.sysroot)

    def firmware_kernel(self) -> str:
        record = bootpair.read_record(Path(self.env.sysroot, "overlayroot", bootpair.BOOT_DIR))
        version = (record or {}).get("version")
        return version if isinstance(version, str) else os.uname().release

    def boot(self, cmdline: str = NO_WATCHDOG) -> dict[str, object]:
        assert not self.up
        running = self.firmware_kernel()
        console = ""
        for _ in range(2):  # the bootloader's kernel, then at most one kexec
            opts, _ = parse_options(cmdline)
            out = io.StringIO()
            self.loaded = None
            try:
                with redirect_stdout(out):
                    prepare_root(
                        str(self.env.sysroot),
                        str(self.env.run),
                        opts,
                        "/dev/test",
                        Console(),
                        cmdline,
                        running,
                    )
            except Kexeced:
                console += out.getvalue()
                assert self.loaded is not None
                self.up = str(self.env.state) in mounts_under(self.env.run)
                self.shutdown()
                _, running, cmdline = self.loaded
                continue
            break
        self.console = console + out.getvalue()
        self.kernel = running
        self.up = True
        return self.booted()

    def booted(self) -> dict[str, object]:
        data = json.loads((self.env.run / "booted.json").read_text())
        assert isinstance(data, dict)
        return data

    def shutdown(self) -> None:
        """Take the assembled root apart and put the state filesystem back on sysroot."""
        if not self.up:
            return
        for point in reversed(mounts_under(self.env.sysroot)):
            syscalls.umount(point, syscalls.MNT_DETACH)
        syscalls.mount(str(self.env.state), str(self.env.sysroot), None, syscalls.MS_MOVE)
        with contextlib.suppress(FileNotFoundError):
            (self.env.run / "booted.json").unlink()
        self.up = False

    def reboot(self, cmdline: str = NO_WATCHDOG) -> dict[str, object]:
        self.shutdown()
        return self.boot(cmdline)

    def run(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self.run(*argv)
        assert code == 0, err
        return out

    def fails(self, *argv: str) -> str:
        code, out, err = self.run(*argv)
        assert code == 1, out + err
        assert "Traceback" not in err
        return err

    def status(self, *argv: str) -> dict[str, Any]:
        data = json.loads(self.ok("status", "--json", *argv))
        assert isinstance(data, dict)
        return data

    def entries(self) -> dict[str, bootstate.Entry]:
        state, _ = statefile.load(self.state)
        return state.entries

    def default(self) -> str | None:
        state, _ = statefile.load(self.state)
        return bootstate.default(state)

    def tree(self, name: str) -> Path:
        tree = make_tree(self.env.base / f"tree-{name}")
        (tree / "etc/release").write_text(f"{name}\n")
        return tree

    def bless_offline(self, deployment_id: str) -> None:
        state, _ = statefile.load(self.state)
        statefile.save(self.state, bootstate.bless(state, deployment_id))
        statefile.append_history(self.state, "blessed", deployment_id)


@pytest.fixture
def system(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[System]:
    monkeypatch.setattr(target, "BOOTED", str(env.run / "booted.json"))
    monkeypatch.setattr(target, "LOCK_WAIT", 0.0)
    monkeypatch.setattr(health, "CHECK_DIR", str(tmp_path / "check.d"))
    # Never the host's reboot: a file that says it was asked for.
    reboot = tmp_path / "reboot"
    reboot.write_text(f"#!/bin/sh\necho rebooted >> {tmp_path / 'rebooted'}\n")
    reboot.chmod(0o755)
    monkeypatch.setattr(health, "REBOOT", (str(reboot),))
    s = System(env, capsys)

    def load(layout: StateLayout, manifest: Manifest, cmdline: str) -> None:
        assert manifest.kernel is not None
        s.loaded = (manifest.id, manifest.kernel.version, cmdline)

    def restart(sysroot: str, command: int) -> None:
        raise Kexeced(sysroot)

    monkeypatch.setattr(kexec, "load", load)
    monkeypatch.setattr(kexec, "restart", restart)
    yield s
    s.shutdown()


def good_v1(system: System) -> None:
    """v1 deployed, booted once and blessed: the known-good starting point."""
    system.env.deploy("v1")
    system.boot()
    system.ok("bless")


def add_check(tmp_path: Path, kind: str, name: str, body: str) -> None:
    folder = tmp_path / "check.d" / kind
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)
