"""The checks ``bless`` runs: which, in what order, and how a failure reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from overlayroot.commands import health


def test_checks_run_required_first_in_name_order_executables_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for kind, name, mode in (
        ("wanted", "a", 0o755),
        ("required", "20-b", 0o755),
        ("required", "10-a", 0o755),
        ("required", "30-off", 0o644),
        ("required", ".hidden", 0o755),
    ):
        path = tmp_path / kind / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(mode)
    found = [(c.kind, os.path.basename(c.path)) for c in health.checks(str(tmp_path))]
    assert found == [("required", "10-a"), ("required", "20-b"), ("wanted", "a")]
    assert "30-off is not executable: not run" in capsys.readouterr().err
    assert health.checks(str(tmp_path / "none")) == []


def test_a_checks_failure_names_it_and_the_tail_of_its_output(tmp_path: Path) -> None:
    check = tmp_path / "net"
    check.write_text("#!/bin/sh\nfor i in 1 2 3 4 5 6 7; do echo line $i; done; exit 4\n")
    check.chmod(0o755)
    result = health.run_check(health.Check("required", str(check), 10, None))
    assert not result.passed
    assert result.describe() == (
        "health check required/net failed (exit 4): line 3 / line 4 / line 5 / line 6 / line 7"
    )
    broken = tmp_path / "broken"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    assert health.run_check(health.Check("wanted", str(broken), 10, None)).describe() == (
        "health check wanted/broken failed (cannot run it: No such file or directory)"
    )
