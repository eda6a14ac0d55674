"""The stage's kernel switch on real mounts, short of the switch itself: which deployment it
switches for, the checks and refusals that fail a candidate in the same boot, and what a boot
started by a kexec does. ``kexec.restart`` (the reboot) is replaced in every test here: a test
must never reboot the host; QEMU boots prove the switch (tests/qemu/test_kexec.py)."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from overlayroot.boot import kexec
from overlayroot.boot.cmdline import parse_options
from overlayroot.boot.console import Console
from overlayroot.boot.prepare import prepare_root
from overlayroot.commands.staging import deploy
from overlayroot.core import statefile, syscalls
from overlayroot.core.bootstate import USED_UP, BootState, bless, mark_bad
from overlayroot.core.errors import BootError
from overlayroot.core.layout import StateLayout
from qemu.mounts import mounts_under
from tests.host.conftest import Env
from tests.kernelfakes import add_kernel
from tests.trees import make_tree

RUNNING = os.uname().release
OTHER = "6.99.0-1-test" if RUNNING != "6.99.0-1-test" else "6.98.0-1-test"
BASE = "console=ttyS0 root=LABEL=state overlayroot.watchdog=0"


class Restarts:
    """Stands in for :func:`overlayroot.boot.kexec.restart`: records the reboot asked for, and
    fails it as a reboot(2) that returns would."""

    def __init__(self) -> None:
        self.commands: list[int] = []

    def __call__(self, sysroot: str, command: int) -> None:
        self.commands.append(command)
        raise BootError("reboot(2) failed: replaced by the test")


@pytest.fixture
def restarts(monkeypatch: pytest.MonkeyPatch) -> Restarts:
    fake = Restarts()
    monkeypatch.setattr(kexec, "restart", fake)
    return fake


def deploy_kernel(env: Env, name: str, version: str, *, init: bool = True) -> str:
    tree = make_tree(env.base / f"tree-{name}", init=init)
    add_kernel(tree, version)
    deploy(env.sysroot, tree, deployment_id=name, created=1_700_000_000)
    return name


def boot(env: Env, cmdline: str = BASE) -> tuple[dict[str, object], str]:
    opts, _ = parse_options(cmdline)
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            prepare_root(str(env.sysroot), str(env.run), opts, "/dev/test", Console(), cmdline)
        booted = json.loads((env.run / "booted.json").read_text())
    finally:
        if str(env.state) in mounts_under(env.run):
            for point in reversed(mounts_under(env.sysroot)):
                syscalls.umount(point, syscalls.MNT_DETACH)
            syscalls.mount(str(env.state), str(env.sysroot), None, syscalls.MS_MOVE)
    return booted, out.getvalue()


def bless_offline(env: Env, name: str) -> None:
    layout = StateLayout(env.sysroot)
    state, _ = statefile.load(layout)
    statefile.save(layout, bless(state, name))


def state_of(env: Env) -> BootState:
    return BootState.from_json((env.sysroot / "overlayroot/boot.json").read_text())


def history(env: Env) -> list[dict[str, object]]:
    return statefile.read_history(StateLayout(env.sysroot))


def test_a_kernel_the_running_kernel_will_not_load_fails_its_deployment_in_the_same_boot(
    env: Env, restarts: Restarts
) -> None:
    """The fake kernel is no kernel a real one loads: ENOEXEC where kexec_file_load exists,
    ENOSYS where the host kernel has none, EPERM in a container; each is a failure of v2."""
    env.deploy("v1")
    bless_offline(env, "v1")
    deploy_kernel(env, "v2", OTHER)
    booted, console = boot(env)
    assert booted["deployment"] == "v1" and restarts.commands == []
    reason = state_of(env).entries["v2"].bad
    assert reason is not None
    assert reason.startswith(
        f"deployment 'v2': its kernel {OTHER}"
        f" ({env.sysroot}/overlayroot/deployments/v2/vmlinuz) cannot be"
        " loaded: "
    )
    assert f"overlayroot: error: {reason}" in console
    assert "falling back to deployment v1" in console
    assert [(e["event"], e["deployment"]) for e in history(env)] == [
        ("failed", "v2"),
        ("boot", "v1"),
    ]
    assert state_of(env).entries["v2"].verified  # its image passed before its kernel failed


@pytest.mark.parametrize("damaged", ["vmlinuz", "initramfs.img"])
def test_a_damaged_kernel_or_initramfs_fails_its_digest_check(
    env: Env, restarts: Restarts, damaged: str
) -> None:
    env.deploy("v1")
    bless_offline(env, "v1")
    deploy_kernel(env, "v2", OTHER)
    path = env.sysroot / "overlayroot/deployments/v2" / damaged
    path.write_bytes(path.read_bytes() + b"!")
    booted, _ = boot(env)
    assert booted["deployment"] == "v1" and restarts.commands == []
    what = "kernel" if damaged == "vmlinuz" else "initramfs"
    reason = state_of(env).entries["v2"].bad
    assert reason is not None and reason.startswith(
        f"deployment 'v2': its {what} {path} fails its digest check (sha256 "
    )
    assert reason.endswith("the file is damaged; deploy it again")


def test_a_missing_kernel_file_is_named(env: Env, restarts: Restarts) -> None:
    env.deploy("v1")
    bless_offline(env, "v1")
    deploy_kernel(env, "v2", OTHER)
    (env.sysroot / "overlayroot/deployments/v2/vmlinuz").unlink()
    booted, _ = boot(env)
    assert booted["deployment"] == "v1"
    assert state_of(env).entries["v2"].bad == (
        f"deployment 'v2': cannot read its kernel {env.sysroot}/overlayroot/deployments/v2/vmlinuz:"
        " No such file or directory"
    )


def test_no_switch_when_the_try_cannot_be_recorded(env: Env, restarts: Restarts) -> None:
    deploy_kernel(env, "v2", OTHER)
    top = env.sysroot / "overlayroot"
    subprocess.run(["chattr", "+i", str(top)], check=True)  # no state write
    try:
        with pytest.raises(BootError) as raised:
            boot(env)
    finally:
        subprocess.run(["chattr", "-i", str(top)], check=True)
    assert f"deployment 'v2' needs its kernel {OTHER}, but its try could not be recorded" in str(
        raised.value
    )
    assert "would repeat at every boot if that kernel fails" in str(raised.value)
    assert restarts.commands == []


def test_the_boot_a_kexec_started_takes_no_second_try_and_is_a_trial(env: Env) -> None:
    env.deploy("v1")
    bless_offline(env, "v1")
    deploy_kernel(env, "v2", RUNNING)
    layout = StateLayout(env.sysroot)
    state, _ = statefile.load(layout)
    entry = state.entries["v2"]
    statefile.save(layout, state.with_entry("v2", entry.replace(tries_left=0)))  # its last
    booted, console = boot(env, f"{BASE} overlayroot.kexec=v2")
    assert booted["deployment"] == "v2" and booted["kexec"] == "v2"
    assert booted["trial"] is True and booted["counted"] is True
    assert booted["kernel"] == RUNNING
    assert state_of(env).entries["v2"].tries_left == 0 and state_of(env).entries["v2"].bad is None
    assert "trial boot of v2: 0 tries left after this one" in console
    assert history(env)[-1]["kexec"] is True
    # The next boot through the firmware finds that try used up, as after any failed trial.
    booted, _ = boot(env)
    assert booted["deployment"] == "v1"
    assert state_of(env).entries["v2"].bad == USED_UP


def test_a_kexecd_boot_whose_kernel_is_not_the_manifests_fails_that_deployment(
    env: Env, restarts: Restarts
) -> None:
    env.deploy("v1")
    bless_offline(env, "v1")
    deploy_kernel(env, "v2", OTHER)
    booted, _ = boot(env, f"{BASE} overlayroot.kexec=v2")
    assert booted["deployment"] == "v1" and restarts.commands == []  # v1 runs under any kernel
    assert state_of(env).entries["v2"].bad == (
        f"deployment 'v2': this kernel was started for it with kexec, yet it is {RUNNING}, not"
        f" the {OTHER} its manifest names: its kernel file is another kernel than the manifest"
        " says; deploy it again"
    )


def test_a_kexecd_boot_never_switches_again_it_reboots_through_the_firmware(
    env: Env, restarts: Restarts
) -> None:
    deploy_kernel(env, "v1", OTHER)
    bless_offline(env, "v1")
    deploy_kernel(env, "v2", RUNNING, init=False)  # its kernel runs; its root has no init
    booted, console = boot(env, f"{BASE} overlayroot.kexec=v2")
    assert restarts.commands == [syscalls.RB_AUTOBOOT]  # never RB_KEXEC
    assert (
        f"deployment v1 needs kernel {OTHER}; this kernel ({RUNNING}) was started with"
        " kexec for v2, and a kexec'd boot does not switch again: rebooting through the"
        " bootloader"
    ) in console
    # The reboot failed (the test's stand-in): v1 is tried under this kernel rather than not.
    assert "reboot(2) failed: replaced by the test: trying v1 under this kernel" in console
    assert booted["deployment"] == "v1"
    assert "has no executable /sbin/init" in str(state_of(env).entries["v2"].bad)
    events = [(e["event"], e["deployment"]) for e in history(env)]
    assert events == [("failed", "v2"), ("reboot", "v1"), ("boot", "v1")]


def test_a_kexecd_boot_of_a_bad_deployment_is_degraded(env: Env, restarts: Restarts) -> None:
    deploy_kernel(env, "v1", RUNNING)
    layout = StateLayout(env.sysroot)
    state, _ = statefile.load(layout)
    statefile.save(layout, mark_bad(state, "v1", "hangs at boot"))
    booted, _ = boot(env, f"{BASE} overlayroot.kexec=v1")
    assert booted["deployment"] == "v1" and booted["trial"] is False
    assert "switched to as a last resort" in str(booted["degraded"])
    assert booted["watchdog"] is None


# -- the kexec module's own error paths --------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "advice"),
    [
        (
            errno.ENOEXEC,
            "it is not a kernel this machine can start (another architecture, or not a"
            " kernel image at all) [kexec_file_load: Exec format error]",
        ),
        (
            errno.EPERM,
            "the running kernel refuses to load another kernel (lockdown or Secure Boot"
            " without a signature it trusts, or kernel.kexec_load_disabled=1)"
            " [kexec_file_load: Operation not permitted]",
        ),
        (
            errno.EKEYREJECTED,
            "its signature was rejected (lockdown or Secure Boot accepts only"
            " kernels signed by a key the running kernel trusts)",
        ),
        (
            errno.ENOSYS,
            "the running kernel cannot load another kernel (built without CONFIG_KEXEC_FILE)",
        ),
        (errno.ENOMEM, "there is not enough memory to hold the kernel and its initramfs"),
        (errno.EIO, "Input/output error [kexec_file_load: Input/output error]"),
    ],
)
def test_each_refusal_of_the_kernel_says_what_it_means(
    env: Env, monkeypatch: pytest.MonkeyPatch, err: int, advice: str
) -> None:
    deploy_kernel(env, "v2", OTHER)
    layout = StateLayout(env.sysroot)
    manifest = layout.read_manifest("v2")
    loaded: list[tuple[int, int, str]] = []

    def refuse(kernel_fd: int, initrd_fd: int, cmdline: str, flags: int = 0) -> None:
        loaded.append((os.fstat(kernel_fd).st_size, os.fstat(initrd_fd).st_size, cmdline))
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(syscalls, "kexec_file_load", refuse)
    with pytest.raises(BootError) as raised:
        kexec.load(layout, manifest, "console=ttyS0 overlayroot.kexec=v2")
    assert str(raised.value).startswith(
        f"deployment 'v2': its kernel {OTHER} ({layout.kernel_path(manifest)}) cannot be"
        f" loaded: {advice}"
    )
    assert loaded == [
        (
            os.stat(layout.kernel_path(manifest)).st_size,
            os.stat(layout.initramfs_path(manifest)).st_size,
            "console=ttyS0 overlayroot.kexec=v2",
        )
    ]


def test_a_kernel_file_that_is_a_symlink_is_not_followed(env: Env) -> None:
    deploy_kernel(env, "v2", OTHER)
    layout = StateLayout(env.sysroot)
    manifest = layout.read_manifest("v2")
    path = Path(layout.kernel_path(manifest))
    path.unlink()
    path.symlink_to("/bin/sh")
    with pytest.raises(
        BootError,
        match=r"deployment 'v2': cannot open .*/vmlinuz: Too many"
        " levels of symbolic links",
    ):
        kexec.load(layout, manifest, "")


def test_a_reboot_that_fails_leaves_the_state_writable_again(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def fail(command: int) -> None:
        # The state filesystem is read-only by now: nothing unwritten is left for a reboot.
        assert os.statvfs(env.sysroot).f_flag & os.ST_RDONLY
        calls.append(command)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(syscalls, "reboot", fail)
    with pytest.raises(BootError, match=r"^reboot\(2\) failed: Invalid argument$"):
        kexec.restart(str(env.sysroot), syscalls.RB_KEXEC)
    assert calls == [syscalls.RB_KEXEC]
    assert not os.statvfs(env.sysroot).f_flag & os.ST_RDONLY
    Path(env.sysroot / "still-writable").write_text("yes")


def test_kexec_file_load_reports_the_kernels_errno() -> None:
    """The real system call, with a file that is no kernel: the host's kernel refuses it
    (ENOEXEC), has no such call (ENOSYS) or forbids it (EPERM), and says so as an OSError."""
    with open("/bin/sh", "rb") as f, pytest.raises(OSError) as raised:
        syscalls.kexec_file_load(f.fileno(), -1, "", syscalls.KEXEC_FILE_NO_INITRAMFS)
    assert raised.value.errno in (errno.ENOEXEC, errno.ENOSYS, errno.EPERM)
    assert raised.value.strerror == os.strerror(raised.value.errno or 0)


def test_a_reboot_that_fails_when_the_state_cannot_be_made_writable_again_says_both(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_mount = syscalls.mount
    remounts: list[int] = []

    def mount(
        source: str | None,
        target: str,
        fstype: str | None = None,
        flags: int = 0,
        data: str | None = None,
    ) -> None:
        remounts.append(flags)
        if not flags & syscalls.MS_RDONLY:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), target)
        real_mount(source, target, fstype, flags, data)

    def fail(command: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(syscalls, "mount", mount)
    monkeypatch.setattr(syscalls, "reboot", fail)
    try:
        with pytest.raises(
            BootError,
            match=r"^reboot\(2\) failed: Invalid argument; and the"
            " state filesystem stays read-only: Read-only file system$",
        ):
            kexec.restart(str(env.sysroot), syscalls.RB_KEXEC)
    finally:
        real_mount(None, str(env.sysroot), None, syscalls.MS_REMOUNT)
    assert remounts == [syscalls.MS_REMOUNT | syscalls.MS_RDONLY, syscalls.MS_REMOUNT]


def test_kexec_file_load_on_a_machine_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.uname()

    class Uname:
        machine = "s390x"
        release = real.release

    monkeypatch.setattr(os, "uname", Uname)
    with pytest.raises(OSError, match="kexec_file_load: no such system call on s390x"):
        syscalls.kexec_file_load(0, -1, "")
