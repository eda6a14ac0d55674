"""How many test processes (pytest-xdist workers) ``scripts/test`` starts, which tests must
share one, and in what order they take the tests.

``scripts/test`` passes ``-n auto --dist loadgroup``. ``-n auto`` asks
:func:`tests.conftest.pytest_xdist_auto_num_workers`, which answers with :func:`worker_count`;
``--dist loadgroup`` gets :class:`GroupScheduling`, whose groups are :data:`GROUPS`. Not
pytest-xdist's own loadgroup and its ``xdist_group`` marks: with pytest 9.2 it silently stops
grouping (it renames the tests' ids, which pytest no longer reads back: pytest-xdist issue
1386).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

JOBS_VARIABLE = "OVERLAYROOT_TEST_JOBS"
DEFAULT_JOBS = 2
TESTS = Path(__file__).resolve().parent
QEMU_TESTS = TESTS / "qemu"

# Test ids that start with the key run in one worker, one after the other.
GROUPS = {
    # Several make filesystems with the same label on loop devices and find the device by that
    # label among all of the host's block devices; loop devices come and go.
    "tests/host/": "host",
    # The module-scoped power-cut recording: minutes of boots, once.
    "tests/qemu/test_powercut.py::": "powercut",
    # The first builds the Debian 13 image (minutes, on a clean clone): the other would wait.
    "tests/qemu/test_trixie.py::": "trixie",
    # One wheel, module-scoped, for every test.
    "tests/unit/test_packaging.py::": "packaging",
}


def worker_count(jobs: str | None, cores: int, selects_qemu: bool) -> int:
    """The number of workers for ``$OVERLAYROOT_TEST_JOBS`` (``jobs``, None when unset): that
    many (:data:`DEFAULT_JOBS` when unset), at most one per core; 0, every test in pytest's own
    process, when that leaves one or none, or when no QEMU test is selected (the other tests
    take seconds: starting workers would cost more than it saves)."""
    if jobs is None or jobs.strip() == "":
        wanted = DEFAULT_JOBS
    else:
        try:
            wanted = int(jobs)
        except ValueError:
            wanted = -1
        if wanted < 0:
            raise pytest.UsageError(
                f"{JOBS_VARIABLE}={jobs!r}: expected the number of test processes to run at"
                f" once, a whole number (0 or 1: all in one process; default {DEFAULT_JOBS})"
            )
    count = min(wanted, cores)
    if count < 2 or not selects_qemu:
        return 0
    return count


def selects_qemu(args: Sequence[str], invocation_dir: Path, qemu_tests: Path = QEMU_TESTS) -> bool:
    """Whether pytest's positional arguments (paths, ``path::test`` ids) take in a test of
    ``qemu_tests``: one inside it, or a directory that holds it. No argument: the whole suite."""
    if not args:
        return True
    for arg in args:
        path = (invocation_dir / arg.split("::", 1)[0]).resolve()
        if path == qemu_tests or qemu_tests in path.parents or path in qemu_tests.parents:
            return True
    return False


def cores() -> int:
    """The cores this process may run on (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def schedule_rank(item: pytest.Item) -> int:
    """Where a test goes in the workers' queue: the longest work is handed out while there is
    still short work to even out the workers' ends. First the tests marked ``slow`` (minutes
    each) of a group of :data:`GROUPS` (the biggest units: the trixie image, the power-cut
    recording; on a clean clone the trixie image and the Debian 12 tree of the other slow tests
    are then built at once, by different workers), then the other ``slow`` tests, then the other
    QEMU tests, then the rest (seconds each)."""
    if item.get_closest_marker("slow") is not None:
        return 0 if group_of(item.nodeid) != item.nodeid else 1
    path = Path(str(item.path)).resolve()
    return 2 if QEMU_TESTS in path.parents else 3


def group_of(nodeid: str) -> str:
    """The unit of work ``nodeid`` belongs to: its group of :data:`GROUPS`, else itself."""
    for prefix, group in GROUPS.items():
        if nodeid.startswith(prefix):
            return group
    return nodeid


class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
    """pytest-xdist's load-by-scope scheduling with :func:`group_of` as the scope: each worker
    takes the next unit when it has two tests or fewer left, in the workers' collection order
    (:func:`schedule_rank`)."""

    def _split_scope(self, nodeid: str) -> str:
        return group_of(nodeid)
