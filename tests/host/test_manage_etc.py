"""``overlayroot etc diff`` for real: an /etc overlay edited through the mounted overlay, compared
with the deployment's image (loop-mounted in a private namespace, or a tree)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.host.conftest import System


def edit_etc(system: System) -> None:
    etc = system.env.sysroot / "etc"
    (etc / "hostname").write_text("edited\n")  # modified
    (etc / "release").unlink()  # deleted: a whiteout
    (etc / "new.conf").write_text("new\n")  # added
    (etc / "new.d").mkdir()
    (etc / "new.d/a.conf").write_text("a\n")  # added, below an added directory
    shutil.rmtree(etc / "skel")
    (etc / "skel").mkdir()  # opaque: the image's skel/ files are gone
    (etc / "skel/mine").write_text("mine\n")
    os.utime(etc / "motd")  # copied up? no: a touch of the merged file changes only times
    os.chmod(etc / "issue", 0o600)  # modified: mode only


@pytest.mark.parametrize("fmt", ["erofs", "squashfs", "dir"])
def test_etc_diff_of_the_booted_deployment(system: System, fmt: str) -> None:
    tree = system.tree("v1")
    for name in ("motd", "issue"):
        (tree / "etc" / name).write_text(f"{name}\n")
    (tree / "etc/skel").mkdir()
    (tree / "etc/skel/.profile").write_text("profile\n")
    system.ok(
        "deploy", "--sysroot", str(system.env.sysroot), "--id", "v1", "--format", fmt, str(tree)
    )
    system.boot()
    assert system.ok("etc", "diff") == "no changes to /etc in v1\n"
    edit_etc(system)
    out = system.ok("etc", "diff")
    assert out.splitlines() == [
        "M /etc/hostname",
        "M /etc/issue",
        "A /etc/new.conf",
        "A /etc/new.d",
        "A /etc/new.d/a.conf",
        "D /etc/release",
        "D /etc/skel/.profile",
        "A /etc/skel/mine",
    ]
    data = json.loads(system.ok("etc", "diff", "--json"))
    assert data["deployment"] == "v1"
    assert data["deleted"] == ["/etc/release", "/etc/skel/.profile"]
    assert data["modified"] == ["/etc/hostname", "/etc/issue"]


def test_etc_diff_of_another_deployment_offline(system: System) -> None:
    system.env.deploy("v1")
    system.env.deploy("v2")
    upper = Path(system.state.etc_upper("v1"))
    (upper / "extra").write_text("x\n")
    os.mknod(upper / "hostname", 0o600 | 0o020000, 0)  # a whiteout, written by hand
    out = system.ok("etc", "diff", "v1", "--sysroot", str(system.env.sysroot))
    assert out.splitlines() == ["A /etc/extra", "D /etc/hostname"]
    # Without an id and without a booted system: the default.
    assert (
        system.ok("etc", "diff", "--sysroot", str(system.env.sysroot))
        == "no changes to /etc in v2\n"
    )


def test_etc_diff_of_an_image_that_does_not_mount(system: System) -> None:
    system.env.deploy("v1")
    image = Path(system.state.deployment_dir("v1")) / "root.erofs"
    image.write_bytes(b"\0" * 8192)
    (Path(system.state.etc_upper("v1")) / "x").write_text("x\n")
    err = system.fails("etc", "diff", "--sysroot", str(system.env.sysroot))
    assert f"cannot mount the image {image} of v1 read-only" in err
