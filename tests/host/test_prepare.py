"""The boot flow on real mounts: counting before hand-over, fallback in the same boot,
recovery of a damaged boot state, and a counter that cannot be written."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from contextlib import redirect_stdout

import pytest

from overlayroot.boot.cmdline import parse_options
from overlayroot.boot.console import Console
from overlayroot.boot.prepare import prepare_root
from overlayroot.core import digest, statefile, syscalls
from overlayroot.core.bootstate import BootState, add, bless, mark_bad
from overlayroot.core.errors import BootError
from overlayroot.core.layout import StateLayout
from qemu.mounts import mounts_under
from tests.host.conftest import Env


def boot(env: Env, cmdline: str = "overlayroot.watchdog=0") -> tuple[dict[str, object], str]:
    """One boot's preparation; returns booted.json and the console, then undoes the mounts as
    a reboot would."""
    opts, _ = parse_options(cmdline)
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            prepare_root(str(env.sysroot), str(env.run), opts, "/dev/test", Console())
        booted = json.loads((env.run / "booted.json").read_text())
    finally:
        # A failed preparation has undone its own mounts; a finished one is taken apart here.
        if str(env.state) in mounts_under(env.run):
            for point in reversed(mounts_under(env.sysroot)):
                syscalls.umount(point, syscalls.MNT_DETACH)
            syscalls.mount(str(env.state), str(env.sysroot), None, syscalls.MS_MOVE)
    return booted, out.getvalue()


def state_of(env: Env) -> BootState:
    return BootState.from_json((env.sysroot / "overlayroot/boot.json").read_text())


def history(env: Env) -> list[dict[str, object]]:
    return statefile.read_history(StateLayout(env.sysroot))


def test_a_first_boot_is_a_trial_counted_before_hand_over(env: Env) -> None:
    env.deploy("v1")
    booted, console = boot(env, "overlayroot.tries=2 overlayroot.watchdog=0")
    assert booted["deployment"] == "v1" and booted["trial"] is True and booted["counted"] is True
    assert state_of(env).entries["v1"].tries_left == 1
    assert "trial boot of v1: 1 tries left" in console
    assert [e["event"] for e in history(env)] == ["boot"]


def test_an_unblessed_update_falls_back_after_its_tries(env: Env) -> None:
    env.deploy("v1")
    boot(env)
    layout = StateLayout(env.sysroot)
    state, _ = statefile.load(layout)
    statefile.save(layout, add(bless(state, "v1"), "v2"))
    env.deploy("v2")
    booted_ids = [
        boot(env, "overlayroot.tries=2 overlayroot.watchdog=0")[0]["deployment"] for _ in range(4)
    ]
    assert booted_ids == ["v2", "v2", "v1", "v1"]


@pytest.mark.parametrize("manifest", ["blake2b", "sha256 only", "blake2b, stage without it"])
def test_a_damaged_image_falls_back_in_the_same_boot(
    env: Env, manifest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage checks the manifest's BLAKE2b-256; a manifest written before it existed, or
    a stage whose Python has no ``_blake2``, checks the sha256."""
    env.deploy("v1")
    env.deploy("v2")
    layout = StateLayout(env.sysroot)
    state, _ = statefile.load(layout)
    statefile.save(layout, bless(state, "v1"))
    written = layout.read_manifest("v2")
    assert written.blake2b is not None
    if manifest == "sha256 only":
        written.blake2b = None
        (env.sysroot / "overlayroot/deployments/v2/manifest.json").write_text(written.to_json())
    if manifest == "blake2b, stage without it":
        monkeypatch.setattr(digest, "HAS_BLAKE2B", False)
    algorithm = "blake2b" if manifest == "blake2b" else "sha256"
    expected = getattr(written, algorithm)
    image = env.sysroot / "overlayroot/deployments/v2/root.erofs"
    image.write_bytes(b"\0" * image.stat().st_size)
    if algorithm == "blake2b":
        actual = hashlib.blake2b(image.read_bytes(), digest_size=32).hexdigest()
    else:
        actual = hashlib.sha256(image.read_bytes()).hexdigest()
    booted, console = boot(env)
    assert booted["deployment"] == "v1"
    assert booted["failed"][0]["deployment"] == "v2"  # type: ignore[index]
    message = (
        f"deployment 'v2': its image {env.sysroot}/overlayroot/deployments/v2/root.erofs fails"
        f" its digest check ({algorithm} {actual[:16]}…, manifest says {expected[:16]}…): the"
        " image is damaged; deploy it again"
    )
    assert message in console and "falling back to deployment v1" in console
    assert message in str(state_of(env).entries["v2"].bad)
    assert [e["event"] for e in history(env)][-2:] == ["failed", "boot"]


def test_a_pinned_deployment_boots_without_counting(env: Env) -> None:
    env.deploy("v1")
    env.deploy("v2")
    booted, _ = boot(env, "overlayroot.deployment=v1 overlayroot.watchdog=0")
    assert booted["deployment"] == "v1" and booted["trial"] is False


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage"])
def test_a_damaged_state_file_still_boots_and_says_so(env: Env, damage: str) -> None:
    env.deploy("v1")
    boot(env)  # writes boot.json and boot.json.prev
    boot(env)
    path = env.sysroot / "overlayroot/boot.json"
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    else:
        path.write_bytes(os.urandom(300))
    booted, console = boot(env)
    assert booted["deployment"] == "v1"
    assert "recovered the boot state from" in console
    assert booted["recovery"]
    assert [e["event"] for e in history(env)][-2:] == ["recovered", "boot"]


def test_both_state_files_lost_rebuilds_from_the_history(env: Env) -> None:
    env.deploy("v1")
    env.deploy("v2")
    layout = StateLayout(env.sysroot)
    statefile.append_history(layout, "blessed", "v1")
    statefile.append_history(layout, "failed", "v2", reason="kernel panic")
    for name in ("boot.json", "boot.json.prev"):  # deploy registers in boot.json
        (env.sysroot / "overlayroot" / name).unlink(missing_ok=True)
    booted, console = boot(env)
    assert booted["deployment"] == "v1"
    assert "rebuilt the boot state from the 2 deployments on disk" in console


def test_a_counter_that_cannot_be_written_is_reported_not_ignored(env: Env) -> None:
    env.deploy("v1")
    top = env.sysroot / "overlayroot"
    subprocess.run(["chattr", "+i", str(top)], check=True)  # no new file in it: no state write
    try:
        booted, console = boot(env)
    finally:
        subprocess.run(["chattr", "-i", str(top)], check=True)
    assert booted["deployment"] == "v1" and booted["trial"] is True
    assert booted["counted"] is False
    assert "this boot of v1 is NOT counted" in console
    assert "Operation not permitted" in str(booted["count_error"])


def test_a_read_only_state_filesystem_still_boots_uncounted_with_a_transient_etc(env: Env) -> None:
    env.deploy("v1")
    syscalls.mount(None, str(env.sysroot), None, syscalls.MS_REMOUNT | syscalls.MS_RDONLY)
    booted, console = boot(env)
    assert booted["deployment"] == "v1" and booted["counted"] is False
    assert booted["etc"] == "transient"
    assert "the /etc upper cannot be mounted" in console


def test_nothing_bootable_boots_the_last_started_deployment_degraded(env: Env) -> None:
    env.deploy("v1")
    env.deploy("v2")
    boot(env, "overlayroot.deployment=v1 overlayroot.watchdog=0")  # v1 reached its init last
    layout = StateLayout(env.sysroot)
    state, _ = statefile.load(layout)
    state = mark_bad(mark_bad(state, "v1", "hangs at boot"), "v2", "hangs at boot")
    statefile.save(layout, state)
    booted, console = boot(env)
    assert booted["deployment"] == "v1"
    assert booted["trial"] is False and booted["counted"] is None and booted["watchdog"] is None
    assert "nothing was bootable" in str(booted["degraded"])
    assert "DEGRADED boot as a last resort" in console and "v1: hangs at boot" in console
    assert state_of(env).entries["v1"].tries_left == 0  # no try taken from it
    assert history(env)[-1]["degraded"]


def test_nothing_bootable_and_no_last_resort_boots_is_a_clear_error(env: Env) -> None:
    env.deploy("v1", init=False)
    layout = StateLayout(env.sysroot)
    state, _ = statefile.load(layout)
    statefile.save(layout, mark_bad(state, "v1", "hangs at boot"))
    with pytest.raises(
        BootError,
        match="no deployment on /dev/test could boot, not even as a"
        r" last resort:\n  - deployment 'v1' has no executable /sbin/init",
    ):
        boot(env)


def test_no_state(env: Env) -> None:
    with pytest.raises(BootError, match="/dev/test holds no overlayroot state"):
        boot(env)
