"""The parts of PID 1 that run without a kernel to boot: the emergency prompt and bug reports."""

from __future__ import annotations

import io

import pytest

from overlayroot.boot.console import Console, describe_bug
from overlayroot.boot.init import python_shell


def test_the_emergency_prompt_runs_python_until_exit(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("x = 6 * 7\nx\n1/0\nexit\nnot reached\n"))
    python_shell(Console())
    out = capsys.readouterr().out
    assert "emergency Python prompt" in out
    assert "42" in out
    assert "ZeroDivisionError: division by zero" in out
    assert "not reached" not in out


def test_the_emergency_prompt_ends_at_end_of_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    python_shell(Console())


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
