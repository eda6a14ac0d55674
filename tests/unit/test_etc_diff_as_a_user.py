"""``overlayroot etc diff`` run by a user who cannot read all of an /etc upper: a clear error,
not a traceback. The command runs in a forked child that drops to nobody (65534)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayroot.commands import cli
from overlayroot.core import layout, statefile
from overlayroot.core.bootstate import BootState, Entry

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="drops from root to nobody")


def as_nobody(argv: list[str]) -> tuple[int, str]:
    """``overlayroot ARGV`` as nobody: its exit status and stderr, or 99 and the exception that
    escaped it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = cli.main(argv)
            result = [code, err.getvalue()]
        except BaseException as e:  # whatever escapes is the finding
            result = [99, f"{type(e).__name__}: {e}"]
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        code, err = json.loads(f.read())
    os.waitpid(pid, 0)
    return int(code), str(err)


@pytest.fixture
def sysroot() -> Iterator[Path]:
    """A state filesystem nobody can walk to (pytest's tmp_path is root's alone), with a dir
    deployment whose /etc upper holds a 0700 directory."""
    root = Path(tempfile.mkdtemp(prefix="overlayroot-etc-diff-"))
    try:
        root.chmod(0o755)
        state = layout.StateLayout(root)
        image = Path(state.deployments) / "v1" / "root"
        (image / "etc").mkdir(parents=True)
        manifest = layout.Manifest(
            id="v1",
            created="2024-01-01T00:00:00Z",
            format="dir",
            image="root",
            sha256="0" * 64,
            size=0,
            origin="/x",
        )
        (Path(state.deployments) / "v1" / "manifest.json").write_text(manifest.to_json())
        private = Path(state.etc_upper("v1")) / "ssl" / "private"
        private.mkdir(parents=True)
        (private / "key.pem").write_text("secret\n")
        private.chmod(0o700)
        statefile.save(state, BootState({"v1": Entry(priority=1, successful=True)}))
        for directory, _, _ in os.walk(root):
            if not directory.endswith("private"):
                os.chmod(directory, 0o755)
        yield root
    finally:
        shutil.rmtree(root)


def test_etc_diff_as_a_user_who_cannot_read_the_upper_says_to_run_it_as_root(
    sysroot: Path,
) -> None:
    code, err = as_nobody(["etc", "diff", "v1", "--sysroot", str(sysroot)])
    private = sysroot / "overlayroot/etc/v1/upper/ssl/private"
    assert (code, err) == (
        1,
        f"overlayroot: error: cannot read {private}: Permission denied;"
        " etc diff reads every file of the /etc upper and of the image's"
        " /etc: run it as root\n",
    )


def test_etc_diff_as_root_reads_it(sysroot: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["etc", "diff", "v1", "--sysroot", str(sysroot)]) == 0
    assert capsys.readouterr().out == (
        "A /etc/ssl\nA /etc/ssl/private\nA /etc/ssl/private/key.pem\n"
    )
