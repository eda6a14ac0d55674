"""How many worker processes scripts/test starts (tests/workers.py), and that they get the tests
in the order and groups the suite relies on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.workers import (
    DEFAULT_JOBS,
    JOBS_VARIABLE,
    QEMU_TESTS,
    group_of,
    selects_qemu,
    worker_count,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("jobs", "cores", "expected"),
    [
        (None, 2, DEFAULT_JOBS),
        ("", 2, DEFAULT_JOBS),
        ("2", 8, 2),
        ("4", 8, 4),
        ("4", 2, 2),  # never more than the cores
        (None, 1, 0),  # one core: in pytest's own process, no worker
        ("1", 8, 0),
        ("0", 8, 0),
        (" 3 ", 8, 3),
    ],
)
def test_the_number_of_workers(jobs: str | None, cores: int, expected: int) -> None:
    assert worker_count(jobs, cores, selects_qemu=True) == expected


def test_no_workers_when_no_qemu_test_is_selected() -> None:
    assert worker_count("4", 8, selects_qemu=False) == 0


@pytest.mark.parametrize("jobs", ["two", "-1", "1.5"])
def test_a_bad_number_of_jobs_says_what_is_expected(jobs: str) -> None:
    with pytest.raises(pytest.UsageError) as error:
        worker_count(jobs, 2, selects_qemu=True)
    assert str(error.value) == (
        f"{JOBS_VARIABLE}={jobs!r}: expected the number of test processes to run at once,"
        " a whole number (0 or 1: all in one process; default 2)"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], True),
        (["tests"], True),
        (["."], True),
        (["tests/qemu"], True),
        (["tests/qemu/test_boot.py::test_a_malformed_option"], True),
        (["tests/unit", "tests/qemu/test_boot.py"], True),
        (["tests/unit"], False),
        (["tests/unit/test_cli.py::test_x", "tests/host"], False),
        (["tests/test_lint.py"], False),
    ],
)
def test_which_selections_take_in_qemu_tests(args: list[str], expected: bool) -> None:
    assert selects_qemu(args, REPO) is expected


def test_a_selection_is_read_from_where_pytest_was_started() -> None:
    assert selects_qemu(["test_boot.py"], QEMU_TESTS)
    assert selects_qemu(["qemu"], REPO / "tests")
    assert not selects_qemu(["unit"], REPO / "tests")


def _pytest(env: dict[str, str], *args: str) -> str:
    """pytest's output for ``-n auto --dist loadgroup`` (what scripts/test passes) and ``args``."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "auto", "--dist", "loadgroup", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.stdout + result.stderr


def test_scripts_test_starts_no_workers_for_the_unit_tests() -> None:
    out = _pytest({JOBS_VARIABLE: "2"}, "-q", "tests/unit/test_workers.py", "-k", "number_of")
    assert "passed" in out, out
    assert "workers" not in out and "[gw" not in out, out


def test_a_bad_jobs_variable_stops_pytest_with_the_message() -> None:
    out = _pytest({JOBS_VARIABLE: "many"}, "--collect-only", "-q", "tests/qemu/test_harness.py")
    assert f"{JOBS_VARIABLE}='many': expected the number of test processes" in out, out


@pytest.mark.parametrize(
    ("nodeid", "unit"),
    [
        ("tests/host/test_devices.py::test_x[a]", "host"),
        ("tests/host/sub/test_y.py::test_y", "host"),
        ("tests/qemu/test_trixie.py::test_a", "trixie"),
        ("tests/qemu/test_powercut.py::test_b", "powercut"),
        ("tests/unit/test_packaging.py::test_c", "packaging"),
        ("tests/qemu/test_boot.py::test_d", "tests/qemu/test_boot.py::test_d"),
        ("tests/unit/test_packaging_more.py::test_e", "tests/unit/test_packaging_more.py::test_e"),
    ],
)
def test_the_unit_of_work_of_a_test(nodeid: str, unit: str) -> None:
    assert group_of(nodeid) == unit


def test_two_workers_run_the_host_tests_in_one_of_them(tmp_path: Path) -> None:
    out = _pytest(
        {},
        "-n",
        "2",
        "-v",
        "-p",
        "no:cacheprovider",
        "tests/host/test_devices.py",
        "tests/unit/test_workers.py",
        "-k",
        "number_of_workers or which_selections or test_devices",
    )
    ran = re.findall(r"^\[(gw\d)\] .*?(PASSED|SKIPPED|FAILED|ERROR) (\S+)", out, re.MULTILINE)
    host = {worker for worker, _, test in ran if test.startswith("tests/host/")}
    assert len([t for *_, t in ran if t.startswith("tests/host/")]) >= 5, out
    assert len(host) == 1, out
    assert {worker for worker, *_ in ran} == {"gw0", "gw1"}, out


def test_workers_hand_out_the_slow_tests_first(tmp_path: Path) -> None:
    """What two workers collect, in their order (tests/unit/order_probe.py records it and
    deselects every test: nothing boots)."""
    env = {JOBS_VARIABLE: "2", "ORDER_PROBE_DIR": str(tmp_path)}
    out = _pytest(env, "-p", "tests.unit.order_probe", "tests/host/test_devices.py", "tests/qemu")
    assert "2 workers" in out, out
    gw0, gw1 = ((tmp_path / w).read_text().splitlines() for w in ("gw0", "gw1"))
    assert gw0 == gw1  # pytest-xdist requires the same list, in the same order
    # The slow groups first, then the other slow tests (minutes each), then the other QEMU
    # tests, then the host ones.
    groups = [i for i in gw0 if "test_powercut.py" in i or "test_trixie.py" in i]
    slow = [
        i
        for i in gw0
        if "test_integrations.py" in i or "test_kexec.py::test_debian_with_systemd" in i
    ]
    host = [i for i in gw0 if i.startswith("tests/host/")]
    assert groups and slow and host
    assert gw0[: len(groups)] == groups, gw0[: len(groups)]
    assert gw0[len(groups) : len(groups) + len(slow)] == slow, gw0[: len(groups) + len(slow)]
    assert gw0[-len(host) :] == host
