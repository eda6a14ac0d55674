"""Choose a deployment, count the boot, assemble the root, and fall back when it fails.

``prepare_root`` is what every integration calls once the state filesystem is mounted: our
standalone ``/init``, and dracut, mkinitcpio and initramfs-tools through
``python -m overlayroot.prepare /sysroot`` (exit 0: the root is ready; 1: it is not, and the
console says why). The steps:

1. read the boot state (recovering from a torn or missing file, and saying so);
2. list the candidates: ``overlayroot.deployment=`` first if given, then the one-shot choice,
   then the bootable deployments by priority;
3. for each candidate: take a try and write it to disk *before* anything else (a crash from here
   on counts), verify the image's digest on its first boot, and assemble;
4. a candidate that fails is marked bad with the reason and the next one is tried, in this boot;
5. arm the watchdog for a trial boot, record the attempt in the history, write ``booted.json``.
"""

from __future__ import annotations

import sys

from overlayroot import bootstate, statefile, syscalls, watchdog
from overlayroot.assemble import Booted, assemble, write_booted
from overlayroot.bootstate import BootState
from overlayroot.cmdline import Options, parse_options
from overlayroot.console import Console
from overlayroot.errors import BootError
from overlayroot.layout import Manifest, StateLayout

# _sha256 is built into the interpreter; hashlib would pull in OpenSSL's libcrypto.
try:
    from _sha256 import sha256  # type: ignore[import-not-found]
except ImportError:  # Python 3.12 renamed it _sha2
    from hashlib import sha256

RUN_DIR = "/run/overlayroot"
_CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    digest = sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return str(digest.hexdigest())


def verify(layout: StateLayout, manifest: Manifest) -> None:
    if manifest.format == "dir":
        return  # a tree is checked by its mount points and init; hashing it costs a full walk
    image = str(layout.image_path(manifest))
    try:
        actual = sha256_file(image)
    except OSError as e:
        raise BootError(f"deployment {manifest.id!r}: cannot read its image {image}:"
                        f" {e.strerror}") from None
    if actual != manifest.sha256:
        raise BootError(
            f"deployment {manifest.id!r}: its image {image} fails its digest check (sha256"
            f" {actual[:16]}…, manifest says {manifest.sha256[:16]}…): the image is damaged;"
            " deploy it again"
        )


class Attempt:
    """The bookkeeping of one boot, written into ``booted.json``."""

    def __init__(self) -> None:
        self.counted: bool | None = None  # None: not a trial
        self.count_error: str | None = None
        self.failed: list[dict[str, str]] = []
        self.notes: list[str] = []


def _save(layout: StateLayout, state: BootState, console: Console, why: str) -> tuple[
        BootState, str | None]:
    try:
        return statefile.save(layout, state), None
    except OSError as e:
        error = f"cannot write {layout.top / statefile.STATE}: {e.strerror}"
        console.warn(f"{why}: {error}")
        return state, error


def _history(layout: StateLayout, console: Console, event: str, deployment: str | None,
             **fields: object) -> None:
    try:
        statefile.append_history(layout, event, deployment, **fields)
    except OSError as e:
        console.warn(f"cannot add to the boot history {layout.top / statefile.HISTORY}:"
                     f" {e.strerror}")


def _describe(state: BootState) -> str:
    lines = []
    for k in sorted(state.entries, key=lambda k: -state.entries[k].priority):
        e = state.entries[k]
        why = e.bad or ("no tries left" if e.tries_left == 0 else "")
        lines.append(f"  {k}: {why or 'bootable'}")
    return "\n".join(lines) or "  (none)"


def prepare_root(
    sysroot: str, run_dir: str, opts: Options, device: str | None, console: Console
) -> Booted:
    """Make ``sysroot`` (the mounted state filesystem) the assembled root of a deployment."""
    where = device or sysroot
    layout = StateLayout(sysroot)
    if not layout.exists():
        raise BootError(
            f"{where} holds no overlayroot state (no overlayroot/deployments directory); point"
            " overlayroot.state= at the state filesystem, or provision it with"
            " `overlayroot deploy`"
        )
    state, notes = statefile.load(layout)
    attempt = Attempt()
    attempt.notes = notes
    for note in notes:
        console.warn(note)
        _history(layout, console, "recovered", None, reason=note)
    state, used_up = bootstate.mark_used_up(state)
    for deployment_id in used_up:
        console.say(f"deployment {deployment_id} {bootstate.USED_UP}")
        _history(layout, console, "failed", deployment_id, reason=bootstate.USED_UP)
    if notes or used_up:
        # Write the repair now: a boot that is not a trial would otherwise leave the damaged
        # or stale file on disk until some command writes it.
        state, _ = _save(layout, state, console, "cannot write the repaired boot state")
    if not state.entries:
        raise BootError(
            f"no deployments in {layout.deployments} on {where}; stage one with"
            " `overlayroot deploy --sysroot <mounted state filesystem> <image or tree>`"
        )
    order = bootstate.candidates(state)
    pinned = opts.deployment
    if pinned is not None:
        if pinned not in state.entries:
            raise BootError(
                f"deployment {pinned!r} (overlayroot.deployment=) is not on {where};"
                f" deployments there: {', '.join(sorted(state.entries))}"
            )
        order = [pinned, *(k for k in order if k != pinned)]
    if not order:
        raise BootError(
            f"no bootable deployment on {where}: every one has failed or used up its tries:\n"
            f"{_describe(state)}\nboot one anyway with overlayroot.deployment=ID, then"
            " `overlayroot set-default ID`"
        )
    for index, deployment_id in enumerate(order):
        if index:
            console.say(f"falling back to deployment {deployment_id}")
        trial = False
        # A deployment's image is verified on its first boot, before it ever runs: hashing
        # costs a read of the whole image (seconds on hardware, ~30 s for 250 MB under
        # emulation), too much for every trial boot.
        first_boot = state.entries[deployment_id].tries_left is None
        if deployment_id != pinned:
            before = state
            state, trial = bootstate.start_attempt(state, deployment_id, opts.tries)
            if state != before:
                state, error = _save(layout, state, console, f"this boot of {deployment_id} is"
                                     " NOT counted, and will not fall back by itself if it fails")
                if trial:
                    attempt.counted = error is None
                    attempt.count_error = error
        try:
            manifest = layout.read_manifest(deployment_id)
            if trial and first_boot:
                verify(layout, manifest)
            booted = assemble(sysroot, run_dir, opts, device=device, manifest=manifest)
        except BootError as e:
            reason = str(e)
            console.error(reason)
            attempt.failed.append({"deployment": deployment_id, "reason": reason})
            state = bootstate.mark_bad(state, deployment_id, reason)
            state, _ = _save(layout, state, console, f"cannot record that {deployment_id} is bad")
            _history(layout, console, "failed", deployment_id, reason=reason)
            continue
        return _booted(booted, state, deployment_id, trial, opts, attempt, run_dir, console)
    raise BootError(
        f"no deployment on {where} could boot:\n"
        + "\n".join(f"  - {f['reason']}" for f in attempt.failed)
    )


def _booted(booted: Booted, state: BootState, deployment_id: str, trial: bool, opts: Options,
            attempt: Attempt, run_dir: str, console: Console) -> Booted:
    layout = StateLayout(booted.state_path)
    entry = state.entries[deployment_id]
    armed = None
    if trial and opts.watchdog:
        try:
            armed = watchdog.arm(opts.watchdog)
        except OSError as e:
            console.warn(f"no watchdog armed ({e.strerror}: {e.filename}): a trial boot that"
                         " hangs will not fall back by itself")
    _history(layout, console, "boot", deployment_id, trial=trial, tries_left=entry.tries_left,
             counted=attempt.counted, count_error=attempt.count_error,
             fallback_from=[f["deployment"] for f in attempt.failed] or None, watchdog=armed)
    if trial:
        console.say(f"trial boot of {deployment_id}: {entry.tries_left} tries left after this one"
                    + (f"; watchdog {armed} s" if armed else ""))
    extra = {"trial": trial, "tries_left": entry.tries_left, "counted": attempt.counted,
             "count_error": attempt.count_error, "failed": attempt.failed,
             "recovery": attempt.notes, "watchdog": armed, "generation": state.generation}
    write_booted(run_dir, {**booted.to_dict(), **extra})
    return booted


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m overlayroot.prepare SYSROOT\n"
              "Turn the state filesystem mounted at SYSROOT into the assembled root.",
              file=sys.stderr)
        return 2
    console = Console()
    try:
        with open("/proc/cmdline") as f:
            opts, warnings = parse_options(f.read())
        console.debug = opts.debug
        for warning in warnings:
            console.warn(warning)
        if not opts.enabled:
            console.say("overlayroot=off: leaving the root as it is")
            return 0
        sysroot = args[0]
        # systemd makes / shared, and MS_MOVE refuses to move a mount out of a shared parent
        # (EINVAL): make the tree private first, as /init and ostree-prepare-root do.
        try:
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        except OSError as e:
            raise BootError(f"cannot make the mount tree private: {e.strerror}") from None
        # The framework may have mounted root= read-only (``ro``); the state filesystem holds
        # the writable layers and the boot counter.
        try:
            syscalls.mount(None, sysroot, None, syscalls.MS_REMOUNT)
        except OSError as e:
            raise BootError(f"cannot remount the state filesystem on {sysroot} read-write:"
                            f" {e.strerror}") from None
        booted = prepare_root(sysroot, RUN_DIR, opts, opts.state, console)
    except BootError as e:
        console.error(str(e))
        return 1
    console.say(f"prepared deployment {booted.deployment.id} on {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

