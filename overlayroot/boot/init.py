"""PID 1 of the standalone initramfs: find the state filesystem, assemble the root, switch to it.

No shell, no udev, no blkid: every step is Python and a system call. The steps, in order:

1. mount /proc, /sys, /dev (devtmpfs) and /run (tmpfs); make / private;
2. read the kernel command line;
3. load the kernel modules the builder listed;
4. wait for the state device named by ``overlayroot.state=`` (else ``root=``);
5. mount it on /sysroot;
6. choose, count, verify and assemble a deployment there, falling back in the same boot
   (:func:`overlayroot.boot.prepare.prepare_root`, the flow every integration shares);
7. switch root and exec the deployment's init.

A failure prints ``overlayroot: error: <what failed and what to do>`` and then does what
``overlayroot.onfail=`` says. PID 1 must never exit: the kernel would panic.

``overlayroot.break=STEP`` (:data:`overlayroot.boot.cmdline.BREAK_STEPS`) opens the rescue shell
before step 3 (``modules``), 4 (``device``), 5 (``mount``), 6 (``prepare``) or 7 (``switch``);
leaving the shell goes on with the boot.
"""

from __future__ import annotations

import os
import time

from overlayroot.boot import devices, modload, priority
from overlayroot.boot.cmdline import BREAK_STEPS, Options, onfail_from, parse_options
from overlayroot.boot.console import Console, describe_bug, now
from overlayroot.boot.prepare import prepare_root, read_cmdline
from overlayroot.boot.switchroot import switch_root
from overlayroot.core import syscalls
from overlayroot.core.errors import BootError

SYSROOT = "/sysroot"
RUN_DIR = "/run/overlayroot"
REBOOT_DELAY = 10.0  # seconds to read the message before the screen is gone


def mount_api_filesystems() -> None:
    for source, target, fstype, flags, data in (
        (
            "proc",
            "/proc",
            "proc",
            syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC,
            None,
        ),
        ("devtmpfs", "/dev", "devtmpfs", syscalls.MS_NOSUID, "mode=0755"),
        ("tmpfs", "/run", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=0755"),
    ):
        os.makedirs(target, exist_ok=True)
        syscalls.mount(source, target, fstype, flags, data)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)


def mount_state(device: devices.BlockDevice, opts: Options, read_only: bool) -> None:
    fstype = opts.rootfstype or (device.probe.fstype if device.probe else None)
    if fstype is None:
        raise BootError(
            f"{device.path} has no filesystem overlayroot recognises (ext4, btrfs, xfs); name"
            " its type with rootfstype="
        )
    os.makedirs(SYSROOT, exist_ok=True)
    modload.need(f"fs-{fstype}")
    flags = syscalls.MS_RDONLY if read_only else 0
    try:
        syscalls.mount(device.path, SYSROOT, fstype, flags, opts.rootflags)
    except OSError as e:
        raise BootError(
            f"cannot mount the state filesystem {device.path} ({fstype}) on {SYSROOT}: {e.strerror}"
        ) from None


def boot(console: Console, imported: float) -> None:
    """Steps 1 to 7; returns only by raising. ``imported``: when the stage's imports were done
    (said once the command line has said whether to say it)."""
    mount_api_filesystems()
    mounted = now()
    cmdline = read_cmdline()
    console.onfail = onfail_from(cmdline)
    opts, warnings = parse_options(cmdline)
    console.debug = opts.debug
    modload.console.debug = opts.debug
    console.step(
        f"the interpreter started and imported the stage (nice {priority.nice()})", at=imported
    )
    console.step("mounted /proc /sys /dev /run", at=mounted)
    console.step("read the command line")
    for warning in warnings:
        console.warn(warning)
    stop(console, opts, "modules")
    loaded, warnings = modload.load_listed()
    console.step(f"loaded {len(loaded)} kernel modules")
    for warning in warnings:
        console.warn(warning)
    if not opts.state:
        raise BootError(
            "no state device given: set overlayroot.state= or root= on the kernel"
            " command line, e.g. overlayroot.state=LABEL=state"
        )
    stop(console, opts, "device")
    device = devices.find(opts.state, opts.timeout)
    console.step(f"found {device.describe()}")
    stop(console, opts, "mount")
    if not opts.enabled:
        # overlayroot=off: boot the device as an ordinary root, as the kernel would.
        mount_state(device, opts, read_only=opts.read_only is not False)
        init = opts.init or "/sbin/init"
        stop(console, opts, "switch")
        console.say(f"overlayroot=off: switching root to {device.path} ({init})")
        switch_root(SYSROOT, init, opts.init_args)
        return
    # The state filesystem holds the writable layers: read-write whatever ro/rw say, which
    # describe the root the system sees, and that root is read-only in any case.
    mount_state(device, opts, read_only=False)
    console.step(f"mounted {device.path} on {SYSROOT}")
    stop(console, opts, "prepare")
    booted = prepare_root(SYSROOT, RUN_DIR, opts, device.path, console, cmdline)
    console.step(f"assembled deployment {booted.deployment.id}")
    assert booted.init is not None
    stop(console, opts, "switch")
    console.say(f"switching root to {booted.deployment.id} ({booted.init})")
    try:
        switch_root(SYSROOT, booted.init, opts.init_args)
    except OSError as e:
        raise BootError(
            f"cannot start {booted.init} in deployment {booted.deployment.id}: {e}"
        ) from None


def stop(console: Console, opts: Options, step: str) -> None:
    """The rescue shell, when ``overlayroot.break=`` names ``step``; the boot goes on after."""
    if step not in opts.breaks:
        return
    why = f"overlayroot.break={step}: stopped {BREAK_STEPS[step]}"
    if step == "switch":
        why += (
            "; on a trial boot the watchdog is already running (overlayroot.watchdog=):"
            " a long stop resets the machine"
        )
    from overlayroot.boot.rescue import rescue_shell  # imported when used: most boots never are

    rescue_shell(console, why, "to go on with the boot")


def fail(console: Console, onfail: str, why: str = "") -> None:
    """What ``overlayroot.onfail=`` says, once a boot cannot go on; ``why``: the error's
    first line, for the rescue shell's greeting. Never returns."""
    syscalls.sync()
    if onfail == "shell":
        from overlayroot.boot.rescue import rescue_shell

        rescue_shell(console, f"the boot failed: {why}" if why else "the boot failed", "to reboot")
        onfail = "reboot"
    if onfail == "reboot":
        console.say(f"rebooting in {REBOOT_DELAY:g} s")
        time.sleep(REBOOT_DELAY)
        command = syscalls.RB_AUTOBOOT
    else:
        console.say("powering off")
        command = syscalls.RB_POWER_OFF
    while True:
        try:
            syscalls.reboot(command)
        except OSError as e:
            console.error(f"reboot(2) failed: {e}")
        time.sleep(60)


def main() -> None:
    imported = now()
    console = Console()
    try:
        boot(console, imported)
        raise BootError("switch_root returned")
    except BootError as e:
        why = str(e)
    except BaseException as e:
        why = describe_bug(e)
    console.error(why)
    fail(console, console.onfail, why.splitlines()[0] if why else "")


if __name__ == "__main__":
    main()
