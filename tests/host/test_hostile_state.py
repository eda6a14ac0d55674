"""A hostile-state corpus: every path of the state layout replaced by each kind of thing that
does not belong there. Each boot ends on a good deployment or with a clear message — never a
bug, a hang, or a known-good deployment forgotten — and the commands still answer."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from overlayroot.boot.cmdline import parse_options
from overlayroot.boot.console import Console
from overlayroot.boot.prepare import prepare_root
from overlayroot.commands import cli, target
from overlayroot.commands.staging import deploy
from overlayroot.core import statefile, syscalls
from overlayroot.core.errors import BootError
from overlayroot.core.layout import StateLayout
from qemu.mounts import mounts_under
from tests.host.conftest import (
    enter_private_mount_namespace,
    mkfs_ext4,
    require_tools,
)
from tests.trees import make_tree

PATHS = (
    "overlayroot",
    "overlayroot/deployments",
    "overlayroot/deployments/v2",
    "overlayroot/deployments/v2/manifest.json",
    "overlayroot/deployments/v2/root.erofs",
    "overlayroot/etc",
    "overlayroot/etc/v2",
    "overlayroot/etc/v2/upper",
    "overlayroot/etc/v2/work",
    "overlayroot/var",
    "overlayroot/home",
    "overlayroot/boot.json",
    "overlayroot/boot.json.prev",
    "overlayroot/history.jsonl",
    "overlayroot/.lock",
)


def _replace(path: Path, make: Callable[[Path], object]) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    make(path)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "missing": lambda p: _replace(p, lambda q: None),
    "empty file": lambda p: _replace(p, lambda q: q.write_bytes(b"")),
    "garbage": lambda p: _replace(p, lambda q: q.write_bytes(bytes(range(256)) * 8)),
    "directory": lambda p: _replace(p, lambda q: q.mkdir()),
    "symlink to /": lambda p: _replace(p, lambda q: q.symlink_to("/")),
    "dangling symlink": lambda p: _replace(p, lambda q: q.symlink_to("/nonexistent/x")),
    "fifo": lambda p: _replace(p, lambda q: os.mkfifo(q)),
    "device": lambda p: _replace(p, lambda q: os.mknod(q, 0o600 | 0o020000, os.makedev(1, 5))),
    "mode 000": lambda p: p.chmod(0) if os.path.lexists(p) and not p.is_symlink() else None,
}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state filesystem image: v1 known good, v2 on trial and booted once."""
    if os.geteuid() != 0:
        pytest.skip("host mount tests need root (they mount loop devices and overlays)")
    require_tools("mkfs.ext4", "mkfs.erofs")
    enter_private_mount_namespace()
    base = tmp_path_factory.mktemp("hostile")
    image = base / "state.img"
    mkfs_ext4(image)
    sysroot, run = base / "sysroot", base / "run"
    sysroot.mkdir()
    run.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(sysroot)], check=True)
    for name in ("v1", "v2"):
        tree = make_tree(base / f"tree-{name}")
        deploy(sysroot, tree, deployment_id=name, created=1_700_000_000, known_good=name == "v1")
    layout = StateLayout(sysroot)
    statefile.append_history(layout, "blessed", "v1")
    _boot(sysroot, run)
    subprocess.run(["umount", str(sysroot)], check=True)
    return image


def _boot(sysroot: Path, run: Path) -> str:
    """One boot; returns the deployment booted, then takes the root apart again."""
    opts, _ = parse_options("overlayroot.watchdog=0 overlayroot.tries=3")
    with redirect_stdout(io.StringIO()):
        booted = prepare_root(str(sysroot), str(run), opts, "/dev/test", Console())
    for point in reversed(mounts_under(sysroot)):
        syscalls.umount(point, syscalls.MNT_DETACH)
    for point in reversed(mounts_under(run)):
        if point != str(run / "state"):
            syscalls.umount(point, syscalls.MNT_DETACH)
    syscalls.mount(str(run / "state"), str(sysroot), None, syscalls.MS_MOVE)
    (run / "booted.json").unlink()
    return booted.deployment.id


@pytest.fixture
def machine(template: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    image = tmp_path / "state.img"
    subprocess.run(["cp", "--sparse=always", str(template), str(image)], check=True)
    sysroot, run = tmp_path / "sysroot", tmp_path / "run"
    sysroot.mkdir()
    run.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(sysroot)], check=True)
    yield sysroot, run
    for point in reversed(mounts_under(tmp_path)):
        syscalls.umount(point, syscalls.MNT_DETACH)


class Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang("the boot hung")


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("where", PATHS)
def test_a_boot_on_hostile_state_ends_well_or_clearly(
    machine: tuple[Path, Path],
    where: str,
    damage: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sysroot, run = machine
    DAMAGE[damage](sysroot / where)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        outcomes = []
        for _ in range(2):  # the boot, and the one after its repairs
            try:
                outcomes.append(_boot(sysroot, run))
            except BootError as e:
                assert "internal error" not in str(e), str(e)
                outcomes.append(f"error: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    for outcome in outcomes:
        assert outcome in ("v1", "v2") or outcome.startswith("error: "), outcome
    layout = StateLayout(sysroot)
    if outcomes[0] in ("v1", "v2"):
        state, _ = statefile.load(layout)
        assert state.entries["v1"].successful, "the known-good deployment was forgotten"
        assert outcomes[1] in ("v1", "v2"), "a boot that worked once must work again"
    else:
        # Only damage no boot can get past: the state itself, or every deployment, gone.
        assert where in ("overlayroot", "overlayroot/deployments"), outcomes[0]
    monkeypatch.setattr(target, "BOOTED", str(run / "booted.json"))
    monkeypatch.setattr(target, "LOCK_WAIT", 0.0)
    for command in (["status"], ["history"], ["gc", "--keep", "5", "--dry-run"], ["pin", "v1"]):
        capsys.readouterr()
        code = cli.main([*command, "--sysroot", str(sysroot)])
        err = capsys.readouterr().err
        assert code in (0, 1), (command, err)
        assert "Traceback" not in err and "internal error" not in err, (command, err)
        if code == 1:
            assert err.startswith("overlayroot: error: "), (command, err)
