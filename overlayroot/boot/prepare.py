"""The boot flow: choose a deployment, count the boot, assemble the root, fall back by itself.

:func:`prepare_root` is what every integration calls once the state filesystem is mounted:
our standalone ``/init``, and dracut, mkinitcpio and initramfs-tools through
``python -m overlayroot.boot.prepare /sysroot`` (exit 0: the root is ready; 1: it is not, and the
console says why). The boot, step by step:

1. **Read the boot state**, recovering a torn, missing or damaged ``boot.json`` (from
   ``boot.json.prev``, else rebuilt from the deployments and the history), marking deployments
   that used up their tries without a bless, and writing the repair at once.
2. **Plan the candidates** (:func:`overlayroot.core.bootstate.plan`): the deployment a kexec was
   made for (``overlayroot.kexec=``, its try already taken), the deployment
   ``overlayroot.deployment=`` names, the one-shot choice, then the bootable ones by priority.
3. **Try each candidate** until one is assembled:

   a. *take a try* and write it to disk before anything else, so a crash from here on counts
      (not for a deployment chosen with ``overlayroot.deployment=``; free for a known-good
      deployment);
   b. *verify* the image against its manifest's digest until a check has passed, and record
      that it passed;
   c. *switch kernels* when the deployment carries a kernel other than the running one
      (:mod:`overlayroot.boot.kexec`): check, load and start it with ``overlayroot.kexec=<id>`` on
      its command line; the stage there boots that deployment without a second try and never
      switches again (:func:`overlayroot.core.bootstate.kernel_step`);
   d. *assemble* the root (:mod:`overlayroot.boot.assemble`).

   Whatever goes wrong with a candidate — a damaged image or manifest, no init, a bug of ours —
   marks it bad with the reason, and the next candidate is tried in this boot.
4. **Last resort**: when nothing is bootable, boot the deployment that last reached its init
   (then the others), uncounted, without a watchdog and *degraded*, which the console,
   ``booted.json``, ``status`` and the history say: a machine that runs beats one that
   reboots forever.
5. **Hand over**: arm the watchdog for a trial boot, record the boot in the history, write
   ``booted.json``.

Only a failure outside every candidate — no state filesystem, no deployment on it — ends the
boot with an error.
"""

from __future__ import annotations

import os
import sys

from overlayroot.boot import modload, priority
from overlayroot.boot.assemble import Booted, assemble
from overlayroot.boot.cmdline import Options, kexec_cmdline, parse_options
from overlayroot.boot.console import Console, describe_bug, now
from overlayroot.core import bootstate, files, statefile, syscalls
from overlayroot.core.bootstate import BootState
from overlayroot.core.errors import BootError
from overlayroot.core.layout import Manifest, StateLayout
from overlayroot.core.safejson import format_json
from overlayroot.core.statefile import Event

RUN_DIR = "/run/overlayroot"
BOOTED_FILE = "booted.json"


class Boot:
    """One boot in progress: the state as last written, and what ``booted.json`` and the
    history will say of it."""

    def __init__(
        self,
        layout: StateLayout,
        opts: Options,
        console: Console,
        where: str,
        cmdline: str = "",
        running: str | None = None,
    ) -> None:
        self.layout = layout
        self.cmdline = cmdline  # this kernel's, the base of a switched kernel's
        self.running = running or os.uname().release  # this kernel's release
        self.opts = opts
        self.console = console
        self.where = where  # the state device, for messages
        self.state = BootState()
        self.counted: bool | None = None  # None: not a trial
        self.count_error: str | None = None
        self.failed: list[dict[str, str]] = []
        self.recovery: list[str] = []
        self.repairs: list[str] = []
        self.reported = 0  # how many of the repairs the console and the history have had
        self.degraded: str | None = None

    def save(self, state: BootState, failure: str) -> str | None:
        """Write ``state``; on failure keep it in memory, say ``failure`` and return why."""
        try:
            self.state = statefile.save(self.layout, state)
            return None
        except OSError as e:
            self.state = state
            error = f"cannot write {self.layout.file(statefile.STATE)}: {e.strerror}"
            self.console.warn(f"{failure}: {error}")
            return error

    def record(self, event: str, deployment: str | None, **fields: object) -> None:
        try:
            statefile.append_history(self.layout, event, deployment, **fields)
        except OSError as e:
            self.console.warn(
                f"cannot add to the boot history"
                f" {self.layout.file(statefile.HISTORY)}: {e.strerror}"
            )

    def report_repairs(self) -> None:
        """Say the repairs made since the last call: a set-aside is news even when the boot
        goes on to fail."""
        for repair in self.repairs[self.reported :]:
            self.console.warn(repair)
            self.record(Event.REPAIRED, None, reason=repair)
        self.reported = len(self.repairs)


def prepare_root(
    sysroot: str,
    run_dir: str,
    opts: Options,
    device: str | None,
    console: Console,
    cmdline: str = "",
    running: str | None = None,
) -> Booted:
    """Make ``sysroot`` (the mounted state filesystem) the assembled root of a deployment.
    ``cmdline``: this kernel's command line, the base of the one a deployment's own kernel is
    started with (:func:`overlayroot.boot.cmdline.kexec_cmdline`); ``running``: this kernel's
    release (default ``uname -r``; a test machine names the kernel it pretends to run)."""
    boot = Boot(StateLayout(sysroot), opts, console, device or sysroot, cmdline, running)
    read_state(boot)
    for deployment_id in plan(boot):
        booted = attempt(
            boot,
            deployment_id,
            sysroot,
            run_dir,
            device,
            counted=bootstate.counts(deployment_id, opts.deployment, opts.kexec),
        )
        if booted is not None:
            return hand_over(boot, booted, run_dir)
    for deployment_id in last_resort(boot):
        booted = attempt(boot, deployment_id, sysroot, run_dir, device, counted=False)
        if booted is not None:
            return hand_over(boot, booted, run_dir)
    raise BootError(
        f"no deployment on {boot.where} could boot, not even as a last resort:\n"
        + "\n".join(f"  - {f['reason']}" for f in boot.failed)
        + "\ndeploy a working image with `overlayroot deploy --sysroot DIR SOURCE` from another"
        " system"
    )


def read_state(boot: Boot) -> None:
    """Step 1: the boot state, recovered and repaired if need be."""
    layout = boot.layout
    if not layout.exists():
        raise BootError(
            f"{boot.where} holds no overlayroot state (no overlayroot/deployments directory);"
            " point overlayroot.state= at the state filesystem, or provision it with"
            " `overlayroot deploy`"
        )
    state, boot.recovery = statefile.load(layout)
    for note in boot.recovery:
        boot.console.warn(note)
        boot.record(Event.RECOVERED, None, reason=note)
    state, used_up = bootstate.mark_used_up(state, boot.opts.kexec)
    for deployment_id in used_up:
        boot.console.say(f"deployment {deployment_id} {bootstate.USED_UP}")
        boot.record(Event.FAILED, deployment_id, reason=bootstate.USED_UP)
    boot.state = state
    if boot.recovery or used_up:
        # Write the repair now: a boot that is not a trial would otherwise leave the damaged
        # or stale file on disk until some command writes it.
        boot.save(state, "cannot write the repaired boot state")
    if not state.entries:
        raise BootError(
            f"no deployments in {layout.deployments} on {boot.where}; stage one with"
            " `overlayroot deploy --sysroot <mounted state filesystem> <image or tree>`"
        )


def plan(boot: Boot) -> list[str]:
    """Step 2: the candidates, in order."""
    for wanted, option in (
        (boot.opts.deployment, "overlayroot.deployment="),
        (boot.opts.kexec, "overlayroot.kexec="),
    ):
        if wanted is not None and wanted not in boot.state.entries:
            boot.console.warn(
                f"deployment {wanted!r} ({option}) is not on {boot.where}; booting the usual"
                f" candidates instead (deployments there:"
                f" {', '.join(sorted(boot.state.entries))})"
            )
    return bootstate.plan(boot.state, boot.opts.deployment, boot.opts.kexec)


def attempt(
    boot: Boot, deployment_id: str, sysroot: str, run_dir: str, device: str | None, *, counted: bool
) -> Booted | None:
    """Step 3 for one candidate: the assembled root, or None when it failed (marked bad)."""
    if boot.failed:
        boot.console.say(f"falling back to deployment {deployment_id}")
    boot.counted = boot.count_error = None
    if boot.opts.kexec is not None and deployment_id != boot.opts.kexec:
        reboot_for_kernel(boot, deployment_id, sysroot)
    if counted:
        take_try(boot, deployment_id)
    elif deployment_id == boot.opts.kexec:
        after = bootstate.after_kexec(boot.state.entries[deployment_id])
        if after == bootstate.TRIAL:
            boot.counted = True  # by the stage before the kexec
        elif after == bootstate.DEGRADED:
            boot.degraded = boot.degraded or (
                f"{deployment_id} is bad and was switched to as a last resort"
            )
    try:
        manifest = boot.layout.read_manifest(deployment_id)
        wanted = manifest.kernel.version if manifest.kernel is not None else None
        step = bootstate.kernel_step(deployment_id, wanted, boot.running, boot.opts.kexec)
        if step == bootstate.WRONG_KERNEL:
            raise BootError(
                f"deployment {deployment_id!r}: this kernel was started for it with kexec, yet"
                f" it is {boot.running}, not the {wanted} its manifest names: its kernel file"
                " is another kernel than the manifest says; deploy it again"
            )
        if bootstate.needs_verification(boot.state.entries[deployment_id]):
            verify(boot.layout, manifest)
            boot.save(
                bootstate.verified(boot.state, deployment_id),
                f"cannot record that the image of {deployment_id} passed its check (it"
                " is checked again next boot)",
            )
        if step == bootstate.KEXEC:
            switch_kernel(boot, manifest, sysroot)
        return assemble(sysroot, run_dir, boot.opts, manifest, device=device, repairs=boot.repairs)
    except Exception as e:
        if isinstance(e, BootError):
            reason = str(e)
            boot.console.error(reason)
        else:
            boot.console.error(describe_bug(e))
            reason = (
                f"internal error (a bug in overlayroot) while booting {deployment_id}:"
                f" {type(e).__name__}: {e}"
            )
        boot.failed.append({"deployment": deployment_id, "reason": reason})
        boot.report_repairs()
        boot.save(
            bootstate.mark_bad(boot.state, deployment_id, reason),
            f"cannot record that {deployment_id} is bad",
        )
        boot.record(Event.FAILED, deployment_id, reason=reason)
        return None


def take_try(boot: Boot, deployment_id: str) -> None:
    """Step 3a: the try, on disk before the root is touched. A write that fails is said, and
    recorded as an uncounted boot: never silently ignored."""
    new, trial = bootstate.start_attempt(boot.state, deployment_id, boot.opts.tries)
    if new == boot.state:
        return
    error = boot.save(
        new,
        f"this boot of {deployment_id} is NOT counted, and will not fall"
        " back by itself if it fails",
    )
    if trial:
        boot.counted = error is None
        boot.count_error = error


def switch_kernel(boot: Boot, manifest: Manifest, sysroot: str) -> None:
    """Step 3c: start the deployment's own kernel; returns only by raising a BootError."""
    from overlayroot.boot import kexec  # only a deployment with its own kernel needs it

    kernel = manifest.kernel
    assert kernel is not None
    if boot.count_error is not None:
        raise BootError(
            f"deployment {manifest.id!r} needs its kernel {kernel.version}, but its try could"
            f" not be recorded ({boot.count_error}): a switch of kernels that is not counted"
            " would repeat at every boot if that kernel fails, so it is not booted this time"
        )
    kexec.check(boot.layout, manifest)
    cmdline = kexec_cmdline(boot.cmdline, kernel.kargs, manifest.id)
    kexec.load(boot.layout, manifest, cmdline)
    boot.console.say(
        f"switching to deployment {manifest.id}'s kernel {kernel.version} (this"
        f" is {boot.running}) with kexec"
    )
    boot.report_repairs()
    boot.record(
        Event.KEXEC,
        manifest.id,
        kernel=kernel.version,
        from_kernel=boot.running,
        fallback_from=[f["deployment"] for f in boot.failed] or None,
    )
    kexec.restart(sysroot, syscalls.RB_KEXEC)


def reboot_for_kernel(boot: Boot, deployment_id: str, sysroot: str) -> None:
    """In a boot started by a kexec, a candidate that needs another kernel than this one is
    left to a reboot through the firmware: a kexec'd boot never switches kernels again. What
    made this boot fall back is on disk, so the next boot chooses as this one would have.
    Returns when this kernel will do, or when the reboot fails (then the candidate is tried
    here)."""
    try:
        manifest = boot.layout.read_manifest(deployment_id)
    except BootError:
        return  # the attempt says why
    wanted = manifest.kernel.version if manifest.kernel is not None else None
    if (
        bootstate.kernel_step(deployment_id, wanted, boot.running, boot.opts.kexec)
        != bootstate.REBOOT
    ):
        return
    boot.console.say(
        f"deployment {deployment_id} needs kernel {wanted}; this kernel"
        f" ({boot.running}) was started with kexec for {boot.opts.kexec}, and a"
        " kexec'd boot does not switch again: rebooting through the bootloader"
    )
    boot.report_repairs()
    boot.record(
        Event.REBOOT,
        deployment_id,
        reason=f"needs kernel {wanted}, not the kexec'd {boot.running}",
        fallback_from=[f["deployment"] for f in boot.failed] or None,
    )
    from overlayroot.boot import kexec

    try:
        kexec.restart(sysroot, syscalls.RB_AUTOBOOT)
    except BootError as e:
        boot.console.warn(f"{e}: trying {deployment_id} under this kernel")


def verify(layout: StateLayout, manifest: Manifest) -> None:
    """Step 3b: the image's digest against its manifest's: BLAKE2b-256 where both the manifest
    and this Python have it (a third of sha256's work), else sha256."""
    if manifest.format == "dir":
        return  # a tree is checked by its mount points and init; hashing it costs a full walk
    from overlayroot.core import digest  # first boots only

    image = layout.image_path(manifest)
    if manifest.blake2b is not None and digest.HAS_BLAKE2B:
        algorithm, expected, check = "blake2b", manifest.blake2b, digest.file_blake2b
    else:
        algorithm, expected, check = "sha256", manifest.sha256, digest.file_sha256
    try:
        actual = check(image)
    except OSError as e:
        raise BootError(
            f"deployment {manifest.id!r}: cannot read its image {image}: {e.strerror}"
        ) from None
    if actual != expected:
        raise BootError(
            f"deployment {manifest.id!r}: its image {image} fails its digest check ({algorithm}"
            f" {actual[:16]}…, manifest says {expected[:16]}…): the image is damaged;"
            " deploy it again"
        )


def last_resort(boot: Boot) -> list[str]:
    """Step 4: when nothing was bootable, what to boot anyway, degraded."""
    tried = {f["deployment"] for f in boot.failed}
    last_started = None
    for event in reversed(statefile.read_history(boot.layout)):
        if event.get("event") == Event.BOOT and isinstance(event.get("deployment"), str):
            last_started = str(event["deployment"])
            break
    order = bootstate.last_resort(boot.state, last_started, tried)
    if order:
        boot.degraded = (
            "nothing was bootable: every deployment failed or used up its tries without a bless"
        )
        boot.console.error(
            f"no bootable deployment on {boot.where}:\n"
            f"{describe_state(boot.state)}\nDEGRADED boot as a last resort: the"
            f" deployment that last reached its init first ({', '.join(order)});"
            " fix it and run `overlayroot bless`, or deploy a working image"
        )
    return order


def describe_state(state: BootState) -> str:
    lines = []
    for k in sorted(state.entries, key=lambda k: -state.entries[k].priority):
        e = state.entries[k]
        why = e.bad or ("no tries left" if e.tries_left == 0 else "")
        lines.append(f"  {k}: {why or 'bootable'}")
    return "\n".join(lines) or "  (none)"


def hand_over(boot: Boot, booted: Booted, run_dir: str) -> Booted:
    """Step 5: watchdog, history, ``booted.json``."""
    boot.layout = StateLayout(booted.state_path)  # the state filesystem moved there
    deployment_id = booted.deployment.id
    entry = boot.state.entries[deployment_id]
    trial = boot.counted is not None and boot.degraded is None
    boot.report_repairs()
    armed = None
    if trial and boot.opts.watchdog:
        from overlayroot.core import watchdog  # trial boots only

        try:
            if not os.path.exists(watchdog.DEVICE):
                modload.need("watchdog")  # softdog: listed, or the generator's modprobe
            armed = watchdog.arm(boot.opts.watchdog)
        except OSError as e:
            boot.console.warn(
                f"no watchdog armed ({e.strerror}: {e.filename}): a trial boot"
                " that hangs will not fall back by itself"
            )
    boot.record(
        Event.BOOT,
        deployment_id,
        kernel=boot.running,
        kexec=boot.opts.kexec is not None,
        trial=trial,
        tries_left=entry.tries_left,
        counted=boot.counted,
        count_error=boot.count_error,
        fallback_from=[f["deployment"] for f in boot.failed] or None,
        watchdog=armed,
        degraded=boot.degraded,
    )
    if boot.degraded:
        boot.console.say(
            f"DEGRADED boot of {deployment_id}, a last resort, not counted and"
            f" without a watchdog: {boot.degraded}"
        )
    elif trial:
        boot.console.say(
            f"trial boot of {deployment_id}: {entry.tries_left} tries left after"
            " this one" + (f"; watchdog {armed} s" if armed else "")
        )
    extra = {
        "trial": trial,
        "tries_left": entry.tries_left,
        "counted": boot.counted,
        "count_error": boot.count_error,
        "failed": boot.failed,
        "recovery": boot.recovery,
        "repairs": boot.repairs,
        "degraded": boot.degraded,
        "watchdog": armed,
        "generation": boot.state.generation,
        "kernel": boot.running,
        "kexec": boot.opts.kexec,
        "modules": list(modload.LOADED),
    }
    write_booted(run_dir, {**booted.to_dict(), **extra})
    return booted


def write_booted(run_dir: str, data: dict[str, object]) -> None:
    """``<run_dir>/booted.json``: what the running system reads to learn what was booted."""
    text = format_json(data, indent=2) + "\n"
    files.write_atomically(os.path.join(run_dir, BOOTED_FILE), text.encode())


def read_cmdline() -> str:
    """The kernel's command line (``/proc/cmdline``), for /init and for the hooks' entry."""
    with open("/proc/cmdline") as f:
        return f.read()


def main(argv: list[str] | None = None) -> int:
    started = now()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(
            "usage: python -m overlayroot.boot.prepare SYSROOT\n"
            "Turn the state filesystem mounted at SYSROOT into the assembled root.",
            file=sys.stderr,
        )
        return 2
    console = Console()
    try:
        cmdline = read_cmdline()
        opts, warnings = parse_options(cmdline)
        console.debug = opts.debug
        modload.console.debug = opts.debug
        # overlayroot.debug: the same stamps as the standalone /init's, for a hook's share.
        console.step(
            f"the interpreter started and imported the stage (nice {priority.nice()})", at=started
        )
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
            raise BootError(
                f"cannot remount the state filesystem on {sysroot} read-write: {e.strerror}"
            ) from None
        console.step(f"re-mounted {sysroot} read-write")
        booted = prepare_root(sysroot, RUN_DIR, opts, opts.state, console, cmdline)
        console.step(f"assembled deployment {booted.deployment.id}")
    except BootError as e:
        console.error(str(e))
        return 1
    except Exception as e:
        console.error(describe_bug(e))
        return 1
    console.say(f"prepared deployment {booted.deployment.id} on {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
