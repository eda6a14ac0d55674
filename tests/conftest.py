"""Suite-wide settings, and how the tests are spread over worker processes (tests/workers.py)."""

import os
from typing import Any

import pytest
from hypothesis import settings

from tests import workers

# The QEMU harness's fixtures (kernel, machine, …): a plugin of this checkout, not installed.
pytest_plugins = ["qemu.plugin"]

# The suite shares two cores with QEMU guests: time per example varies too much for deadlines.
settings.register_profile("overlayroot", deadline=None)
settings.load_profile("overlayroot")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (what scripts/test passes): ``$OVERLAYROOT_TEST_JOBS`` workers, 2 by
    default; none when the selection has no QEMU test or the machine one core
    (tests/workers.py)."""
    return workers.worker_count(
        os.environ.get(workers.JOBS_VARIABLE),
        workers.cores(),
        workers.selects_qemu(config.args, config.invocation_params.dir),
    )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` (what scripts/test passes): the groups of tests/workers.py."""
    if config.getvalue("dist") == "loadgroup":
        return workers.GroupScheduling(config, log)
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a worker: the slowest tests first (sorted() keeps the collection order otherwise, the
    same in every worker, as pytest-xdist requires)."""
    if hasattr(config, "workerinput"):
        items[:] = sorted(items, key=workers.schedule_rank)


@pytest.fixture(autouse=True)
def _no_modprobe_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial boot that a test runs in-process, on a host without /dev/watchdog, would ask the
    host's modprobe for softdog, or load it from the host's modules.dep
    (:func:`overlayroot.boot.modload.need`): no test loads a module into the kernel it runs on."""
    from overlayroot.boot import modload
    from overlayroot.boot.console import Console

    monkeypatch.setattr(modload, "MODPROBE", ("/nonexistent/modprobe",))
    monkeypatch.setattr(modload, "MODULES_DEP", ("/nonexistent/{release}/modules.dep",))
    monkeypatch.setattr(modload, "_depmods", {})
    # overlayroot.debug in one test's command line (prepare.main sets it) is not the next one's.
    monkeypatch.setattr(modload, "console", Console())
    # Which modules the host has loaded is not what a test's stand-in modules are.
    monkeypatch.setattr(modload, "SYS_MODULE", "/nonexistent/sys/module")
