"""The demo's console reading (the boots themselves are what tests/qemu covers)."""

from __future__ import annotations

import pytest

from qemu.demo import between, main, stage_lines

CONSOLE = """\
[    1.0] kernel line
overlayroot: trial boot of v1
OVERLAYROOT-TEST begin=status
ID  MARKS
[    2.0] interleaved kernel line
\x1b[Kcopying 1/2 MiB
v1  booted
OVERLAYROOT-TEST end=status
"""


def test_between_keeps_the_scripts_output_only() -> None:
    assert between(CONSOLE, "status") == ["ID  MARKS", "v1  booted"]
    assert between(CONSOLE, "history") == []
    assert stage_lines(CONSOLE) == ["overlayroot: trial boot of v1"]


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "bad update that falls back by itself" in capsys.readouterr().out
