"""Boot state and the policy that reads it: pure functions, no I/O.

Per deployment, in the proven ChromeOS/Android A/B form: ``priority``, ``tries_left``,
``successful``; plus ``bad`` (why it was marked bad), ``pinned`` (kept by ``gc``) and
``verified`` (its image passed the digest check, recorded only after the check). A
``generation`` numbers every write of the whole state, and ``once`` names a deployment to boot
next time only.

The rules:

- the bootable deployments are those that are successful or have tries left
  (``tries_left is None`` means "not tried yet": it gets ``overlayroot.tries=`` at its first boot);
- the default is the bootable deployment with the highest priority (ties: the larger id);
  the rollback is the next one;
- a trial boot (of a deployment not yet successful) takes one try *before* the root is handed
  over; a deployment whose tries are used up is no longer bootable, and the next one boots;
- a deployment that fails to mount, to verify or to find its init is marked bad at once and the
  next candidate boots in the same boot;
- ``bless`` marks the booted deployment successful; a successful deployment boots without
  counting;
- a deployment that carries a kernel other than the running one is switched to with kexec
  once its try is taken (:func:`kernel_step`); the stage in that kernel boots exactly that
  deployment without taking a second try, and never switches kernels again;
- when nothing is bootable, the *last resort* boots the deployment that last reached its init
  (then the others), uncounted and in a degraded mode, rather than reboot forever.

Every function returns a new state; none modifies its argument.
"""

from __future__ import annotations

import binascii

from overlayroot.core.safejson import format_json, parse_json

FORMAT = 1


class StateError(ValueError):
    """A state file that cannot be read: torn, truncated, garbage or from the future."""


class Entry:
    __slots__ = ("bad", "pinned", "priority", "successful", "tries_left", "verified")

    def __init__(
        self,
        priority: int = 0,
        tries_left: int | None = None,
        successful: bool = False,
        bad: str | None = None,
        pinned: bool = False,
        verified: bool = False,
    ) -> None:
        self.priority = priority
        self.tries_left = tries_left
        self.successful = successful
        self.bad = bad
        self.pinned = pinned
        self.verified = verified

    def replace(self, **changes: object) -> Entry:
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return Entry(**values)

    @property
    def bootable(self) -> bool:
        return self.successful or self.tries_left is None or self.tries_left > 0

    def to_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Entry) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().values()))

    def __repr__(self) -> str:
        return f"Entry({self.to_dict()!r})"


class BootState:
    __slots__ = ("entries", "generation", "once")

    def __init__(
        self,
        entries: dict[str, Entry] | None = None,
        generation: int = 0,
        once: str | None = None,
    ) -> None:
        self.entries = dict(entries or {})
        self.generation = generation
        self.once = once

    def with_entry(self, deployment_id: str, entry: Entry) -> BootState:
        return BootState({**self.entries, deployment_id: entry}, self.generation, self.once)

    def without(self, deployment_id: str) -> BootState:
        entries = {k: v for k, v in self.entries.items() if k != deployment_id}
        once = None if self.once == deployment_id else self.once
        return BootState(entries, self.generation, once)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BootState)
            and self.entries == other.entries
            and self.generation == other.generation
            and self.once == other.once
        )

    def __hash__(self) -> int:
        return hash((self.generation, self.once, tuple(sorted(self.entries))))

    def __repr__(self) -> str:
        return f"BootState(generation={self.generation}, once={self.once!r}, {self.entries!r})"

    # -- serialisation -------------------------------------------------------------------------

    def to_json(self) -> str:
        body = {
            "format": FORMAT,
            "generation": self.generation,
            "once": self.once,
            "deployments": {k: self.entries[k].to_dict() for k in sorted(self.entries)},
        }
        text = format_json(body, indent=2)
        # The checksum covers the exact text before it, so a torn or bit-flipped file is caught
        # even when what is left still parses as JSON.
        return f'{text[:-2]},\n  "crc32": "{binascii.crc32(text.encode()):08x}"\n}}\n'

    @classmethod
    def from_json(cls, text: str) -> BootState:
        try:
            data = parse_json(text)
        except ValueError as e:
            raise StateError(f"not JSON ({e})") from None
        if not isinstance(data, dict):
            raise StateError("not a JSON object")
        crc = data.pop("crc32", None)
        body = format_json(data, indent=2)
        if crc != f"{binascii.crc32(body.encode()):08x}":
            raise StateError("checksum mismatch (torn or damaged write)")
        if data.get("format") != FORMAT:
            raise StateError(f"unknown format {data.get('format')!r}")
        try:
            entries = {
                str(k): Entry(
                    priority=_int(v["priority"]),
                    tries_left=None if v["tries_left"] is None else _int(v["tries_left"]),
                    successful=bool(v["successful"]),
                    bad=None if v["bad"] is None else str(v["bad"]),
                    pinned=bool(v["pinned"]),
                    # Absent from files written before it existed: not verified yet.
                    verified=bool(v.get("verified", False)),
                )
                for k, v in data["deployments"].items()
            }
            once = data["once"]
            return cls(entries, _int(data["generation"]), None if once is None else str(once))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise StateError(f"malformed ({type(e).__name__}: {e})") from None


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    return value


# -- policy ------------------------------------------------------------------------------------


def ranked(state: BootState) -> list[str]:
    """Bootable deployments, best first."""
    bootable = [k for k, e in state.entries.items() if e.bootable]
    return sorted(bootable, key=lambda k: (state.entries[k].priority, k), reverse=True)


def candidates(state: BootState) -> list[str]:
    """What to try this boot, in order: the one-shot choice first, then the ranking."""
    order = ranked(state)
    if state.once in state.entries:
        order = [state.once, *(k for k in order if k != state.once)]
    return order


def plan(state: BootState, chosen: str | None, kexec_for: str | None = None) -> list[str]:
    """The candidates of this boot, in order: the deployment a kexec was made for
    (``overlayroot.kexec=``, when it is on disk), the deployment chosen on the kernel command
    line (``overlayroot.deployment=``; when it is on disk, booted whatever its state), then
    :func:`candidates`. (Not to be confused with ``Entry.pinned``: kept by gc.)"""
    order = candidates(state)
    for first in (chosen, kexec_for):
        if first in state.entries:
            order = [first, *(k for k in order if k != first)]
    return order


def counts(deployment_id: str, chosen: str | None, kexec_for: str | None = None) -> bool:
    """Whether booting ``deployment_id`` takes a try: every boot does (a successful
    deployment's try is free, see :func:`start_attempt`) but one of the deployment chosen on
    the command line, and the boot of the deployment a kexec was made for, whose try the stage
    took before the kexec."""
    return deployment_id not in (chosen, kexec_for)


TRIAL = "trial"
KNOWN_GOOD = "known good"
DEGRADED = "degraded"


def after_kexec(entry: Entry) -> str:
    """What the boot of the deployment a kexec was made for is: a :data:`TRIAL` whose try the
    stage took before the kexec (:func:`start_attempt`); :data:`KNOWN_GOOD`, not counted; or
    :data:`DEGRADED` when it is bad, which only the last resort boots (:func:`last_resort`)."""
    if entry.successful:
        return KNOWN_GOOD
    return DEGRADED if entry.bad is not None else TRIAL


BOOT = "boot"  # the running kernel is the deployment's, or it has none: boot it here
KEXEC = "kexec"  # take the try, then load its kernel and switch to it
WRONG_KERNEL = "wrong-kernel"  # kexec'd for it, and still not its kernel: it fails
REBOOT = "reboot"  # after a kexec, a candidate that needs another kernel: through firmware


def kernel_step(deployment_id: str, wanted: str | None, running: str, kexec_for: str | None) -> str:
    """What the kernel a candidate needs asks of this boot. ``wanted``: the version (uname -r)
    of the deployment's kernel, None when it has none (it boots under any); ``running``: this
    kernel's; ``kexec_for``: the deployment this kernel was kexec'd for, None when the
    bootloader started it.

    A boot started by a kexec never kexecs again, so no kernel can loop: the deployment it was
    made for fails if the kernel still does not match (its manifest names a version its kernel
    file is not), and any other candidate that needs another kernel is left to a reboot
    through the firmware, whose kernel the stage then switches from as usual (the failures of
    this boot being on disk, the next boot does not choose the same)."""
    if wanted is None or wanted == running:
        return BOOT
    if kexec_for is None:
        return KEXEC
    return WRONG_KERNEL if deployment_id == kexec_for else REBOOT


def needs_verification(entry: Entry) -> bool:
    """A deployment's image is hashed until a check has passed, and never once it is known
    good: hashing reads the whole image (~30 s for 250 MB under emulation)."""
    return not entry.successful and not entry.verified


def verified(state: BootState, deployment_id: str) -> BootState:
    return state.with_entry(deployment_id, state.entries[deployment_id].replace(verified=True))


def last_resort(state: BootState, last_started: str | None, tried: set[str]) -> list[str]:
    """What to boot when nothing is bootable: every deployment not already tried in this boot,
    the one that last reached its init (``last_started``) first, then those that used up their
    tries (they reached their init at least once: they crashed, hung or were never blessed)
    before those that failed to mount or verify, each group best first. Booted uncounted and
    degraded: a machine that runs beats one that reboots forever."""

    def rank(k: str) -> tuple[bool, bool, int, str]:
        entry = state.entries[k]
        return k == last_started, entry.bad == USED_UP, entry.priority, k

    return sorted((k for k in state.entries if k not in tried), key=rank, reverse=True)


def default(state: BootState) -> str | None:
    order = ranked(state)
    return order[0] if order else None


def mark_bad_leaving_a_fallback(
    state: BootState, deployment_id: str, reason: str
) -> tuple[BootState, str] | None:
    """``deployment_id`` marked bad, and the deployment that boots next; None when marking it
    would leave nothing bootable (then it must not be marked: a machine must keep a way up)."""
    new = mark_bad(state, deployment_id, reason)
    fallback = default(new)
    return None if fallback is None else (new, fallback)


def rollback_target(state: BootState, booted: str | None) -> str | None:
    """Where ``rollback`` goes: the best successful deployment other than the booted one."""
    good = [k for k in ranked(state) if state.entries[k].successful and k != booted]
    return good[0] if good else None


def _top(state: BootState) -> int:
    return max((e.priority for e in state.entries.values()), default=0)


def sync(state: BootState, present: list[str]) -> BootState:
    """Match the state to the deployments on disk: forget missing ones; a deployment found on
    disk but not in the state (copied in by hand) is added below all others, untried."""
    entries = {k: v for k, v in state.entries.items() if k in present}
    low = min((e.priority for e in entries.values()), default=1)
    for k in sorted(set(present) - set(entries)):
        low -= 1
        entries[k] = Entry(priority=low)
    once = state.once if state.once in entries else None
    return BootState(entries, state.generation, once)


def add(state: BootState, deployment_id: str, *, known_good: bool = False) -> BootState:
    """A new deployment becomes the default, as a trial; or, ``known_good`` (a factory image
    whose first deployment has been tested before it ships), as a successful one."""
    return state.with_entry(
        deployment_id, Entry(priority=_top(state) + 1, successful=known_good, verified=known_good)
    )


def start_attempt(state: BootState, deployment_id: str, tries: int) -> tuple[BootState, bool]:
    """Take one try for a boot of ``deployment_id``; returns the new state and whether this is
    a trial (counted) boot. A one-shot choice is used up by the attempt."""
    entry = state.entries[deployment_id]
    once = None if state.once == deployment_id else state.once
    if entry.successful:
        return BootState(state.entries, state.generation, once), False
    left = tries if entry.tries_left is None else entry.tries_left
    new = state.with_entry(deployment_id, entry.replace(tries_left=max(left - 1, 0)))
    return BootState(new.entries, new.generation, once), True


def mark_bad(state: BootState, deployment_id: str, reason: str) -> BootState:
    entry = state.entries[deployment_id]
    return state.with_entry(
        deployment_id, entry.replace(successful=False, tries_left=0, bad=reason)
    )


USED_UP = "used up its tries without being blessed (it crashed, hung or was reset)"


def mark_used_up(state: BootState, kexec_for: str | None = None) -> tuple[BootState, list[str]]:
    """Mark bad, with the reason, the deployments whose tries ran out without a bless: they
    are no longer bootable either way, but now ``status`` and the history say why, and a
    rebuild from the history does not give them fresh tries. Not ``kexec_for``, the deployment
    this kernel was kexec'd for: the stage before the kexec took its last try for this boot."""
    used_up = sorted(
        k
        for k, e in state.entries.items()
        if not e.successful and e.tries_left == 0 and e.bad is None and k != kexec_for
    )
    for k in used_up:
        state = mark_bad(state, k, USED_UP)
    return state, used_up


def bless(state: BootState, deployment_id: str) -> BootState:
    entry = state.entries[deployment_id]
    return state.with_entry(deployment_id, entry.replace(successful=True, bad=None))


def set_default(state: BootState, deployment_id: str) -> BootState:
    """Make ``deployment_id`` the default. One that is not known good gets a fresh trial."""
    entry = state.entries[deployment_id]
    changes: dict[str, object] = {"priority": _top(state) + 1}
    if not entry.successful:
        changes.update(tries_left=None, bad=None)
    return state.with_entry(deployment_id, entry.replace(**changes))


def set_once(state: BootState, deployment_id: str) -> BootState:
    if deployment_id not in state.entries:
        raise KeyError(deployment_id)
    return BootState(state.entries, state.generation, deployment_id)


def pin(state: BootState, deployment_id: str, pinned: bool = True) -> BootState:
    return state.with_entry(deployment_id, state.entries[deployment_id].replace(pinned=pinned))


def rebuild(present: list[tuple[str, str]], blessed: set[str], bad: dict[str, str]) -> BootState:
    """A safe state when none can be read: ``present`` is ``(id, created)`` of the deployments
    on disk. Newer ranks higher; what the boot history says was blessed stays successful, what
    it says went bad stays bad, and the rest get a fresh trial. The result always has a bootable
    deployment when any exists."""
    entries = {}
    for priority, (k, _created) in enumerate(sorted(present, key=lambda p: (p[1], p[0])), 1):
        if k in bad and k not in blessed:
            entries[k] = Entry(priority=priority, tries_left=0, bad=bad[k])
        else:
            entries[k] = Entry(priority=priority, successful=k in blessed)
    state = BootState(entries)
    if entries and not ranked(state):
        # Everything went bad once. Booting something beats booting nothing: give the newest
        # a new trial rather than leave the machine with no bootable deployment.
        newest = max(entries, key=lambda k: entries[k].priority)
        state = state.with_entry(newest, entries[newest].replace(tries_left=None))
    return state
