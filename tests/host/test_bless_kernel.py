"""Deployments with kernels of their own in a booted system (issue 9): bless promotes the boot
pair, status shows each deployment's kernel and the pair's, gc takes a deployment's kernel with
it and never the pair's files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from overlayroot.commands import bootpair
from tests.host.conftest import System
from tests.kernelfakes import add_kernel

A, B = "6.1.0-27-cloud-amd64", "6.12.9+bpo-cloud-amd64"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kernel_tree(system: System, name: str, version: str | None) -> str:
    tree = system.tree(name)
    if version is not None:
        add_kernel(tree, version)
    return str(tree)


def test_bless_promotes_the_newest_good_kernel_and_gc_keeps_the_pair(system: System) -> None:
    system.ok(
        "deploy",
        "--sysroot",
        str(system.env.sysroot),
        "--id",
        "v1",
        "--karg",
        "quiet",
        kernel_tree(system, "v1", A),
    )
    system.boot()
    out = system.ok("bless")
    pair = Path(system.state.top) / "boot"
    assert f"overlayroot: the boot pair in {pair} promoted to the kernel {A} of v1" in out
    assert sha(pair / "vmlinuz") == sha(Path(system.state.deployment_dir("v1")) / "vmlinuz")
    status = system.status()
    assert [(d["id"], d["kernel"]) for d in status["deployments"]] == [("v1", A)]
    assert status["boot_pair"] == {
        "dir": str(pair),
        "deployment": "v1",
        "version": A,
        "complete": True,
        "recorded": "v1",
    }

    out = system.ok("deploy", "--id", "v2", kernel_tree(system, "v2", B))
    assert f"v2 has its own kernel {B} (kernel arguments: none)" in out
    table = system.ok("status")
    assert f"boot pair in {pair}: the kernel {A} of v1" in table  # v2 is on trial: not yet
    system.reboot()
    system.ok("bless")
    assert sha(pair / "vmlinuz") == sha(Path(system.state.deployment_dir("v2")) / "vmlinuz")
    v2 = Path(system.state.deployment_dir("v2"))
    assert sha(pair / "initrd.img") == sha(v2 / "initramfs.img")

    # A deployment without a kernel of its own leaves the pair on the newest good kernel.
    system.ok("deploy", "--id", "v3", kernel_tree(system, "v3", None))
    system.reboot()
    out = system.ok("bless")
    assert f"the boot pair in {pair} already holds the kernel {B} of v2" in out
    rows = system.ok("status").splitlines()
    assert rows[0].split()[8] == "KERNEL"
    assert [row.split()[8] for row in rows[1:4]] == ["running", B, A]  # "running kernel"

    # By hand, the pair goes back to v1's kernel; gc removes v1 (v2 is the rollback) with its
    # kernel, and the pair's files stay.
    assert f"promoted: the boot pair in {pair} holds the kernel {A} of v1" in system.ok(
        "promote", "v1"
    )
    pair_files = {n: sha(pair / n) for n in ("vmlinuz", "initrd.img")}
    system.ok("gc", "--keep", "1")
    assert system.state.deployment_ids() == ["v2", "v3"]
    assert {n: sha(pair / n) for n in pair_files} == pair_files
    assert (
        f"boot pair in {pair}: the kernel {A} of v1, a deployment no longer on the state filesystem"
    ) in system.ok("status")


def test_bless_uses_the_configured_boot_dir(
    system: System, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "boot-dir"
    esp = tmp_path / "esp" / "overlayroot"
    config.write_text(f"{esp}\n")
    monkeypatch.setattr(bootpair, "CONFIG", str(config))
    system.ok(
        "deploy", "--sysroot", str(system.env.sysroot), "--id", "v1", kernel_tree(system, "v1", A)
    )
    system.boot()
    assert f"the boot pair in {esp} promoted to the kernel {A} of v1" in system.ok("bless")
    assert (esp / "vmlinuz").exists() and not (Path(system.state.top) / "boot").exists()
    assert system.status()["boot_pair"]["dir"] == str(esp)
    config.write_text("relative/dir\n")
    assert (
        f"note: cannot tell what the boot pair holds: {config} holds 'relative/dir': write"
        " one absolute directory there, e.g. /boot/efi/overlayroot"
    ) in system.ok("status")
    err = system.fails("promote")
    assert f"overlayroot: error: {config} holds 'relative/dir'" in err
    config.write_bytes(b"/boot/\xff\n")
    assert (
        f"overlayroot: error: {config} is not UTF-8 text: write one absolute directory"
        " there, e.g. /boot/efi/overlayroot"
    ) in system.fails("promote")
    config.unlink()
    config.mkdir()
    assert (
        f"overlayroot: error: cannot read {config}: it is a directory, not a regular file:"
        " it names the boot pair's directory in one line"
    ) in system.fails("promote")
    config.rmdir()  # no file: the default place
    assert (
        f"promoted: the boot pair in {Path(system.state.top) / 'boot'} holds the kernel {A} of v1"
    ) in system.ok("promote")


def test_bless_that_cannot_write_the_pair_still_blesses_and_says_so(
    system: System, tmp_path: Path
) -> None:
    system.ok(
        "deploy", "--sysroot", str(system.env.sysroot), "--id", "v1", kernel_tree(system, "v1", A)
    )
    system.boot()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    err = system.fails("bless", "--boot-dir", str(blocker))
    assert (
        "overlayroot: error: blessed v1, but the boot pair was not updated: cannot promote"
        f" v1's kernel to the boot pair in {blocker}:"
    ) in err
    assert system.entries()["v1"].successful
