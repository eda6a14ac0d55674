"""JSON for the state filesystem: read so that damage is a ``ValueError`` like any other, and
written byte for byte as ``json.dumps(value, indent=…, sort_keys=True)`` writes it.

Both go straight to the interpreter's C accelerator ``_json`` (built in): the ``json`` package
imports ``re``, and through it ``enum``, ``functools``, ``collections`` and more, which the boot
stage would otherwise load only for this (docs/internals.md, "The stage's imports").

``json.loads`` recurses once per level of nesting: 100,000 ``[`` raise ``RecursionError``, and a
structure just under the interpreter's limit parses, but a later ``repr``, ``str`` or
``json.dumps`` of it deeper in the stack can raise it. Nothing overlayroot writes nests more than
three levels, so deeper is refused. So are ``NaN`` and the infinities, which Python's JSON reads
but JSON does not have, and strings with a lone surrogate (``"\\ud800"``), which no UTF-8 output
can print.
"""

from __future__ import annotations

import _json

MAX_DEPTH = 16
_WHITESPACE = " \t\n\r"  # what JSON allows between tokens


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    number = float(text)
    if number - number != 0:  # inf - inf is nan, and nan is unequal to everything
        raise ValueError(f"{text} is not a number JSON allows")
    return number


class _Options:
    """What ``_json.make_scanner`` reads off a ``json.JSONDecoder``."""

    strict = True  # no raw control characters in strings
    object_hook = None
    object_pairs_hook = None
    parse_float = staticmethod(_finite)
    parse_int = int
    parse_constant = staticmethod(_no_constant)


# typeshed asks for a make_scanner; any object with these attributes does (json.JSONDecoder
# passes itself).
_scan = _json.make_scanner(_Options())  # type: ignore[arg-type]


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as e:
            raise ValueError(f"a string holds the lone surrogate {text[e.start]!r}") from None


def parse_json(text: str | bytes) -> object:
    """Like ``json.loads`` (bytes are UTF-8); raises ``ValueError`` (``UnicodeDecodeError``
    among them) for anything that is not JSON nested at most ``MAX_DEPTH`` deep."""
    if isinstance(text, bytes):
        text = text.decode()
    too_deep = f"nested more than {MAX_DEPTH} levels"
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        data, end = _scan(text, start)
    except RecursionError:
        raise ValueError(too_deep) from None
    except (StopIteration, SystemError):
        # StopIteration: no value where one must start. Python 3.11's _json raises a
        # json.decoder.JSONDecodeError for the other mistakes only when the json package was
        # imported (the commands), and a SystemError when it was not (the boot stage).
        raise _syntax_error(text) from None
    if text[end:].strip(_WHITESPACE):
        raise _syntax_error(text)  # more after the value
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


def _syntax_error(text: str) -> ValueError:
    """The ``json`` package's own description of the mistake where it can be imported (it is
    not frozen into the boot stage, which says less)."""
    try:
        import json
    except ImportError:
        return ValueError("not JSON")  # the boot stage: the json package is not frozen
    try:
        json.loads(text)
    except ValueError as e:
        return e
    return ValueError("not JSON")  # unreachable unless the two parsers disagree


def format_json(value: object, indent: int | None = None) -> str:
    """``json.dumps(value, indent=indent, sort_keys=True)``, byte for byte, for what JSON holds:
    dicts with ``str`` keys, lists and tuples, ``str``, ``int``, finite ``float``, ``bool`` and
    ``None``; anything else is a ``TypeError``, ``NaN`` and the infinities a ``ValueError``."""
    out: list[str] = []
    _format(value, out, None if indent is None else " " * indent, "")
    return "".join(out)


def _format(value: object, out: list[str], step: str | None, margin: str) -> None:
    if isinstance(value, str):
        out.append(_json.encode_basestring_ascii(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        if value - value != 0:
            raise ValueError(f"{value!r} is not a number JSON allows")
        out.append(float.__repr__(value))
    elif isinstance(value, (list, tuple, dict)):
        if not value:
            out.append("{}" if isinstance(value, dict) else "[]")
            return
        inner = margin if step is None else margin + step
        # json.dumps: ", " between items without indent, "," and a new line with one.
        separator = ", " if step is None else ",\n" + inner
        opening, closing = ("{", "}") if isinstance(value, dict) else ("[", "]")
        out.append(opening if step is None else opening + "\n" + inner)
        if isinstance(value, dict):
            for i, (key, item) in enumerate(sorted(value.items())):
                if not isinstance(key, str):
                    raise TypeError(f"keys must be str, not {type(key).__name__}")
                if i:
                    out.append(separator)
                out.append(_json.encode_basestring_ascii(key))
                out.append(": ")
                _format(item, out, step, inner)
        else:
            for i, item in enumerate(value):
                if i:
                    out.append(separator)
                _format(item, out, step, inner)
        out.append(closing if step is None else "\n" + margin + closing)
    else:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
