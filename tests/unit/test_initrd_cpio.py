"""The newc writer: what the real cpio and the kernel's format expect, byte for byte."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from initrd.cpio import Header, Member, read_cpio, write_cpio
from initrd.tree import Tree, TreeError, write_directory

MEMBERS = [
    Member.directory("dev"),
    Member.char_device("dev/console", 5, 1),
    Member.directory("usr"),
    Member.directory("usr/bin"),
    Member.file("usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
    Member.file("empty", b""),
    Member.symlink("bin", "usr/bin"),
]


def archive(members: list[Member], mtime: int = 0) -> bytes:
    out = io.BytesIO()
    write_cpio(out, members, mtime)
    return out.getvalue()


def test_header_is_110_ascii_bytes() -> None:
    assert Header.sizeof() == 110
    data = archive([Member.file("a", b"x")])
    assert data.startswith(b"070701")
    assert data[6:110].decode().isalnum()


def test_archive_reads_back_with_own_parser() -> None:
    assert list(read_cpio(archive(MEMBERS))) == MEMBERS


@given(
    st.lists(
        st.tuples(st.text("abcxyz_.", min_size=1, max_size=13), st.binary(max_size=9)),
        max_size=6,
        unique_by=lambda t: t[0],
    )
)
def test_every_entry_is_aligned_and_round_trips(entries: list[tuple[str, bytes]]) -> None:
    members = [Member.file(f"f{name}", data) for name, data in entries]
    data = archive(members)
    assert len(data) % 4 == 0
    assert list(read_cpio(data)) == members


def test_same_members_give_same_bytes_and_mtime_is_recorded() -> None:
    assert archive(MEMBERS) == archive(MEMBERS)
    assert archive(MEMBERS, 1700000000) != archive(MEMBERS)
    header = Header.parse(archive(MEMBERS, 1700000000))
    assert (header.mtime, header.uid, header.gid, header.ino) == (1700000000, 0, 0, 1)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is not installed")
def test_gnu_cpio_lists_and_extracts_the_same_tree(tmp_path: Path) -> None:
    members = MEMBERS if os.geteuid() == 0 else [m for m in MEMBERS if m.name != "dev/console"]
    data = archive(members, 1234567890)
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True)
    assert listing.stdout.decode().split() == [m.name for m in members]

    extracted = tmp_path / "x"
    extracted.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=data, cwd=extracted, check=True)
    expected = tmp_path / "expected"
    expected.mkdir()
    write_directory(expected, members)
    assert snapshot(extracted) == snapshot(expected)
    assert (extracted / "usr/bin/tool").stat().st_mtime == 1234567890


def snapshot(root: Path) -> dict[str, tuple[int, bytes | str | int]]:
    result: dict[str, tuple[int, bytes | str | int]] = {}
    for path in sorted(root.rglob("*")):
        st_ = path.lstat()
        name = str(path.relative_to(root))
        if stat.S_ISLNK(st_.st_mode):
            result[name] = (st_.st_mode, os.readlink(path))
        elif stat.S_ISREG(st_.st_mode):
            result[name] = (st_.st_mode, path.read_bytes())
        else:
            result[name] = (st_.st_mode, st_.st_rdev)
    return result


def test_tree_resolves_parents_through_its_links() -> None:
    tree = Tree()
    tree.add_symlink("/lib", "usr/lib")
    tree.add_file("/lib/modules/6.1/a.ko", b"ko")
    names = [m.name for m in tree.members()]
    assert names == [
        "lib",
        "usr",
        "usr/lib",
        "usr/lib/modules",
        "usr/lib/modules/6.1",
        "usr/lib/modules/6.1/a.ko",
    ]


def test_tree_refuses_two_different_entries_at_one_path() -> None:
    tree = Tree()
    tree.add_file("/a", b"1")
    tree.add_file("/a", b"1")
    with pytest.raises(TreeError, match="/a"):
        tree.add_file("/a", b"2")
    with pytest.raises(TreeError, match="/a: wanted a directory"):
        tree.mkdir("/a/b")
