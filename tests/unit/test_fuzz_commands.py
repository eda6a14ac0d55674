"""The commands that only read, fuzzed end to end: a state filesystem whose boot.json, backup,
manifests and history hold anything, and ``status``, ``history`` and ``gc --dry-run`` on it
print (to a strict UTF-8 stdout) or fail with a message: never a traceback. (``etc diff`` of an
image deployment would enter a mount namespace of its own: not in a unit test.)"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import pytest
from hypothesis import strategies as st

from overlayroot.commands import cli
from overlayroot.core.layout import StateLayout
from overlayroot.core.statefile import HISTORY, PREVIOUS, STATE
from tests import fuzzing
from tests.unit.test_fuzz_manifest import MANIFEST_BYTES
from tests.unit.test_fuzz_state import BOOT_JSON_BYTES, HISTORY_BYTES

COMMANDS = (
    ["status"],
    ["status", "--json"],
    ["history"],
    ["history", "--json", "-n", "3"],
    ["gc", "--keep", "1", "--dry-run"],
)
STATES = st.tuples(
    BOOT_JSON_BYTES,
    st.none() | BOOT_JSON_BYTES,
    HISTORY_BYTES,
    st.lists(MANIFEST_BYTES, min_size=1, max_size=2),
)


def feed_commands(files: tuple[bytes, bytes | None, bytes, list[bytes]]) -> None:
    state, previous, history, manifests = files
    with tempfile.TemporaryDirectory() as tmp:
        layout = StateLayout(tmp)
        for number, manifest in enumerate(manifests, 1):
            deployment = Path(layout.deployments) / f"v{number}"
            (deployment / "root" / "etc").mkdir(parents=True)
            (deployment / "manifest.json").write_bytes(manifest)
        (Path(layout.top) / STATE).write_bytes(state)
        if previous is not None:
            (Path(layout.top) / PREVIOUS).write_bytes(previous)
        (Path(layout.top) / HISTORY).write_bytes(history)
        for command in COMMANDS:
            out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # strict, as on a terminal
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                assert cli.main([*command, "--sysroot", tmp]) in (0, 1)
                out.flush()


READERS = {
    "cli status/history/gc": fuzzing.Reader(STATES, feed_commands, (), costly=True),
}


@pytest.mark.parametrize("name", READERS)
def test_the_reading_commands_never_print_a_traceback(name: str) -> None:
    reader = READERS[name]
    fuzzing.check(reader, fuzzing.examples(reader))
