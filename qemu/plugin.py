"""pytest plugin: the `kernel`, `second_kernel`, `qemu_accel` and `machine` fixtures, console logs
on failure.

Every console log of a test lands in `<cache>/test-logs/<test id>/<name>.log`; a failed test's
report names them, a passing test's logs are deleted.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

from qemu.accel import choose_accel
from qemu.kernel import (
    Kernel,
    KernelUnavailable,
    debian_cloud_kernel,
    kernel_from_env,
    second_cloud_kernel,
    second_kernel_from_env,
)
from qemu.machine import LoggedDisk, Machine
from qemu.paths import cache_dir

_console_logs = pytest.StashKey[list[Path]]()
_failed = pytest.StashKey[bool]()


class MachineFactory:
    """`machine(initrd=..., disks=[...], cmdline="...", name="boot1")`: a Machine not yet started.

    `kernel=` boots another kernel than the session's (e.g. the pair a bootloader would load
    from the disk); its `modules` and `version` are not used to boot.

    Start it with `with machine(...) as m:` or `m.start()`; whatever still runs is killed at the
    end of the test.
    """

    def __init__(self, kernel: Kernel, accel: str, log_dir: Path, logs: list[Path]) -> None:
        self._kernel = kernel
        self._accel = accel
        self._log_dir = log_dir
        self._logs = logs
        self._machines: list[Machine] = []

    def __call__(
        self,
        *,
        initrd: Path,
        disks: Sequence[Path | LoggedDisk] = (),
        cmdline: str = "",
        name: str = "boot",
        memory_mb: int = 1024,
        kernel: Kernel | None = None,
    ) -> Machine:
        log_path = self._log_dir / f"{_sanitise(name)}.log"
        if log_path in self._logs:
            raise ValueError(f"a machine named {name!r} already booted in this test")
        self._logs.append(log_path)
        machine = Machine(
            kernel or self._kernel,
            initrd,
            log_path=log_path,
            disks=disks,
            cmdline=cmdline,
            accel=self._accel,
            memory_mb=memory_mb,
        )
        self._machines.append(machine)
        return machine

    def close(self) -> None:
        for machine in self._machines:
            if machine.started:
                machine.kill()


@pytest.fixture(scope="session")
def kernel() -> Kernel:
    """The kernel under test: $OVERLAYROOT_KERNEL(_MODULES), else Debian's cloud kernel."""
    if shutil.which("qemu-system-x86_64") is None:
        _skip_or_fail("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from_env = kernel_from_env()
    if from_env is not None:
        return from_env
    try:
        return debian_cloud_kernel(cache_dir())
    except KernelUnavailable as error:
        _skip_or_fail(f"no kernel to boot: {error}")


@pytest.fixture(scope="session")
def second_kernel(kernel: Kernel) -> Kernel:
    """A kernel of another version and module ABI than `kernel`, for deployments that carry
    their own: $OVERLAYROOT_KERNEL_B(_MODULES), else Debian's 6.12 cloud kernel."""
    try:
        second = second_kernel_from_env() or second_cloud_kernel(cache_dir())
    except KernelUnavailable as error:
        _skip_or_fail(f"no second kernel: {error}")
    if second.version == kernel.version:
        _skip_or_fail(
            f"the second kernel is the first one ({kernel.version}): set"
            " OVERLAYROOT_KERNEL_B to another"
        )
    return second


@pytest.fixture(scope="session")
def qemu_accel(kernel: Kernel) -> str:
    """ "kvm" if a probe guest boots under KVM here, else "tcg"; $OVERLAYROOT_QEMU_ACCEL forces."""
    return choose_accel(kernel)


@pytest.fixture
def machine(
    request: pytest.FixtureRequest, kernel: Kernel, qemu_accel: str
) -> Generator[MachineFactory, None, None]:
    log_dir = cache_dir() / "test-logs" / _sanitise(request.node.nodeid)
    shutil.rmtree(log_dir, ignore_errors=True)
    logs: list[Path] = []
    request.node.stash[_console_logs] = logs
    factory = MachineFactory(kernel, qemu_accel, log_dir, logs)
    yield factory
    factory.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "qemu: boots a kernel under QEMU (slow)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "machine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.qemu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    logs = item.stash.get(_console_logs, None)
    if not logs:
        return
    if report.failed:
        item.stash[_failed] = True
        paths = " ".join(str(log) for log in logs)
        longrepr = report.longrepr
        if hasattr(longrepr, "addsection"):
            longrepr.addsection("console logs", paths)
        else:
            report.sections.append(("console logs", paths))
    if report.when == "teardown" and not item.stash.get(_failed, False):
        shutil.rmtree(logs[0].parent, ignore_errors=True)


def _skip_or_fail(reason: str) -> NoReturn:
    """Skip the boot tests on a developer's machine that cannot run them; in CI (CI=true)
    that is a failure, so that a missing install step cannot pass unnoticed."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the boot tests must run; scripts/setup installs both)")
    pytest.skip(reason)


def _sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_")[:200] or "test"
