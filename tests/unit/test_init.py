"""The parts of PID 1 that run without a kernel to boot: the rescue shell, breaks and bug
reports."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from overlayroot.boot import init, rescue
from overlayroot.boot.cmdline import parse_options
from overlayroot.boot.console import Console, describe_bug
from overlayroot.boot.rescue import python_shell, rescue_shell

HOST_BUSYBOX = Path("/usr/bin/busybox")


def test_without_busybox_the_rescue_shell_is_a_python_prompt_that_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(rescue, "BUSYBOX", str(tmp_path / "no-busybox"))
    monkeypatch.setattr("sys.stdin", io.StringIO("x = 6 * 7\nx\n1/0\nexit\nnot reached\n"))
    rescue_shell(Console(), "the boot failed: no state device", "to reboot")
    out = capsys.readouterr().out
    assert out.startswith(
        "overlayroot: the boot failed: no state device\n"
        "overlayroot: rescue Python prompt (this image has no busybox); to reboot: exit or"
        " Ctrl-D\n"
    )
    assert "42" in out
    assert "ZeroDivisionError: division by zero" in out
    assert "not reached" not in out


def test_the_emergency_prompt_ends_at_end_of_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    python_shell(Console())


@pytest.mark.skipif(
    not HOST_BUSYBOX.exists(),
    reason="no /usr/bin/busybox to stand in for the image's (busybox-static)",
)
def test_with_busybox_the_rescue_shell_is_busybox_sh_with_its_applets(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """busybox sh runs the commands typed, finds its applets in PATH, and returning from it is
    what leaving the shell does. (Taking the console's tty is left out: here it is the host's.)"""
    applets = tmp_path / "bin"
    monkeypatch.setattr(rescue, "BUSYBOX", str(HOST_BUSYBOX))
    monkeypatch.setattr(rescue, "APPLETS", str(applets))
    monkeypatch.setitem(rescue.SHELL_ENV, "PATH", str(applets))
    read, write = os.pipe()
    os.write(write, b"echo typed-$((6 * 7)); basename /an/applet-ran; exit 3\n")
    os.close(write)

    def typed_input() -> None:
        os.dup2(read, 0)

    monkeypatch.setattr(rescue, "_take_console", typed_input)
    rescue_shell(Console(), "overlayroot.break=mount: stopped", "to go on with the boot")
    out = capfd.readouterr().out
    assert "overlayroot: rescue shell (busybox sh); to go on with the boot: exit or Ctrl-D" in out
    assert "typed-42" in out
    assert "\napplet-ran\n" in out
    assert os.readlink(applets / "mount") == str(HOST_BUSYBOX)


def test_a_break_opens_the_rescue_shell_only_at_its_step(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[tuple[str, str]] = []
    monkeypatch.setattr(
        rescue, "rescue_shell", lambda console, why, leaving: opened.append((why, leaving))
    )
    opts, _ = parse_options("overlayroot.break=mount,switch")
    for step in ("modules", "device", "mount", "prepare", "switch"):
        init.stop(Console(), opts, step)
    assert opened == [
        (
            "overlayroot.break=mount: stopped before mounting the state filesystem on /sysroot",
            "to go on with the boot",
        ),
        (
            "overlayroot.break=switch: stopped before switching root (the deployment is assembled"
            " on /sysroot); on a trial boot the watchdog is already running"
            " (overlayroot.watchdog=): a long stop resets the machine",
            "to go on with the boot",
        ),
    ]


def test_a_bug_is_reported_with_where_it_happened() -> None:
    empty: dict[str, int] = {}
    try:
        empty["missing"]
    except KeyError as e:
        report = describe_bug(e)
    assert report.startswith("internal error (a bug in overlayroot): KeyError: 'missing'")
    assert "test_init.py" in report and "test_a_bug_is_reported_with_where_it_happened" in report


def test_console_error_indents_continuation_lines(capsys: pytest.CaptureFixture[str]) -> None:
    Console().error("first\nsecond")
    assert capsys.readouterr().out == "overlayroot: error: first\noverlayroot:        second\n"
