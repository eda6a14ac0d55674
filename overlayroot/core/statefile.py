"""``boot.json`` and ``history.jsonl`` on the state filesystem: durable, atomic, recoverable.

A write goes to a temporary file, is fsync'd, the current file is kept as ``boot.json.prev``
(a hard link, so there is no moment without it) *when it reads as a valid state* — a damaged
file never becomes the backup — and the new one is renamed over ``boot.json``; then the
directory is fsync'd. A reader that finds ``boot.json`` torn, missing or damaged falls back to
``boot.json.prev``, else rebuilds a safe state from the deployments on disk and the boot
history, and says so. Every file is read with :func:`overlayroot.core.files.read_regular`: a FIFO,
a directory or a symlink where a file belongs is damage, not something to block on or follow.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from overlayroot.core import files
from overlayroot.core.bootstate import BootState, StateError, rebuild, sync
from overlayroot.core.errors import BootError
from overlayroot.core.layout import StateLayout
from overlayroot.core.safejson import format_json, parse_json

STATE = "boot.json"
PREVIOUS = "boot.json.prev"
HISTORY = "history.jsonl"
HISTORY_KEEP = 500  # lines kept when the history is trimmed
HISTORY_TRIM_AT = 1000
STATE_LIMIT = 1 << 20  # bytes; a boot.json is a few hundred bytes per deployment
HISTORY_LIMIT = 1 << 24


def parses(data: bytes) -> bool:
    """Whether ``data`` is a boot state this version can read."""
    try:
        BootState.from_json(data.decode())
    except ValueError:  # StateError, UnicodeDecodeError
        return False
    return True


def save(layout: StateLayout, state: BootState) -> BootState:
    """Write ``state`` as the next generation; returns what was written. Raises OSError."""
    written = BootState(state.entries, state.generation + 1, state.once)
    path, previous = layout.file(STATE), layout.file(PREVIOUS)
    files.write_atomically(
        path, written.to_json().encode(), keep_previous=previous, previous_ok=parses
    )
    return written


def read_state(path: str | os.PathLike[str]) -> BootState:
    """One state file; raises ``StateError`` for what it holds, ``OSError`` for the file."""
    data = files.read_regular(path, STATE_LIMIT)
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise StateError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return BootState.from_json(text)


def load(layout: StateLayout) -> tuple[BootState, list[str]]:
    """The boot state matched to the deployments on disk, and notes on any recovery."""
    present = layout.deployment_ids()
    notes: list[str] = []
    state = None
    problem = first_problem = "missing"
    for name in (STATE, PREVIOUS):
        path = layout.file(name)
        try:
            state = read_state(path)
            if name == PREVIOUS:
                notes.append(
                    f"recovered the boot state from {path} (generation"
                    f" {state.generation}); {STATE} was {first_problem}"
                )
            break
        except FileNotFoundError:
            problem = "missing"
        except StateError as e:
            problem = f"unreadable: {e}"
        except OSError as e:
            problem = f"unreadable: {e.strerror}"
        if name == STATE:
            first_problem = problem
            if problem != "missing":
                notes.append(f"{path} is {problem}")
    if state is None:
        blessed, bad = outcomes(read_history(layout))
        created = []
        for deployment_id in present:
            try:
                created.append((deployment_id, layout.read_manifest(deployment_id).created))
            except BootError:  # a damaged manifest must not stop the rebuild
                created.append((deployment_id, ""))
        state = rebuild(created, blessed, bad)
        had_state = bool(notes) or os.path.exists(layout.file(HISTORY))
        if had_state and present:
            notes.append(
                f"rebuilt the boot state from the {len(present)} deployments on disk"
                f" and the boot history ({len(blessed)} known good)"
            )
    return sync(state, present), notes


class Event:
    """The kinds of history events (``history.jsonl``'s ``event``): every writer and reader
    names them from here. Plain strings, not an enum: the stage imports this module."""

    BOOT = "boot"  # the stage handed over to a deployment's init (trial, counted, degraded…)
    FAILED = "failed"  # a deployment failed in the stage, or used up its tries
    RECOVERED = "recovered"  # boot.json was damaged and was recovered
    REPAIRED = "repaired"  # damaged shared state was set aside and made anew
    BLESSED = "blessed"  # overlayroot bless: known good
    MARKED_BAD = "marked-bad"  # overlayroot mark-bad, or a required health check failed
    KEXEC = "kexec"  # the stage started a deployment's own kernel (its try taken before)
    REBOOT = "reboot"  # the stage rebooted through the firmware for a candidate's kernel


GONE_BAD = (Event.FAILED, Event.MARKED_BAD)


def outcomes(history: list[dict[str, object]]) -> tuple[set[str], dict[str, str]]:
    """From the history: deployments blessed, and deployments last seen going bad (reason)."""
    blessed: set[str] = set()
    bad: dict[str, str] = {}
    for event in history:
        deployment = str(event.get("deployment"))
        if event.get("event") == Event.BLESSED:
            blessed.add(deployment)
            bad.pop(deployment, None)
        elif event.get("event") in GONE_BAD:
            blessed.discard(deployment)
            bad[deployment] = str(event.get("reason", ""))
    return blessed, bad


def append_history(
    layout: StateLayout, event: str, deployment: str | None, **fields: object
) -> None:
    """One line of ``history.jsonl``. Raises OSError: the caller decides how loud to be.

    Commands call it under the state lock (trimming rewrites the file: an append racing it
    would be lost); the boot stage runs alone. Something other than a regular file in the
    history's place (a FIFO would block the boot) is set aside and a new history begun."""
    record = {"time": _now(), "event": event, "deployment": deployment, **fields}
    path = layout.file(HISTORY)
    line = (format_json(record) + "\n").encode()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    if not files.regular_or_missing(path):
        files.set_aside(path)
    fd = os.open(path, flags, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise files.NotRegular(errno.EINVAL, "is not a regular file", path)
        os.write(fd, line)
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > HISTORY_TRIM_AT * 200:
        _trim_history(path)


def _trim_history(path: str) -> None:
    lines = files.read_regular(path, HISTORY_LIMIT).splitlines(keepends=True)
    if len(lines) > HISTORY_TRIM_AT:
        files.write_atomically(path, b"".join(lines[-HISTORY_KEEP:]))


def read_history(layout: StateLayout) -> list[dict[str, object]]:
    """Every readable line; a torn last line (power cut mid-append) is skipped."""
    try:
        raw = files.read_regular(layout.file(HISTORY), HISTORY_LIMIT)
    except OSError:
        return []
    events = []
    for line in raw.splitlines():
        try:
            event = parse_json(line)
        except ValueError:
            continue
        # Only what overlayroot writes: an object with an "event" string.
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            events.append(event)
    return events


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
