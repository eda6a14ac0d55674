"""The pure parts of ``gc``: what it keeps and in which order it removes."""

from __future__ import annotations

from overlayroot.commands import manage
from overlayroot.core.bootstate import BootState, Entry


def state(**entries: Entry) -> BootState:
    return BootState(entries)


def test_gc_never_removes_the_booted_default_rollback_once_or_pinned() -> None:
    s = BootState(
        {
            "a": Entry(priority=1, pinned=True),
            "b": Entry(priority=2, successful=True),
            "c": Entry(priority=3),
            "d": Entry(priority=4, tries_left=0),
            "e": Entry(priority=5),
            "f": Entry(priority=6, tries_left=0),
            "g": Entry(priority=7, tries_left=0),
        },
        once="d",
    )
    created = {k: f"2024-01-0{i}" for i, k in enumerate("abcdefg", 1)}
    assert manage.protected(s, "c") == {
        "c": "booted",
        "e": "default",
        "b": "rollback",
        "d": "next boot",
        "a": "pinned",
    }
    assert manage.doomed(s, created, "c", 1) == ["f"]
    assert manage.doomed(s, created, "c", 7) == []


def test_gc_orders_by_creation_time_not_priority() -> None:
    s = BootState(
        {
            "old": Entry(priority=9, tries_left=0),
            "new": Entry(priority=1, tries_left=0),
            "default": Entry(priority=5, successful=True),
        }
    )
    created = {"old": "2020", "new": "2024", "default": "2023"}
    assert manage.doomed(s, created, None, 1) == ["old"]
