"""The command line parser against a literal port of the kernel's next_arg(), and our options."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlayroot.boot import cmdline
from overlayroot.boot.cmdline import (
    BREAK_STEPS,
    NOT_CARRIED,
    CmdlineError,
    kexec_cmdline,
    onfail_from,
    parse_options,
    split,
)
from overlayroot.core.errors import BootError


def kernel_parse(cmdline: str) -> tuple[list[tuple[str, str | None]], list[str]]:
    """kernel/params.c next_arg() and parse_args(), ported line by line on a NUL-terminated
    character array, as the oracle for :func:`split`."""
    buf = [*cmdline, "\0"]

    def isspace(c: str) -> bool:
        return c in " \t\n\v\f\r"

    def cstr(start: int) -> str:
        end = buf.index("\0", start)
        return "".join(buf[start:end])

    def skip_spaces(p: int) -> int:
        while isspace(buf[p]):
            p += 1
        return p

    def next_arg(args: int) -> tuple[int, int | None, int]:
        equals = 0
        in_quote = quoted = False
        if buf[args] == '"':
            args += 1
            in_quote = quoted = True
        i = 0
        while buf[args + i] != "\0":
            if isspace(buf[args + i]) and not in_quote:
                break
            if equals == 0 and buf[args + i] == "=":
                equals = i
            if buf[args + i] == '"':
                in_quote = not in_quote
            i += 1
        param = args
        val: int | None
        if not equals:
            val = None
        else:
            buf[args + equals] = "\0"
            val = args + equals + 1
            if buf[val] == '"':
                val += 1
                if buf[args + i - 1] == '"':
                    buf[args + i - 1] = "\0"
        if quoted and i > 0 and buf[args + i - 1] == '"':
            buf[args + i - 1] = "\0"
        if buf[args + i] != "\0":
            buf[args + i] = "\0"
            args += i + 1
        else:
            args += i
        return param, val, skip_spaces(args)

    params: list[tuple[str, str | None]] = []
    args = skip_spaces(0)
    while buf[args] != "\0":
        param, val, args = next_arg(args)
        if val is None and cstr(param) == "--":
            rest: list[str] = []
            while buf[args] != "\0":
                param, val, args = next_arg(args)
                rest.append(cstr(param) if val is None else f"{cstr(param)}={cstr(val)}")
            return params, rest
        params.append((cstr(param), None if val is None else cstr(val)))
    return params, []


words = st.text(alphabet='ab=" \t-.', max_size=30)


@settings(max_examples=2000)
@given(words)
def test_split_matches_the_kernel_on_any_input(cmdline: str) -> None:
    assert split(cmdline) == kernel_parse(cmdline)


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        ('a="b c" d', ([("a", "b c"), ("d", None)], [])),
        ('"a=b c" d', ([("a", "b c"), ("d", None)], [])),
        ("  ro  root=LABEL=x\n", ([("ro", None), ("root", "LABEL=x")], [])),
        ('init=/bin/sh -- "x y" -s', ([("init", "/bin/sh")], ["x y", "-s"])),
        ('a="b"c', ([("a", 'b"c')], [])),
    ],
)
def test_split_examples(cmdline: str, expected: object) -> None:
    assert split(cmdline) == expected
    assert kernel_parse(cmdline) == expected


def test_defaults_take_the_state_from_root() -> None:
    opts, warnings = parse_options("BOOT_IMAGE=/vmlinuz root=LABEL=state ro quiet")
    assert opts.state == "LABEL=state"
    assert opts.deployment is None
    assert opts.etc == "persistent"
    assert opts.timeout == 30.0
    assert opts.read_only is True
    assert opts.onfail == "reboot"
    assert warnings == []


def test_overlayroot_state_wins_over_root_in_any_order() -> None:
    opts, _ = parse_options("overlayroot.state=UUID=1234 root=/dev/vda")
    assert opts.state == "UUID=1234"


def test_rd_prefix_and_last_occurrence_wins() -> None:
    opts, _ = parse_options(
        "rd.overlayroot.deployment=a overlayroot.deployment=b rd.overlayroot.etc=transient"
    )
    assert opts.deployment == "b"
    assert opts.etc == "transient"


def test_all_options() -> None:
    opts, warnings = parse_options(
        'overlayroot.state="PARTLABEL=my state" overlayroot.deployment=v2 overlayroot.timeout=2.5'
        " overlayroot.etc=readonly overlayroot.debug overlayroot.onfail=poweroff"
        " overlayroot.tries=5 init=/sbin/init2 rw rootflags=noatime rootfstype=ext4 -- single"
    )
    assert warnings == []
    assert (opts.state, opts.deployment, opts.timeout) == ("PARTLABEL=my state", "v2", 2.5)
    assert (opts.etc, opts.debug, opts.onfail, opts.tries) == ("readonly", True, "poweroff", 5)
    assert (opts.init, opts.read_only, opts.init_args) == ("/sbin/init2", False, ["single"])
    assert (opts.rootflags, opts.rootfstype) == ("noatime", "ext4")


def test_deployment_auto_means_the_default() -> None:
    opts, _ = parse_options("overlayroot.deployment=x overlayroot.deployment=auto")
    assert opts.deployment is None


def test_overlayroot_off() -> None:
    assert parse_options("overlayroot=off")[0].enabled is False
    assert parse_options("rd.overlayroot=0")[0].enabled is False
    assert parse_options("")[0].enabled is True


def test_unknown_keys_warn_and_do_not_stop_the_boot() -> None:
    opts, warnings = parse_options("overlayroot.colour=blue rd.overlayroot.x overlay.foo=1")
    assert len(warnings) == 2
    assert "overlayroot.colour" in warnings[0]
    assert "overlayroot.state" in warnings[0]  # the message lists the known keys
    assert opts.state is None


@pytest.mark.parametrize(
    ("cmdline", "message"),
    [
        ("overlayroot.timeout=abc", "overlayroot.timeout=abc is not a number of seconds"),
        ("overlayroot.timeout=-1", "overlayroot.timeout=-1 is not a number of seconds"),
        ("overlayroot.timeout=nan", "overlayroot.timeout=nan is not a number of seconds"),
        ("overlayroot.timeout=4000", "overlayroot.timeout=4000 is out of range"),
        ("overlayroot.tries=0", "overlayroot.tries=0 is out of range"),
        ("overlayroot.tries=2.5", "overlayroot.tries=2.5 is not a whole number"),
        ("overlayroot.etc=rw", "overlayroot.etc=rw is not one of: persistent, transient, readonly"),
        ("rd.overlayroot.onfail=halt", "rd.overlayroot.onfail=halt is not one of"),
        ("overlayroot.state=", "overlayroot.state needs a value"),
        ("overlayroot.state", "overlayroot.state needs a value"),
        ("overlayroot.deployment=../x", "overlayroot.deployment: invalid deployment id '../x'"),
        ("overlayroot.debug=maybe", "overlayroot.debug=maybe is not on or off"),
        ("overlayroot=perhaps", "overlayroot=perhaps is not on or off"),
    ],
)
def test_malformed_values_are_clear_errors(cmdline: str, message: str) -> None:
    with pytest.raises(CmdlineError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
        parse_options(cmdline)


@given(
    st.lists(
        st.sampled_from(
            [
                "ro",
                "rw",
                "root=/dev/vda",
                "overlayroot.etc=transient",
                "overlayroot.unknown=1",
                "overlayroot.timeout=5",
                "rd.overlayroot.state=LABEL=x",
                "quiet",
                "init=/x",
                "--",
                "a=b",
            ]
        )
    )
)
def test_valid_words_never_raise(words: list[str]) -> None:
    opts, _ = parse_options(" ".join(words))
    assert opts.etc in ("persistent", "transient")


def test_onfail_is_read_even_when_another_option_is_malformed() -> None:
    cmdline = "overlayroot.etc=bad rd.overlayroot.onfail=poweroff overlayroot.onfail=nonsense"
    with pytest.raises(CmdlineError):
        parse_options(cmdline)
    assert onfail_from(cmdline) == "poweroff"
    assert onfail_from("quiet") == "reboot"


# What a number option takes, as the regular expressions the stage no longer imports re for.
WHOLE = re.compile(r"[0-9]+")
DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


@given(st.text(alphabet=st.sampled_from("0123456789.٣²+-_ e\n") | st.characters(), max_size=8))
def test_a_number_option_takes_exactly_ascii_digits(text: str) -> None:
    assert cmdline._digits(text) == bool(WHOLE.fullmatch(text))
    assert cmdline._decimal(text) == bool(DECIMAL.fullmatch(text))


@pytest.mark.parametrize("text", ["٣", "1_0", " 3", "+3", "1e3", "inf", "²", "1.", ".5", "1.2.3"])
def test_what_int_and_float_take_but_the_options_do_not(text: str) -> None:
    for key in ("tries", "timeout"):
        with pytest.raises(CmdlineError, match="is not a"):
            parse_options(f'overlayroot.{key}="{text}"')


def test_break_names_the_steps_to_stop_before() -> None:
    assert parse_options("quiet")[0].breaks == frozenset()
    assert parse_options("overlayroot.break")[0].breaks == {"switch"}
    opts, warnings = parse_options("rd.overlayroot.break=mount,prepare")
    assert opts.breaks == {"mount", "prepare"} and warnings == []
    assert list(BREAK_STEPS) == ["modules", "device", "mount", "prepare", "switch"]


@pytest.mark.parametrize(
    ("option", "bad"),
    [
        ("overlayroot.break=pre-pivot", "'pre-pivot' is not a step"),
        ("overlayroot.break=mount,nope,later", "'nope', 'later' are not steps"),
        ("overlayroot.break=", "'' is not a step"),
    ],
)
def test_a_break_that_names_no_step_is_a_warning_and_stops_nowhere(option: str, bad: str) -> None:
    opts, warnings = parse_options(f"root=LABEL=s {option}")
    assert opts.breaks == frozenset()
    assert opts.state == "LABEL=s"  # the rest of the command line still counts
    assert warnings == [
        f"ignoring {option}: {bad} the boot can stop before (steps: modules, device, mount,"
        " prepare, switch; several: overlayroot.break=mount,switch; a bare overlayroot.break"
        " stops before the switch)"
    ]


def test_the_kexec_option_names_a_deployment() -> None:
    assert parse_options("overlayroot.kexec=v2")[0].kexec == "v2"
    assert parse_options("rd.overlayroot.kexec=v3 quiet")[0].kexec == "v3"
    assert parse_options("quiet")[0].kexec is None


@pytest.mark.parametrize(
    ("cmdline", "message"),
    [
        ("overlayroot.kexec=", "overlayroot.kexec needs a value, as in overlayroot.kexec=VALUE"),
        ("overlayroot.kexec=../v2", "overlayroot.kexec: invalid deployment id '../v2'"),
    ],
)
def test_a_malformed_kexec_option_is_a_clear_error(cmdline: str, message: str) -> None:
    with pytest.raises(CmdlineError) as raised:
        parse_options(cmdline)
    assert str(raised.value).startswith(message)


def test_a_switched_kernel_gets_this_command_line_less_ours_plus_its_arguments() -> None:
    cmdline = (
        "BOOT_IMAGE=/boot/vmlinuz initrd=/initrd.img console=ttyS0 root=LABEL=state"
        " overlayroot.deployment=v1 rd.overlayroot.kexec=v0 overlayroot.tries=2"
        ' note="two words" ro panic=10 -- single x=1\n'
    )
    out = kexec_cmdline(cmdline, ["quiet", "panic=30"], "v2")
    assert out == (
        'console=ttyS0 root=LABEL=state overlayroot.tries=2 note="two words" ro'
        " panic=10 quiet panic=30 overlayroot.kexec=v2 -- single x=1"
    )
    opts, warnings = parse_options(out)
    assert (opts.kexec, opts.deployment, opts.tries, warnings) == ("v2", None, 2, [])
    assert opts.init_args == ["single", "x=1"]


def test_a_parameter_the_kernel_could_not_read_back_is_left_off() -> None:
    # A lone quote would swallow everything written after it, our option included.
    assert split('a=1 x"y')[0] == [("a", "1"), ('x"y', None)]
    out = kexec_cmdline('a=1 x"y', [], "v2")
    assert out == "a=1 overlayroot.kexec=v2"
    # An unclosed quote at the very end is read to the end, and written back closed.
    assert kexec_cmdline('b="x y', [], "v2") == 'b="x y" overlayroot.kexec=v2'
    assert parse_options(out)[0].kexec == "v2"


def test_the_switched_kernels_deployment_must_be_a_valid_id() -> None:
    with pytest.raises(BootError, match=r"invalid deployment id '\.\./etc'"):
        kexec_cmdline("quiet", [], "../etc")


@settings(max_examples=2000)
@given(words, st.lists(st.sampled_from(["quiet", "panic=5", "a=b"]), max_size=3))
def test_a_switched_kernel_keeps_every_parameter_it_can_read_back(
    cmdline: str, kargs: list[str]
) -> None:
    params, init_args = split(cmdline)
    out_params, out_init = split(kexec_cmdline(cmdline, kargs, "v2"))
    ours = [split(k)[0][0] for k in kargs] + [("overlayroot.kexec", "v2")]
    assert out_params[len(out_params) - len(ours) :] == ours
    kept = out_params[: len(out_params) - len(ours)]
    carried = [p for p in params if p[0] and p[0] not in NOT_CARRIED]
    remaining = iter(carried)
    assert all(any(k == c for c in remaining) for k in kept)  # a subsequence, in order
    remaining_args = iter(init_args)
    assert all(any(a == b for b in remaining_args) for a in out_init)
    if '"' not in cmdline:  # nothing the kernel could not read back: everything is kept
        assert (kept, out_init) == (carried, init_args)
