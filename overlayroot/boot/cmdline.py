"""The kernel command line: split it as the kernel does, then read our options from it.

Pure functions, no I/O: ``parse_options(open("/proc/cmdline").read())`` is the whole use.
"""

from __future__ import annotations

from overlayroot.core.errors import BootError
from overlayroot.core.layout import check_id

ETC_MODES = ("persistent", "transient", "readonly")
ONFAIL_ACTIONS = ("reboot", "poweroff", "shell")
DEFAULT_TIMEOUT = 30.0
DEFAULT_TRIES = 3
DEFAULT_WATCHDOG = 300
MAX_WATCHDOG = 86400
MAX_TIMEOUT = 3600.0
MAX_TRIES = 100

PREFIX = "overlayroot."
KNOWN_KEYS = (
    "state",
    "deployment",
    "timeout",
    "etc",
    "debug",
    "onfail",
    "tries",
    "watchdog",
    "break",
    "kexec",
)
# Where ``overlayroot.break=`` can stop the standalone /init, in boot order, with what the
# shell's first line says. A bare ``overlayroot.break`` is the last: the assembled root, before
# the switch (dracut's ``rd.break``).
BREAK_STEPS = {
    "modules": "before loading the kernel modules",
    "device": "before waiting for the state device",
    "mount": "before mounting the state filesystem on /sysroot",
    "prepare": "before choosing, counting and assembling a deployment (the state filesystem is"
    " mounted read-write on /sysroot)",
    "switch": "before switching root (the deployment is assembled on /sysroot)",
}
DEFAULT_BREAK = "switch"
# What the stage leaves off the command line it hands a kernel it switches to: the choice of
# deployment (the kexec option names it), and what a bootloader adds for its own kernel.
NOT_CARRIED = (
    "overlayroot.deployment",
    "rd.overlayroot.deployment",
    "overlayroot.kexec",
    "rd.overlayroot.kexec",
    "BOOT_IMAGE",
    "initrd",
)
_WHITESPACE = " \t\n\v\f\r"


class CmdlineError(BootError):
    """A malformed ``overlayroot.*`` option."""


def split(cmdline: str) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Split like the kernel's ``next_arg()`` (kernel/params.c), quotes and all.

    Returns the ``(key, value)`` parameters (value ``None`` for a bare word) and the words after
    ``--``, which the kernel hands to init as its arguments (``key=value`` kept whole).
    """
    params: list[tuple[str, str | None]] = []
    args = cmdline
    while True:
        args = args.lstrip(_WHITESPACE)
        if not args:
            return params, []
        key, value, args = _next_arg(args)
        if key == "--" and value is None:
            init_args: list[str] = []
            while args := args.lstrip(_WHITESPACE):
                key, value, args = _next_arg(args)
                init_args.append(key if value is None else f"{key}={value}")
            return params, init_args
        params.append((key, value))


def _next_arg(args: str) -> tuple[str, str | None, str]:
    """One parameter off the front of ``args`` (no leading white space): key, value, rest."""
    quoted = args[0] == '"'
    if quoted:
        args = args[1:]
    in_quote = quoted
    equals = 0  # as in the kernel, an '=' at the very start does not split the word
    i = 0
    while i < len(args):
        c = args[i]
        if c in _WHITESPACE and not in_quote:
            break
        if equals == 0 and c == "=":
            equals = i
        if c == '"':
            in_quote = not in_quote
        i += 1
    word, rest = args[:i], args[i + 1 :]
    if equals == 0:
        if quoted and word.endswith('"'):
            word = word[:-1]
        return word, None, rest
    key, value = word[:equals], word[equals + 1 :]
    # The kernel drops one quote at the start of the value, and one closing quote at the end of
    # the word when the value or the whole word was quoted: never two.
    value_quoted = value.startswith('"')
    if value_quoted:
        value = value[1:]
    if (value_quoted or quoted) and value.endswith('"'):
        value = value[:-1]
    return key, value, rest


class Options:
    """What the command line asks of the boot stage."""

    __slots__ = (
        "breaks",
        "debug",
        "deployment",
        "enabled",
        "etc",
        "init",
        "init_args",
        "kexec",
        "onfail",
        "read_only",
        "rootflags",
        "rootfstype",
        "state",
        "timeout",
        "tries",
        "watchdog",
    )

    def __init__(self) -> None:
        self.enabled = True
        self.state: str | None = None
        self.deployment: str | None = None
        self.timeout = DEFAULT_TIMEOUT
        self.etc = "persistent"
        self.debug = False
        self.breaks: frozenset[str] = frozenset()  # BREAK_STEPS to stop at
        self.onfail = "reboot"
        self.tries = DEFAULT_TRIES
        self.watchdog = DEFAULT_WATCHDOG  # seconds a trial boot has to be blessed; 0: off
        self.kexec: str | None = None  # the deployment a stage kexec'd this kernel for
        self.init: str | None = None
        self.init_args: list[str] = []
        self.read_only: bool | None = None
        self.rootflags: str | None = None
        self.rootfstype: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in sorted(self.__slots__)}

    def __repr__(self) -> str:
        return f"Options({self.to_dict()!r})"


def parse_options(cmdline: str) -> tuple[Options, list[str]]:
    """Read our options; returns them and warnings for the console.

    The last occurrence of a key wins, as everywhere on the kernel command line.
    ``rd.overlayroot.*`` is the same as ``overlayroot.*``. An unknown ``overlayroot.*`` key is
    a warning; a known key with a bad value is a :class:`CmdlineError`, because booting
    something other than what was asked for is worse than stopping with a clear message.
    """
    params, init_args = split(cmdline)
    opts = Options()
    opts.init_args = init_args
    warnings: list[str] = []
    root: str | None = None
    for key, value in params:
        if key == "root":
            root = value
        elif key == "init":
            opts.init = value or None
        elif key == "ro" and value is None:
            opts.read_only = True
        elif key == "rw" and value is None:
            opts.read_only = False
        elif key == "rootflags":
            opts.rootflags = value
        elif key == "rootfstype":
            opts.rootfstype = value
        elif key in ("overlayroot", "rd.overlayroot"):
            opts.enabled = _parse_switch(key, value)
        else:
            name = key[3:] if key.startswith("rd.") else key
            if name.startswith(PREFIX):
                _apply(opts, name[len(PREFIX) :], key, value, warnings)
    if opts.state is None:
        opts.state = root or None
    return opts, warnings


def kexec_cmdline(cmdline: str, kargs: list[str], deployment_id: str) -> str:
    """The command line for the kernel the stage switches to for ``deployment_id``: this one
    without :data:`NOT_CARRIED`, then the deployment's own arguments ``kargs`` (the last of a
    key wins, so they override), then ``overlayroot.kexec=<id>``, which tells the stage there
    that the try is taken and that it must not switch kernels again; the words after ``--``
    (init's arguments) stay last. A parameter whose quotes the kernel's parser cannot give
    back (a lone ``"`` in it) is left off: written again, it would swallow what follows."""
    params, init_args = split(cmdline)
    words = [
        word
        for key, value in params
        if key and key not in NOT_CARRIED and (word := _carry(key, value)) is not None
    ]
    words += [karg for karg in kargs if karg.strip(_WHITESPACE)]
    words.append(f"{PREFIX}kexec={check_id(deployment_id)}")
    carried = [word for arg in init_args if (word := _carry_init_arg(arg)) is not None]
    if carried:
        words += ["--", *carried]
    return " ".join(words)


def _quote(text: str) -> str:
    return f'"{text}"' if any(c in text for c in _WHITESPACE) else text


def _carry(key: str, value: str | None) -> str | None:
    """``key`` and ``value`` as one word that the kernel reads back as exactly them, whatever
    follows it; None if there is no such word."""
    word = _quote(key) if value is None else f"{key}={_quote(value)}"
    return word if split(f"{word} x") == ([(key, value), ("x", None)], []) else None


def _carry_init_arg(arg: str) -> str | None:
    """One of init's arguments as a word the kernel gives init back as is; None if none."""
    word = _quote(arg)
    return word if split(f"-- {word} x") == ([], [arg, "x"]) else None


def onfail_from(cmdline: str) -> str:
    """``overlayroot.onfail=`` alone, for when the rest of the command line does not parse:
    what to do about a malformed option is still what the user asked for."""
    action = "reboot"
    for key, value in split(cmdline)[0]:
        name = key[3:] if key.startswith("rd.") else key
        if name == PREFIX + "onfail" and value in ONFAIL_ACTIONS:
            action = value
    return action


def _apply(opts: Options, name: str, key: str, value: str | None, warnings: list[str]) -> None:
    if name == "state":
        opts.state = _required(key, value)
    elif name == "deployment":
        wanted = _required(key, value)
        if wanted == "auto":
            opts.deployment = None
        else:
            try:
                opts.deployment = check_id(wanted)
            except BootError as e:
                raise CmdlineError(f"{key}: {e}") from None
    elif name == "kexec":
        named = _required(key, value)
        try:
            opts.kexec = check_id(named)
        except BootError as e:
            raise CmdlineError(f"{key}: {e}") from None
    elif name == "timeout":
        opts.timeout = _number(key, value, 0.0, MAX_TIMEOUT)
    elif name == "tries":
        opts.tries = int(_number(key, value, 1, MAX_TRIES, integer=True))
    elif name == "watchdog":
        opts.watchdog = int(_number(key, value, 0, MAX_WATCHDOG, integer=True))
    elif name == "etc":
        opts.etc = _choice(key, value, ETC_MODES)
    elif name == "onfail":
        opts.onfail = _choice(key, value, ONFAIL_ACTIONS)
    elif name == "debug":
        opts.debug = True if value is None else _parse_switch(key, value)
    elif name == "break":
        opts.breaks, bad = _breaks(value)
        if bad:
            # A warning, not an error: a typo in a request to stop must not stop the boot.
            warnings.append(
                f"ignoring {key}={value}: {', '.join(repr(b) for b in bad)}"
                f" {'is not a step' if len(bad) == 1 else 'are not steps'} the boot can stop"
                f" before (steps: {', '.join(BREAK_STEPS)}; several: {key}=mount,switch;"
                f" a bare {key} stops before the switch)"
            )
    else:
        known = ", ".join(PREFIX + k for k in KNOWN_KEYS)
        warnings.append(f"ignoring unknown option {key!r} (known: {known})")


def _breaks(value: str | None) -> tuple[frozenset[str], list[str]]:
    """The steps ``overlayroot.break[=a,b]`` names, and the words that are not steps (then
    the option is ignored whole)."""
    if value is None:
        return frozenset({DEFAULT_BREAK}), []
    words = value.split(",")
    bad = [w for w in words if w not in BREAK_STEPS]
    return (frozenset() if bad else frozenset(words)), bad


def _required(key: str, value: str | None) -> str:
    if not value:
        raise CmdlineError(f"{key} needs a value, as in {key}=VALUE")
    return value


def _choice(key: str, value: str | None, choices: tuple[str, ...]) -> str:
    value = _required(key, value)
    if value not in choices:
        raise CmdlineError(f"{key}={value} is not one of: {', '.join(choices)}")
    return value


def _number(
    key: str, value: str | None, low: float, high: float, *, integer: bool = False
) -> float:
    text = _required(key, value)
    if not (_digits(text) if integer else _decimal(text)):
        kind = (
            "a whole number (ASCII digits only)"
            if integer
            else "a number of seconds (ASCII digits, with one '.' at most, as in 2.5)"
        )
        raise CmdlineError(f"{key}={text} is not {kind}")
    try:
        number = int(text) if integer else float(text)
    except ValueError:  # more digits than int() converts
        number = high + 1
    if not low <= number <= high:
        raise CmdlineError(f"{key}={text} is out of range ({low:g} to {high:g})")
    return number


def _digits(text: str) -> bool:
    """One or more ASCII digits and nothing else: Python's int() and float() also take "٣",
    "1_0", " 3", "+3", "1e3" and "inf"."""
    return text.isascii() and text.isdigit()


def _decimal(text: str) -> bool:
    """ASCII digits with at most one '.' between digits, as in 2.5."""
    whole, dot, fraction = text.partition(".")
    return _digits(whole) and (not dot or _digits(fraction))


_TRUE = ("1", "on", "yes", "true", "enable", "enabled")
_FALSE = ("0", "off", "no", "false", "disable", "disabled")


def _parse_switch(key: str, value: str | None) -> bool:
    if value is None or value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise CmdlineError(f"{key}={value} is not on or off")
