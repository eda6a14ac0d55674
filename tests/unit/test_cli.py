"""The ``overlayroot`` command: help, exit codes, error formatting, lazy imports."""

from __future__ import annotations

import argparse
import configparser
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from overlayroot import __version__
from overlayroot.commands import cli, deploy
from overlayroot.core import layout

REPO = Path(__file__).resolve().parents[2]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fake_builder(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    runs: list[argparse.Namespace] = []
    module = types.ModuleType("initrd.cli")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--output", required=True)

    def run(args: argparse.Namespace) -> int:
        runs.append(args)
        return 3

    module.add_arguments = add_arguments  # type: ignore[attr-defined]
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "initrd.cli", module)
    return runs


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--version"], capsys) == (0, f"overlayroot {__version__}\n", "")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], "deploy"),
        (["deploy", "--help"], "--sysroot"),
        (["initrd", "--help"], "build"),
    ],
)
def test_help_of_each_command(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    assert expected in out


def test_initrd_build_help_comes_from_the_builder(
    fake_builder: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["initrd", "build", "--help"], capsys)
    assert code == 0
    assert "overlayroot initrd build" in out and "--output" in out


def test_initrd_build_passes_its_options_to_the_builder(
    fake_builder: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run_cli(["initrd", "build", "--output", "x.img"], capsys)
    assert code == 3
    assert fake_builder[0].output == "x.img"


def test_initrd_build_without_the_builder_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "initrd.cli", None)
    code, _, err = run_cli(["initrd", "build", "--output", "x"], capsys)
    assert code == 1
    assert err.startswith("overlayroot: error: the initramfs builder is not installed")
    assert "pip install 'overlayroot[build]'" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["initrd"],
        ["frobnicate"],
        ["deploy"],
        ["etc"],
        ["mark-bad"],
        ["gc"],
        ["set-default", "a", "b"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert "usage: overlayroot" in err


def test_user_error_is_one_line_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        ["deploy", "--sysroot", str(tmp_path), str(tmp_path / "missing")], capsys
    )
    assert code == 1
    assert out == ""
    assert err == (
        f"overlayroot: error: source {tmp_path / 'missing'} does not exist: give a directory"
        " tree or an erofs/squashfs image\n"
    )


def test_debug_adds_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        ["--debug", "deploy", "--sysroot", str(tmp_path), str(tmp_path / "missing")], capsys
    )
    assert code == 1
    assert "Traceback" in err
    assert err.endswith("does not exist: give a directory tree or an erofs/squashfs image\n")


def test_interrupt_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(deploy, "run", interrupted)
    code, _, err = run_cli(["deploy", "--sysroot", str(tmp_path), str(tmp_path)], capsys)
    assert code == 130
    assert "Traceback" not in err


def test_bad_created_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        ["deploy", "--sysroot", str(tmp_path), "--created", "soon", str(tmp_path)], capsys
    )
    assert code == 1
    assert err.startswith("overlayroot: error: --created 'soon' is not a time")


def test_deploy_json_prints_the_manifest_and_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    for name in layout.MOUNT_POINTS:
        (tree / name).mkdir(parents=True)
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
    code, out, _ = run_cli(
        ["deploy", "--sysroot", str(state), "--format", "dir", "--json", str(tree)], capsys
    )
    assert code == 0
    printed = json.loads(out)
    assert printed["id"] == "19700102.000000"
    assert printed["created"] == "1970-01-02T00:00:00Z"
    assert printed["path"] == str(state / "overlayroot" / "deployments" / "19700102.000000")


def test_unexpected_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(args: argparse.Namespace) -> int:
        raise ZeroDivisionError

    monkeypatch.setattr(deploy, "run", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["deploy", "--sysroot", "/", "/"])


def test_importing_the_cli_stays_light() -> None:
    code = (
        "import sys, overlayroot.commands.cli; "
        "print(sorted(m for m in ('subprocess', 'overlayroot.commands.deploy', 'initrd', 'uuid', "
        "'hashlib', 'typing') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "overlayroot", "--version"], capture_output=True, text=True
    )
    assert (result.returncode, result.stdout) == (0, f"overlayroot {__version__}\n")


@pytest.mark.parametrize(
    "command",
    [
        "status",
        "deploy",
        "rollback",
        "bless",
        "mark-bad",
        "set-default",
        "pin",
        "unpin",
        "gc",
        "history",
    ],
)
def test_every_command_takes_a_sysroot(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert "--sysroot DIR" in capsys.readouterr().out


def test_every_handler_module_is_frozen_with_the_command() -> None:
    modules = set()

    def visit(parser: argparse.ArgumentParser) -> None:
        handler = parser.get_default("handler")
        if isinstance(handler, str):
            modules.add(f"overlayroot.commands.{handler.split(':')[0]}")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    visit(sub)

    visit(cli.build_parser())
    assert modules == {m for m in cli.FROZEN_MODULES if m.startswith("overlayroot.")}


def test_the_bless_unit_runs_after_boot_complete_and_multi_user() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "hooks/systemd/overlayroot-bless.service")
    # multi-user.target wants it, and would wait for it if it were not ordered after it.
    assert unit["Unit"]["After"] == "boot-complete.target multi-user.target"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert unit["Unit"]["Requires"] == "boot-complete.target"
    assert unit["Unit"]["ConditionPathExists"] == "/run/overlayroot/booted.json"
    assert unit["Service"]["ExecStart"] == "overlayroot bless"
    assert unit["Service"]["Type"] == "oneshot"


def test_deploy_offers_exactly_the_formats_of_the_layout() -> None:
    # cli does not import layout (it would cost every command its imports): a copy, checked.
    parser = cli.build_parser()
    deploy = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    choices = next(a.choices for a in deploy.choices["deploy"]._actions if a.dest == "format")
    assert list(choices or ()) == list(layout.FORMATS)


def test_a_builder_error_is_printed_like_every_error_of_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        ["initrd", "build", "--modules", str(tmp_path / "nope"), "-o", str(tmp_path / "initrd.img")]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"overlayroot: error: {tmp_path / 'nope'}: no such modules directory")
    assert "Traceback" not in err
