"""Fuzzing figures for issue 7: every reader of outside input, with many examples.

What it runs
    The readers that ``tests/unit/test_fuzz_*.py`` declare (their ``READERS``: the kernel
    command line, boot.json, the history, manifests and ids, superblocks and GPT, deploy's
    ``--created``, source magic and tar sources, the builder's cpio reader, module ELF headers
    and ``SOURCE_DATE_EPOCH``), each with the property of the test suite: fed whatever
    hypothesis draws from the reader's strategies, it returns or raises one of the project's
    own errors, never anything else. The suite runs them with ``$OVERLAYROOT_FUZZ_EXAMPLES``
    (default 100); this runs them with as many as asked.

How
    Each reader gets ``--examples`` examples (``--costly`` for the readers that run tar or
    write a state filesystem per example: a tenth by default). Hypothesis stops early only when
    it has drawn every distinct input a strategy can make. On a failure it shrinks the input
    and the report gives the exception and the shrunk input.

    .venv/bin/python -m bench.fuzz [--examples 20000] [--costly N] [--reader NAME]... [--json]

The table goes to stdout (a JSON object with --json), hypothesis' own output to stderr. Exit
status 1 when a reader failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests import fuzzing

TESTS = Path(__file__).resolve().parent.parent / "tests" / "unit"


@dataclass
class Outcome:
    reader: str
    examples: int
    seconds: float
    failure: str | None


def all_readers() -> dict[str, fuzzing.Reader]:
    readers: dict[str, fuzzing.Reader] = {}
    for path in sorted(TESTS.glob("test_fuzz_*.py")):
        module = importlib.import_module(f"tests.unit.{path.stem}")
        readers.update(module.READERS)
    return readers


def run(name: str, reader: fuzzing.Reader, examples: int) -> Outcome:
    count = 0

    def counted() -> None:
        nonlocal count
        count += 1

    start = time.monotonic()
    failure = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            fuzzing.check(reader, examples, count=counted)
    except Exception as e:
        notes = "\n".join(getattr(e, "__notes__", []))
        failure = f"{type(e).__name__}: {e}\n{notes}".strip()
    return Outcome(name, count, round(time.monotonic() - start, 1), failure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz",
        description="Run every reader of outside input under hypothesis with many examples and"
        " report how many ran and what failed.",
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=20000,
        metavar="N",
        help="examples per reader (default 20000)",
    )
    parser.add_argument(
        "--costly",
        type=int,
        metavar="N",
        help="examples per reader that runs tar or writes a state filesystem per"
        " example (default: a tenth of --examples)",
    )
    parser.add_argument(
        "--reader",
        action="append",
        metavar="NAME",
        help="only this reader (repeatable; default: all)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    readers = all_readers()
    unknown = set(args.reader or ()) - set(readers)
    if unknown:
        parser.error(f"no reader {', '.join(sorted(unknown))}; readers: {', '.join(readers)}")
    costly = args.costly if args.costly is not None else max(1, args.examples // 10)
    outcomes = []
    for name, reader in readers.items():
        if args.reader and name not in args.reader:
            continue
        outcome = run(name, reader, costly if reader.costly else args.examples)
        outcomes.append(outcome)
        print(
            f"{name}: {outcome.examples} examples in {outcome.seconds} s,"
            f" {'FAILED' if outcome.failure else 'ok'}",
            file=sys.stderr,
        )
    if args.json:
        print(
            json.dumps(
                {
                    "examples": args.examples,
                    "costly": costly,
                    "readers": [asdict(o) for o in outcomes],
                },
                indent=2,
            )
        )
    else:
        width = max(len(o.reader) for o in outcomes)
        print(f"{'READER':<{width}}  EXAMPLES  SECONDS  RESULT")
        for o in outcomes:
            result = "only the project's errors" if o.failure is None else "FAILED"
            print(f"{o.reader:<{width}}  {o.examples:>8}  {o.seconds:>7}  {result}")
        for o in outcomes:
            if o.failure:
                print(f"\n{o.reader}: {o.failure}")
    return 1 if any(o.failure for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
