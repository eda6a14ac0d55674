"""``boot.json`` and ``history.jsonl`` on the state filesystem: durable, atomic, recoverable.

A write goes to ``boot.json.new``, is fsync'd, the current file is kept as ``boot.json.prev``
(a hard link, so there is no moment without it) and the new one is renamed over ``boot.json``;
then the directory is fsync'd. A reader that finds ``boot.json`` torn, missing or damaged falls
back to ``boot.json.prev``, else rebuilds a safe state from the deployments on disk and the boot
history, and says so.
"""

from __future__ import annotations

import json
import os
import time

from overlayroot.bootstate import BootState, StateError, rebuild, sync
from overlayroot.layout import StateLayout
from overlayroot.safejson import parse_json

STATE = "boot.json"
PREVIOUS = "boot.json.prev"
HISTORY = "history.jsonl"
HISTORY_KEEP = 500  # lines kept when the history is trimmed
HISTORY_TRIM_AT = 1000


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes, *, keep_previous: str | None = None) -> None:
    directory = os.path.dirname(path)
    tmp = f"{path}.new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if keep_previous is not None and os.path.exists(path):
        link = f"{keep_previous}.new"
        if os.path.lexists(link):
            os.unlink(link)
        os.link(path, link)
        os.replace(link, keep_previous)
    os.replace(tmp, path)
    fsync_dir(directory)


def save(layout: StateLayout, state: BootState) -> BootState:
    """Write ``state`` as the next generation; returns what was written. Raises OSError."""
    written = BootState(state.entries, state.generation + 1, state.once)
    path, previous = str(layout.top / STATE), str(layout.top / PREVIOUS)
    write_atomically(path, written.to_json().encode(), keep_previous=previous)
    return written


def load(layout: StateLayout) -> tuple[BootState, list[str]]:
    """The boot state matched to the deployments on disk, and notes on any recovery."""
    present = layout.deployment_ids()
    notes: list[str] = []
    state = None
    problem = first_problem = "missing"
    for name in (STATE, PREVIOUS):
        path = layout.top / name
        try:
            state = BootState.from_json(path.read_text(errors="replace"))
            if name == PREVIOUS:
                notes.append(f"recovered the boot state from {path} (generation"
                             f" {state.generation}); {STATE} was {first_problem}")
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
            except Exception:  # a damaged manifest must not stop the rebuild
                created.append((deployment_id, ""))
        state = rebuild(created, blessed, bad)
        had_state = bool(notes) or os.path.exists(layout.top / HISTORY)
        if had_state and present:
            notes.append(f"rebuilt the boot state from the {len(present)} deployments on disk"
                         f" and the boot history ({len(blessed)} known good)")
    return sync(state, present), notes


def outcomes(history: list[dict[str, object]]) -> tuple[set[str], dict[str, str]]:
    """From the history: deployments blessed, and deployments last seen going bad (reason)."""
    blessed: set[str] = set()
    bad: dict[str, str] = {}
    for event in history:
        deployment = str(event.get("deployment"))
        if event.get("event") == "blessed":
            blessed.add(deployment)
            bad.pop(deployment, None)
        elif event.get("event") in ("failed", "marked-bad"):
            blessed.discard(deployment)
            bad[deployment] = str(event.get("reason", ""))
    return blessed, bad


def append_history(
    layout: StateLayout, event: str, deployment: str | None, **fields: object
) -> None:
    """One line of ``history.jsonl``. Raises OSError: the caller decides how loud to be."""
    record = {"time": _now(), "event": event, "deployment": deployment, **fields}
    path = str(layout.top / HISTORY)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > HISTORY_TRIM_AT * 200:
        _trim_history(path)


def _trim_history(path: str) -> None:
    with open(path, "rb") as f:
        lines = f.readlines()
    if len(lines) > HISTORY_TRIM_AT:
        write_atomically(path, b"".join(lines[-HISTORY_KEEP:]))


def read_history(layout: StateLayout) -> list[dict[str, object]]:
    """Every readable line; a torn last line (power cut mid-append) is skipped."""
    try:
        with open(layout.top / HISTORY, "rb") as f:
            raw = f.read()
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
