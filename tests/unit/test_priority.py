"""The stage's CPU priority (overlayroot/boot/priority.py): hurried while it assembles the root,
the usual priority for the real init and for the rescue shell's commands. Each test runs in a
forked child, whose nice value is its own. switch_root's exec is in
tests/host/test_switchroot.py."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import pytest

from overlayroot.boot import priority, rescue

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: raising a priority")


def in_child(body: Callable[[], object]) -> object:
    """``body()``'s JSON-able result, computed in a forked child (a nice value is per process)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.write(write, json.dumps(body()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    assert text, "the child died before it answered"
    return json.loads(text)


def nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def test_hurry_raises_the_priority_and_relax_restores_the_one_before() -> None:
    def body() -> list[object]:
        os.setpriority(os.PRIO_PROCESS, 0, 3)  # not the default: relax goes back to it, not to 0
        hurried = priority.hurry()
        during = nice()
        priority.relax()
        after = nice()
        priority.relax()  # a second relax changes nothing
        return [hurried, during, after, nice()]

    assert in_child(body) == [True, priority.HURRIED, 3, 3]


def test_hurrying_twice_still_relaxes_to_the_first_priority() -> None:
    def body() -> list[int]:
        os.setpriority(os.PRIO_PROCESS, 0, 5)
        priority.hurry()
        priority.hurry()
        priority.relax()
        return [nice()]

    assert in_child(body) == [5]


def test_a_refused_hurry_leaves_the_priority_and_relax_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without CAP_SYS_NICE (a container), the stage runs at the priority it has."""

    def refuse(*args: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    def body() -> list[object]:
        os.setpriority(os.PRIO_PROCESS, 0, 2)
        monkeypatch.setattr(os, "setpriority", refuse)
        hurried = priority.hurry()
        priority.relax()
        return [hurried, nice(), priority._before]

    assert in_child(body) == [False, 2, None]


def test_a_refused_relax_keeps_the_priority_to_go_back_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """relax's error path: the stage stays hurried and a later relax still knows where to go."""
    real = os.setpriority

    def refuse(*args: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    def body() -> list[object]:
        real(os.PRIO_PROCESS, 0, 4)
        priority.hurry()
        monkeypatch.setattr(os, "setpriority", refuse)
        priority.relax()
        refused = [nice(), priority._before]
        monkeypatch.setattr(os, "setpriority", real)
        priority.relax()
        return [*refused, nice(), priority._before]

    assert in_child(body) == [priority.HURRIED, 4, 4, None]


@pytest.mark.skipif(shutil.which("nice") is None, reason="no nice(1) to report a priority")
def test_the_rescue_shells_commands_run_at_the_usual_priority() -> None:
    """The stage stays hurried; what the shell runs does not."""
    command = ["/bin/sh", "-c", f"exit $(( $({shutil.which('nice')}) + 100 ))"]

    def body() -> list[int]:
        priority.hurry()
        status = rescue.run(command)
        return [status - 100, nice()]

    assert in_child(body) == [0, priority.HURRIED]
