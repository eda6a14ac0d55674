"""The kernel command line, fuzzed: whatever it holds, reading it raises only CmdlineError."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

from overlayroot.boot.cmdline import (
    KNOWN_KEYS,
    CmdlineError,
    kexec_cmdline,
    onfail_from,
    parse_options,
    split,
)
from overlayroot.boot.devices import parse_spec
from overlayroot.core.errors import BootError
from tests import fuzzing

# Values that look like numbers to Python but are not ASCII numbers, and the like.
TRICKY = st.sampled_from(
    [
        "",
        "0",
        "1",
        "3",
        "٣",
        "1_0",
        "١٠",
        "²",
        " 3",
        "3 ",
        "+3",
        "-1",
        "0x10",
        "1e3",
        "inf",
        "nan",
        "-inf",
        "2.5",
        ".5",
        "5.",
        "1_0.5",
        "٣.٥",
        "9" * 5000,
        "1" * 400 + ".5",
        '"3"',
        "auto",
        "on",
        "OFF",
        "yes",
        "v1",
        "v1\n",
        "LABEL=x y",
        "persistent",
        "shell",
        "Ⅲ",
        "𝟑",
    ]
)
KEYS = st.sampled_from(
    [f"{prefix}overlayroot.{key}" for key in KNOWN_KEYS for prefix in ("", "rd.")]
    + [
        "overlayroot",
        "rd.overlayroot",
        "root",
        "init",
        "ro",
        "rw",
        "rootflags",
        "rootfstype",
        "overlayroot.bogus",
        "--",
    ]
)
VALUES = st.one_of(TRICKY, st.text(max_size=20), st.none())
PARAMETER = st.tuples(KEYS, VALUES, st.booleans()).map(
    lambda p: p[0] if p[1] is None else (f'{p[0]}="{p[1]}"' if p[2] else f"{p[0]}={p[1]}")
)
# Parameters the reader knows, with tricky values, glued by any white space or junk.
CMDLINE = st.one_of(
    st.text(),
    st.lists(st.one_of(PARAMETER, st.text(max_size=8)), max_size=12).flatmap(
        lambda words: st.lists(
            st.sampled_from([" ", "\t", "\n", '"', "=", "  "]),
            min_size=len(words),
            max_size=len(words),
        ).map(lambda seps: "".join(w + s for w, s in zip(words, seps, strict=True)))
    ),
)

# overlayroot.state= and root=: what the device finder reads of them.
SPECS = st.one_of(
    st.text(),
    st.tuples(
        st.sampled_from(
            [
                "LABEL=",
                "uuid=",
                "PARTUUID=",
                "PartLabel=",
                "/dev/",
                "=",
                "/dev/disk/by-label/",
                "/dev/disk/by-uuid/",
                "/dev/disk/x/",
            ]
        ),
        st.text(max_size=12),
        st.sampled_from(["", "\\x20", "\\x", "\\xzz", "/"]),
    ).map("".join),
)

READERS = {
    "cmdline.split": fuzzing.Reader(CMDLINE, split, ()),
    "cmdline.parse_options": fuzzing.Reader(CMDLINE, parse_options, (CmdlineError,)),
    "cmdline.onfail_from": fuzzing.Reader(CMDLINE, onfail_from, ()),
    # The switched kernel's command line is made from this one: never an error, whatever it is.
    "cmdline.kexec_cmdline": fuzzing.Reader(
        CMDLINE, lambda text: kexec_cmdline(text, ["quiet"], "v1"), ()
    ),
    "devices.parse_spec": fuzzing.Reader(SPECS, parse_spec, (BootError,)),
}


@pytest.mark.parametrize("name", READERS)
def test_reading_the_command_line_raises_only_cmdline_errors(name: str) -> None:
    reader = READERS[name]
    fuzzing.check(reader, fuzzing.examples(reader))


@pytest.mark.parametrize("value", ["٣", "1_0", "١٠", "²", "𝟑", "+3", " 3", "0x3", "3.0"])
@pytest.mark.parametrize("key", ["overlayroot.tries", "overlayroot.watchdog"])
def test_counts_take_only_ascii_digits(key: str, value: str) -> None:
    with pytest.raises(CmdlineError, match=r"is not a whole number \(ASCII digits"):
        parse_options(f'{key}="{value}"')


@pytest.mark.parametrize(
    "value", ["1_0", "٣", "٣.٥", "inf", "nan", "1e3", "+2", "-1", ".5", "5.", " 2"]
)
def test_the_timeout_takes_only_an_ascii_decimal(value: str) -> None:
    with pytest.raises(CmdlineError, match=r"is not a number of seconds \(ASCII digits"):
        parse_options(f'overlayroot.timeout="{value}"')


def test_ascii_numbers_are_still_read() -> None:
    opts, _ = parse_options("overlayroot.tries=007 overlayroot.watchdog=0 overlayroot.timeout=2.5")
    assert (opts.tries, opts.watchdog, opts.timeout) == (7, 0, 2.5)


def test_a_number_too_long_to_convert_is_out_of_range() -> None:
    with pytest.raises(CmdlineError, match="is out of range"):
        parse_options("overlayroot.tries=" + "9" * 5000)
