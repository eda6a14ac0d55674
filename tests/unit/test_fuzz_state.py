"""``boot.json`` and ``history.jsonl``, fuzzed: a damaged boot state is a StateError (so the
reader falls back to ``boot.json.prev`` or rebuilds), and a damaged history line is skipped;
nothing else is ever raised, however deep, wide or oddly typed the JSON."""

from __future__ import annotations

import binascii
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st

from overlayroot.commands import cli, status, target
from overlayroot.core import safejson
from overlayroot.core.bootstate import BootState, Entry, StateError
from overlayroot.core.errors import BootError
from overlayroot.core.layout import Manifest, StateLayout
from overlayroot.core.statefile import HISTORY, PREVIOUS, STATE, load, outcomes, read_history
from tests import fuzzing

NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),  # nan and infinities too: json.dumps writes them, json.loads reads them
)
# json.dumps writes a lone surrogate as "\\ud800": JSON allows it, UTF-8 output does not.
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["\ud800", "a\udcff", "\x00", "é"]))
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON_VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=16,
)
DEEP = st.builds(
    lambda n, opener, tail: opener * n + tail,
    st.integers(1, 120_000),
    st.sampled_from(["[", '{"a":', '[{"event":"boot","x":']),
    st.sampled_from(["", "]", "1", "}"]),
)


def deep_value(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def with_crc(body: dict[str, Any]) -> str:
    """``body`` as ``BootState.to_json`` writes it, checksum and all: past the CRC check."""
    text = json.dumps(body, indent=2, sort_keys=True)
    return f'{text[:-2]},\n  "crc32": "{binascii.crc32(text.encode()):08x}"\n}}\n'


ENTRY_FIELDS = ("priority", "tries_left", "successful", "bad", "pinned")
ENTRIES = st.fixed_dictionaries(
    {},
    optional={
        "priority": st.one_of(st.integers(), JSON_VALUES),
        "tries_left": st.one_of(st.none(), st.integers(), JSON_VALUES),
        "successful": st.one_of(st.booleans(), JSON_VALUES),
        "bad": st.one_of(st.none(), st.text(), JSON_VALUES),
        "pinned": st.one_of(st.booleans(), JSON_VALUES),
    },
)
BODIES = st.fixed_dictionaries(
    {"format": st.one_of(st.just(1), JSON_VALUES)},
    optional={
        "generation": st.one_of(st.integers(), JSON_VALUES),
        "once": st.one_of(st.none(), st.text(max_size=8), JSON_VALUES),
        "deployments": st.one_of(
            st.dictionaries(st.text(max_size=8), st.one_of(ENTRIES, JSON_VALUES), max_size=3),
            JSON_VALUES,
        ),
    },
)
BOOT_JSON = st.one_of(
    st.text(),
    DEEP,
    JSON_VALUES.map(json.dumps),
    BODIES.map(with_crc),  # passes the checksum: reaches the field checks
    BODIES.map(lambda body: with_crc({**body, "extra": deep_value(40)})),
)
BOOT_JSON_BYTES = st.one_of(
    st.binary(max_size=256),
    BOOT_JSON.map(str.encode),
    BOOT_JSON.map(str.encode).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda i: b[:i] + b"\xff" + b[i:])
    ),  # one invalid UTF-8 byte
)

HISTORY_KEYS = st.sampled_from(
    [
        "event",
        "deployment",
        "time",
        "trial",
        "reason",
        "tries_left",
        "fallback_from",
        "watchdog",
        "counted",
        "count_error",
        "outcome",
    ]
)
EVENTS = st.dictionaries(
    HISTORY_KEYS,
    st.one_of(
        st.sampled_from(["boot", "blessed", "failed", "marked-bad", "v1", "v2"]), JSON_VALUES
    ),
    max_size=8,
)
HISTORY_LINES = st.one_of(
    EVENTS.map(lambda e: json.dumps(e).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    DEEP.map(str.encode),
    st.builds(
        lambda d: json.dumps({"event": "boot", "reason": deep_value(d)}).encode(),
        st.integers(1, 990),
    ),
    st.binary(max_size=40),
)
HISTORY_BYTES = st.lists(HISTORY_LINES, max_size=12).map(b"\n".join)


def state_dir(root: Path, *, deployment: bool = True) -> StateLayout:
    layout = StateLayout(root)
    Path(layout.deployments).mkdir(parents=True)
    if deployment:
        (Path(layout.deployments) / "v1").mkdir()
        manifest = Manifest(
            id="v1",
            created="2024-01-01T00:00:00Z",
            format="dir",
            image="root",
            sha256="0" * 64,
            size=0,
            origin="/x",
        )
        (Path(layout.deployments) / "v1" / "manifest.json").write_text(manifest.to_json())
    return layout


def feed_load(files: tuple[bytes, bytes | None, bytes]) -> None:
    state, previous, history = files
    with tempfile.TemporaryDirectory() as tmp:
        layout = state_dir(Path(tmp))
        (Path(layout.top) / STATE).write_bytes(state)
        if previous is not None:
            (Path(layout.top) / PREVIOUS).write_bytes(previous)
        (Path(layout.top) / HISTORY).write_bytes(history)
        loaded, _notes = load(layout)
        assert set(loaded.entries) == {"v1"}


def feed_history(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        layout = state_dir(Path(tmp), deployment=False)
        (Path(layout.top) / HISTORY).write_bytes(raw)
        events = read_history(layout)
    outcomes(events)
    shown = status.with_outcomes(events)
    for event in shown:
        status.history_line(event).encode()  # printed
    json.dumps(shown, indent=2, sort_keys=True)  # history --json


READERS = {
    "bootstate.from_json": fuzzing.Reader(BOOT_JSON, BootState.from_json, (StateError,)),
    "statefile.load": fuzzing.Reader(
        st.tuples(BOOT_JSON_BYTES, st.none() | BOOT_JSON_BYTES, HISTORY_BYTES),
        feed_load,
        (),
        costly=True,
    ),
    "statefile.read_history": fuzzing.Reader(HISTORY_BYTES, feed_history, ()),
}


@pytest.mark.parametrize("name", READERS)
def test_reading_the_boot_state_and_history_raises_only_state_errors(name: str) -> None:
    reader = READERS[name]
    fuzzing.check(reader, fuzzing.examples(reader))


# -- the cases of issue 7 ----------------------------------------------------------------------


def test_a_boot_json_nested_100000_deep_is_a_state_error() -> None:
    with pytest.raises(StateError, match=r"^not JSON \(nested more than 16 levels\)$"):
        BootState.from_json("[" * 100_000)


def test_a_boot_json_nested_just_under_the_interpreter_limit_is_a_state_error() -> None:
    body = {
        "format": 1,
        "generation": 1,
        "once": None,
        "deployments": {
            "v1": {
                "priority": deep_value(900),
                "tries_left": None,
                "successful": True,
                "bad": None,
                "pinned": False,
            }
        },
    }
    with pytest.raises(StateError, match="nested more than 16 levels"):
        BootState.from_json(with_crc(body))


def test_boot_json_and_its_backup_nested_100000_deep_are_rebuilt(tmp_path: Path) -> None:
    layout = state_dir(tmp_path)
    (Path(layout.top) / STATE).write_text("[" * 100_000)
    (Path(layout.top) / PREVIOUS).write_text("[" * 100_000)
    state, notes = load(layout)
    assert state.entries == {"v1": Entry(priority=1)}
    assert notes[0] == (
        f"{Path(layout.top) / STATE} is unreadable: not JSON (nested more than 16 levels)"
    )
    assert notes[1].startswith("rebuilt the boot state from the 1 deployments on disk")


def test_boot_json_nested_100000_deep_falls_back_to_the_backup(tmp_path: Path) -> None:
    layout = state_dir(tmp_path)
    good = BootState({"v1": Entry(priority=7, successful=True)}, generation=4)
    (Path(layout.top) / STATE).write_text("[" * 100_000)
    (Path(layout.top) / PREVIOUS).write_text(good.to_json())
    state, notes = load(layout)
    assert state == good
    assert notes[-1].startswith(f"recovered the boot state from {Path(layout.top) / PREVIOUS}")


@pytest.mark.parametrize(
    "line",
    [
        '{"event": 5, "deployment": "v1"}',
        '{"event": [1], "deployment": "v1"}',
        '{"event": {"a": 1}}',
        '{"event": null}',
        "{}",
        '{"time": "t"}',
        "5",
        pytest.param("[" * 100_000, id="100000 ["),
        pytest.param(
            json.dumps({"event": "blessed", "deployment": "v1", "reason": deep_value(900)}),
            id="a reason nested 900 deep",
        ),
    ],
)
def test_a_history_line_of_the_wrong_shape_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str
) -> None:
    layout = state_dir(tmp_path)
    good = json.dumps({"time": "2024-01-01T00:00:00Z", "event": "boot", "deployment": "v1"})
    (Path(layout.top) / HISTORY).write_text(f"{line}\n{good}\n")
    assert read_history(layout) == [json.loads(good)]
    assert cli.main(["history", "--sysroot", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "2024-01-01T00:00:00Z  boot        v1  the latest boot\n"


def test_safe_json_reads_what_overlayroot_writes_and_refuses_the_rest() -> None:
    state = BootState({"v1": Entry(priority=1, bad="x")}, generation=2, once="v1")
    assert safejson.parse_json(state.to_json()) == json.loads(state.to_json())
    assert safejson.parse_json(b'{"a": [1, 2.5, "x", null]}') == {"a": [1, 2.5, "x", None]}
    assert safejson.parse_json(json.dumps(deep_value(16))) == deep_value(16)
    refused: list[tuple[str | bytes, str]] = [
        ("[" * 100_000, "nested more than 16 levels"),
        (json.dumps(deep_value(17)), "nested more than 16 levels"),
        ("NaN", "NaN is not a number JSON allows"),
        ("[-Infinity]", "-Infinity is not a number JSON allows"),
        ("1e999", "1e999 is not a number JSON allows"),
        ('{"a": "\\ud800"}', "a string holds the lone surrogate '\\ud800'"),
        (b'"\xff"', "invalid start byte"),
    ]
    for text, problem in refused:
        with pytest.raises(ValueError, match=re.escape(problem)):
            safejson.parse_json(text)


def test_a_booted_json_fallback_of_the_wrong_shape_is_left_out() -> None:
    booted: dict[str, object] = {
        "deployment": "v1",
        "failed": [
            1,
            "v2",
            ["v3"],
            {"deployment": "v4"},
            {"deployment": "v5", "reason": "no init"},
        ],
    }
    records = status.describe(BootState({"v1": Entry(successful=True)}), "v1", {})
    assert status.booted_notes(booted, records, False) == [
        "this boot fell back from v4: no reason recorded",
        "this boot fell back from v5: no init",
    ]


def test_a_booted_json_nested_100000_deep_is_a_boot_error(tmp_path: Path) -> None:
    path = tmp_path / "booted.json"
    path.write_text("[" * 100_000)
    with pytest.raises(
        BootError,
        match=f"^cannot read {path}, which says what was booted: nested more than 16 levels",
    ):
        target.read_booted(str(path))
