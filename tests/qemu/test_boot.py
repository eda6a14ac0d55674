"""Issue 2 end to end: our initramfs boots deployments from a state disk under QEMU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from qemu.disks import partition_offset, read_file
from qemu.machine import Machine
from qemu.plugin import MachineFactory
from tests.qemu.stage import (
    BASE,
    FS_LABEL,
    FS_UUID,
    PARTLABEL,
    PARTUUID,
    disk_from,
    make_root,
    state_content,
    state_disk,
)

BOOT_TIMEOUT = 120  # seconds of TCG time from power-on to the test init's last word


def boot(
    machine: MachineFactory, initramfs: Path, disk: Path, extra: str = "", name: str = "boot"
) -> Machine:
    m = machine(initrd=initramfs, disks=[disk], cmdline=f"{BASE} {extra}", name=name)
    m.start()
    m.wait_for(
        "OVERLAYROOT-TEST done",
        BOOT_TIMEOUT,
        failure=("Kernel panic - not syncing", "Attempted to kill init", "overlayroot: error:"),
    )
    m.wait_exit(30)
    return m


@pytest.mark.parametrize("fmt", ["erofs", "squashfs"])
def test_boots_a_read_only_image_with_writable_etc(
    machine: MachineFactory, initramfs: Path, tmp_path: Path, fmt: str
) -> None:
    disk = state_disk(tmp_path, [("v1", fmt, make_root(tmp_path))])
    m = boot(machine, initramfs, disk)
    markers = m.markers()
    assert markers["root_ro"] == "yes"
    assert markers["root_write_error"] == "Read-only file system"
    assert markers["etc_writable"] == "yes"
    assert markers["init_nice"] == "0"  # the stage ran hurried; the real init does not
    assert markers["mount_root"].split()[1] == fmt
    assert markers["mount_etc"].startswith("overlay overlay")
    booted = json.loads(markers["booted_json"])
    assert (booted["deployment"], booted["lower"], booted["device"]) == ("v1", fmt, "/dev/vda1")
    assert "switching root to v1 (/sbin/init)" in m.console
    assert "Traceback" not in m.console


def test_etc_var_home_survive_a_reboot_and_the_image_does_not_change(
    machine: MachineFactory, initramfs: Path, tmp_path: Path
) -> None:
    disk = state_disk(tmp_path, [("v1", "erofs", make_root(tmp_path))])
    offset = partition_offset(disk)
    image_path = "/overlayroot/deployments/v1/root.erofs"
    before = hashlib.sha256(read_file(disk, offset, image_path)).hexdigest()

    first = boot(machine, initramfs, disk, "test.write=token-1", name="write")
    assert {first.markers()[f"write_{d}"] for d in ("etc", "var", "home")} == {"ok"}
    assert first.markers()["write_root"] == "Read-only file system"

    second = boot(machine, initramfs, disk, "test.read=1", name="read")
    markers = second.markers()
    assert (markers["etc_token"], markers["var_token"], markers["home_token"]) == (
        "token-1",
        "token-1",
        "token-1",
    )
    assert markers["var_seed"] == "seeded-from-image"  # the empty /var was seeded once

    after = hashlib.sha256(read_file(disk, offset, image_path)).hexdigest()
    manifest = json.loads(read_file(disk, offset, "/overlayroot/deployments/v1/manifest.json"))
    assert before == after == manifest["sha256"]
    assert read_file(disk, offset, "/overlayroot/etc/v1/upper/test-token") == b"token-1\n"


@pytest.mark.parametrize(
    "spec",
    [f"LABEL={FS_LABEL}", f"UUID={FS_UUID}", f"PARTUUID={PARTUUID}", f'"PARTLABEL={PARTLABEL}"'],
)
def test_the_state_device_is_found_by_every_kind_of_spec(
    machine: MachineFactory, initramfs: Path, tmp_path: Path, spec: str
) -> None:
    disk = state_disk(tmp_path, [("v1", "erofs", make_root(tmp_path))])
    # overlayroot.state= comes after root= and wins; root= names a label that does not exist.
    m = machine(
        initrd=initramfs,
        disks=[disk],
        cmdline=f"{BASE.replace(FS_LABEL, 'wrong')} overlayroot.state={spec}",
    )
    m.start()
    m.wait_for("OVERLAYROOT-TEST done", BOOT_TIMEOUT, failure=("overlayroot: error:",))
    assert json.loads(m.markers()["booted_json"])["device"] == "/dev/vda1"


def expect_error(
    machine: MachineFactory, initramfs: Path, disk: Path, cmdline: str, message: str
) -> Machine:
    """The boot stops with ``message`` on the console, no traceback, and the machine powers
    off by itself."""
    m = machine(initrd=initramfs, disks=[disk], cmdline=f"{BASE} {cmdline}")
    m.start()
    m.wait_for("overlayroot: error: ", BOOT_TIMEOUT, failure=("OVERLAYROOT-TEST done",))
    m.wait_for("overlayroot: powering off", 30)
    m.wait_exit(30)
    assert message in m.console, m.console[-3000:]
    assert "Traceback" not in m.console
    assert "internal error" not in m.console
    assert "Kernel panic" not in m.console
    return m


@pytest.fixture
def good_disk(tmp_path: Path) -> Path:
    return state_disk(tmp_path, [("v1", "erofs", make_root(tmp_path))])


def test_a_label_that_never_appears(
    machine: MachineFactory, initramfs: Path, good_disk: Path
) -> None:
    m = expect_error(
        machine,
        initramfs,
        good_disk,
        "overlayroot.state=LABEL=missing overlayroot.timeout=2",
        "overlayroot: error: the state device LABEL=missing did not appear"
        " within 2 s. Block devices seen:",
    )
    assert f"/dev/vda1 ext4 LABEL={FS_LABEL} UUID={FS_UUID} PARTUUID={PARTUUID}" in m.console


def test_a_pin_to_a_deployment_not_on_the_disk_boots_the_usual_candidates(
    machine: MachineFactory, initramfs: Path, good_disk: Path
) -> None:
    # A bootloader entry still naming a deployment that gc removed must not brick the machine.
    m = boot(machine, initramfs, good_disk, "overlayroot.deployment=v7")
    assert json.loads(m.markers()["booted_json"])["deployment"] == "v1"
    assert (
        "overlayroot: warning: deployment 'v7' (overlayroot.deployment=) is not on"
        " /dev/vda1; booting the usual candidates instead (deployments there: v1)"
    ) in (m.console)


def test_an_image_that_is_not_a_filesystem(
    machine: MachineFactory, initramfs: Path, tmp_path: Path
) -> None:
    # An image whose manifest matches it, but which is no filesystem: it passes the digest
    # check and fails at the mount.
    content = state_content(tmp_path, [("v1", "erofs", make_root(tmp_path))])
    junk = b"not a filesystem\n" * 4000
    (content / "overlayroot/deployments/v1/root.erofs").write_bytes(junk)
    manifest_path = content / "overlayroot/deployments/v1/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"] = hashlib.sha256(junk).hexdigest()
    manifest["blake2b"] = hashlib.blake2b(junk, digest_size=32).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    disk = disk_from(tmp_path, content)
    m = expect_error(
        machine,
        initramfs,
        disk,
        "",
        "deployment 'v1': its image /run/overlayroot/state/overlayroot/deployments/"
        "v1/root.erofs does not mount as erofs",
    )
    assert "no deployment on /dev/vda1 could boot" in m.console


def test_an_image_damaged_after_deployment_fails_its_digest_check(
    machine: MachineFactory, initramfs: Path, tmp_path: Path
) -> None:
    content = state_content(tmp_path, [("v1", "erofs", make_root(tmp_path))])
    image = content / "overlayroot/deployments/v1/root.erofs"
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    expect_error(
        machine,
        initramfs,
        disk_from(tmp_path, content),
        "",
        "deployment 'v1': its image /sysroot/overlayroot/deployments/v1/root.erofs fails"
        " its digest check",
    )


def test_a_deployment_without_init(
    machine: MachineFactory, initramfs: Path, tmp_path: Path
) -> None:
    disk = state_disk(tmp_path, [("noinit", "erofs", make_root(tmp_path, with_init=False))])
    expect_error(
        machine,
        initramfs,
        disk,
        "",
        "deployment 'noinit' has no executable /sbin/init: the image needs /sbin/init,"
        " or name its init with init= on the command line",
    )


def test_a_malformed_option(machine: MachineFactory, initramfs: Path, good_disk: Path) -> None:
    expect_error(
        machine,
        initramfs,
        good_disk,
        "overlayroot.etc=sometimes",
        "overlayroot: error: overlayroot.etc=sometimes is not one of: persistent,"
        " transient, readonly",
    )


SHELL_PROMPT = "overlayroot# "
# busybox sh prints this once it runs, with the console's tty open: what is typed from then on
# reaches it (the prompt itself ends no line, and wait_for reads whole lines).
SHELL_READY = "Enter 'help' for a list of built-in commands."


def test_a_break_stops_in_busybox_sh_and_exiting_it_goes_on_with_the_boot(
    machine: MachineFactory, initramfs: Path, good_disk: Path
) -> None:
    """overlayroot.break=prepare: the rescue shell (busybox, which the builder found on this
    host) opens with the state filesystem mounted and nothing chosen yet; a command typed there
    runs; exiting goes on to the deployment's init."""
    m = machine(
        initrd=initramfs,
        disks=[good_disk],
        cmdline=f"{BASE} overlayroot.break=prepare",
        name="break",
    )
    with m:
        m.wait_for(
            "overlayroot: overlayroot.break=prepare: stopped before choosing, counting and"
            " assembling a deployment",
            BOOT_TIMEOUT,
        )
        m.wait_for("rescue shell (busybox sh); to go on with the boot: exit or Ctrl-D", 10)
        m.wait_for(SHELL_READY, 30)
        m.send("ls /sysroot/overlayroot/deployments; echo typed-$((6 * 7))\n")
        m.wait_for("typed-42", 30)
        assert "switching root" not in m.console
        m.send("exit\n")
        m.wait_for(
            "OVERLAYROOT-TEST done",
            BOOT_TIMEOUT,
            failure=("Kernel panic - not syncing", "overlayroot: error:"),
        )
        m.wait_exit(30)
    console = m.console
    shell = console.index("typed-42")
    assert "v1" in console[console.index(SHELL_PROMPT) : shell]  # what ls listed
    assert shell < console.index("switching root to v1 (/sbin/init)")
    assert json.loads(m.markers()["booted_json"])["deployment"] == "v1"


def test_a_failed_boot_with_onfail_shell_says_what_failed_in_the_shell(
    machine: MachineFactory, initramfs: Path, tmp_path: Path
) -> None:
    disk = state_disk(tmp_path, [("noinit", "erofs", make_root(tmp_path, with_init=False))])
    m = machine(
        initrd=initramfs,
        disks=[disk],
        cmdline=f"{BASE} overlayroot.onfail=shell",
        name="onfail-shell",
    )
    with m:
        m.wait_for(
            "overlayroot: the boot failed: no deployment on /dev/vda1 could boot",
            BOOT_TIMEOUT,
            failure=("Kernel panic - not syncing",),
        )
        m.wait_for("rescue shell (busybox sh); to reboot: exit or Ctrl-D", 10)
        m.wait_for(SHELL_READY, 30)
        # The shell echoes what is typed: the marker is made by the command, not typed whole.
        m.send("cat /sysroot/overlayroot/boot.json > /dev/null && echo state-$((1 + 1))-read\n")
        m.wait_for("state-2-read", 30)
        m.send("exit\n")
        m.wait_for("overlayroot: rebooting in 10 s", 30)
        assert m.wait_exit(60) == 0  # -no-reboot: the reboot ends QEMU
