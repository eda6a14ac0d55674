"""The fuzzing harness: each reader of outside input, fed what hypothesis makes up, raises only
the project's own errors (or returns).

Every ``tests/unit/test_fuzz_*.py`` declares its readers in ``READERS`` (name → ``Reader``), and
runs each with :func:`check` under the suite's example count, ``$OVERLAYROOT_FUZZ_EXAMPLES``
(default 100; a ``Reader`` that runs a program or writes a state filesystem per example takes a
tenth of it). ``bench/fuzz.py`` runs the same readers with as many examples as it is told.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DEFAULT_EXAMPLES = 100


@dataclass(frozen=True)
class Reader:
    """One reader under fuzzing: ``feed`` gets one drawn value and calls the reader on it,
    letting through only the errors in ``allowed``."""

    strategy: st.SearchStrategy[Any]
    feed: Callable[[Any], object]
    allowed: tuple[type[BaseException], ...]
    costly: bool = False  # runs a program or writes a tree per example


def examples(reader: Reader, total: int | None = None) -> int:
    if total is None:
        total = int(os.environ.get("OVERLAYROOT_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
    return max(1, total // 10) if reader.costly and total > 10 else total


def check(reader: Reader, max_examples: int, *, count: Callable[[], None] | None = None) -> None:
    """Run the property; the first input that raises anything outside ``allowed`` fails it,
    shrunk to a minimal example. ``count`` is called once per example run."""

    # Slow or large examples are the point here, not a problem of the strategy.
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(reader.strategy)
    def only_our_errors(value: Any) -> None:
        if count is not None:
            count()
        with contextlib.suppress(*reader.allowed):
            reader.feed(value)

    only_our_errors()
