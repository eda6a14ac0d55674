"""The state filesystem's JSON codec: json.dumps's bytes without the json package, and its
errors."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlayroot.core.safejson import format_json, parse_json

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()  # lone surrogates included: both write them as \ud800
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(VALUES)
def test_format_json_writes_what_json_dumps_writes(value: object) -> None:
    assert format_json(value, indent=2) == json.dumps(value, indent=2, sort_keys=True)
    assert format_json(value) == json.dumps(value, sort_keys=True)
    assert format_json(value, indent=0) == json.dumps(value, indent=0, sort_keys=True)


def depth(value: object) -> int:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


@settings(max_examples=200)
@given(VALUES)
def test_parse_json_reads_what_json_loads_reads(value: object) -> None:
    text = json.dumps(value, indent=2)
    expected = json.loads(text)
    if depth(expected) > 16:
        with pytest.raises(ValueError, match="nested more than 16 levels"):
            parse_json(text)
        return
    try:
        json.dumps(expected, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate, refused
        with pytest.raises(ValueError, match="lone surrogate"):
            parse_json(text)
        return
    assert parse_json(text) == expected
    assert parse_json(f" \n\t{text}\r\n ") == expected


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ({1: "a"}, TypeError, "keys must be str, not int"),
        ({"a": {None: 1}}, TypeError, "keys must be str, not NoneType"),
        ([object()], TypeError, "Object of type object is not JSON serializable"),
        ({"a": b"x"}, TypeError, "Object of type bytes is not JSON serializable"),
        (float("nan"), ValueError, "nan is not a number JSON allows"),
        ([float("-inf")], ValueError, "-inf is not a number JSON allows"),
    ],
)
def test_format_json_refuses_what_json_does_not_hold(
    value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{message}$"):
        format_json(value)


BAD = ['{"a" 1}', "[1,]", '"abc', "nul", "", "{} x", '"a\x01"', "[1] [2]"]


@pytest.mark.parametrize("text", BAD)
def test_a_syntax_error_says_what_json_says_where_json_can_be_imported(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(ValueError) as error:
        parse_json(text)
    assert str(error.value) == str(expected.value)


@pytest.mark.parametrize("text", BAD)
def test_a_syntax_error_is_a_value_error_where_json_is_not_there(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The boot stage: json is not frozen, and _json finds no json.decoder to raise from.
    for name in [m for m in sys.modules if m == "json" or m.startswith("json.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "json", None)  # import json: ImportError
    with pytest.raises(ValueError, match=r"^not JSON$"):
        parse_json(text)


def test_bytes_are_utf8() -> None:
    assert parse_json('["é"]'.encode()) == ["é"]
    with pytest.raises(UnicodeDecodeError, match="invalid start byte"):
        parse_json(b'"\xff"')
