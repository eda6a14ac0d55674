"""JSON from files anyone may have damaged, read so that damage is a ``ValueError`` like any other.

``json.loads`` recurses once per level of nesting: 100,000 ``[`` raise ``RecursionError``, and a
structure just under the interpreter's limit parses, but a later ``repr``, ``str`` or
``json.dumps`` of it deeper in the stack can raise it. Nothing overlayroot writes nests more than
three levels, so deeper is refused. So are ``NaN`` and the infinities, which Python's JSON reads
but JSON does not have, and strings with a lone surrogate (``"\\ud800"``), which no UTF-8 output
can print.
"""

from __future__ import annotations

import json

MAX_DEPTH = 16


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    number = float(text)
    if number - number != 0:  # inf - inf is nan, and nan is unequal to everything
        raise ValueError(f"{text} is not a number JSON allows")
    return number


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as e:
            raise ValueError(f"a string holds the lone surrogate {text[e.start]!r}") from None


def parse_json(text: str | bytes) -> object:
    """Like ``json.loads``; raises ``ValueError`` (``json.JSONDecodeError``,
    ``UnicodeDecodeError``) for anything that is not JSON nested at most ``MAX_DEPTH`` deep."""
    too_deep = f"nested more than {MAX_DEPTH} levels"
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError(too_deep) from None
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
            continue
        if isinstance(value, dict):
            children: list[object] = [*value.keys(), *value.values()]
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth == MAX_DEPTH:
            raise ValueError(too_deep)
        stack.extend((child, depth + 1) for child in children)
    return data
