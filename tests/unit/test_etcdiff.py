"""``etc diff``: what was added, modified and deleted in an /etc upper."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from overlayroot.commands import etcdiff


def test_etc_diff_on_plain_directories(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for d in (lower / "sub", upper / "sub", lower / "was-dir"):
        d.mkdir(parents=True)
    (lower / "same").write_text("x")
    (upper / "same").write_text("x")
    (lower / "changed").write_text("x")
    (upper / "changed").write_text("y")
    (lower / "link").symlink_to("a")
    (upper / "link").symlink_to("b")
    (upper / "sub" / "new").write_text("n")
    (upper / "was-dir").write_text("now a file")
    assert etcdiff.diff(str(upper), str(lower)) == {
        "added": ["/sub/new"],
        "modified": ["/changed", "/link", "/was-dir"],
        "deleted": [],
    }


def test_etc_diff_without_the_lower_etc_is_all_added(tmp_path: Path) -> None:
    (tmp_path / "upper" / "d").mkdir(parents=True)
    (tmp_path / "upper" / "d" / "f").write_text("")
    assert etcdiff.diff(str(tmp_path / "upper"), str(tmp_path / "missing"))["added"] == [
        "/d",
        "/d/f",
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and trusted xattrs need root")
def test_etc_diff_understands_whiteouts_and_opaque_directories(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for d in (lower / "opaque", upper / "opaque"):
        d.mkdir(parents=True)
    (lower / "gone").write_text("x")
    (lower / "opaque" / "hidden").write_text("x")
    os.mknod(upper / "gone", 0o600 | 0o020000, 0)
    os.mknod(upper / "never-was", 0o600 | 0o020000, 0)
    os.setxattr(upper / "opaque", etcdiff.OPAQUE, b"y")
    (upper / "opaque" / "kept").write_text("k")
    assert etcdiff.diff(str(upper), str(lower)) == {
        "added": ["/opaque/kept"],
        "modified": [],
        "deleted": ["/gone", "/opaque/hidden"],
    }
