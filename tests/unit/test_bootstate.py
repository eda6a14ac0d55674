"""The boot state policy: exhaustive examples and properties over random states."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlayroot.core.bootstate import (
    USED_UP,
    BootState,
    Entry,
    StateError,
    add,
    bless,
    candidates,
    counts,
    default,
    last_resort,
    mark_bad,
    mark_used_up,
    needs_verification,
    plan,
    rebuild,
    rollback_target,
    set_default,
    set_once,
    start_attempt,
    sync,
    verified,
)

ids = st.sampled_from(["a", "b", "c", "d", "e"])
entries = st.builds(
    Entry,
    priority=st.integers(-5, 5),
    tries_left=st.none() | st.integers(0, 4),
    successful=st.booleans(),
    bad=st.none() | st.text(max_size=10) | st.just(USED_UP),
    pinned=st.booleans(),
    verified=st.booleans(),
)
states = st.builds(
    BootState,
    st.dictionaries(ids, entries, max_size=5),
    st.integers(0, 1000),
    st.none() | ids,
)


def boot_until_stable(state: BootState, tries: int, good: set[str]) -> tuple[list[str], str]:
    """Simulate boots: each boot takes the first candidate; a deployment in ``good`` is blessed
    when it boots, any other fails (hang, panic: the try is simply used up)."""
    booted = []
    for _ in range(50):
        order = candidates(state)
        assert order, "nothing bootable"
        chosen = order[0]
        state, _trial = start_attempt(state, chosen, tries)
        booted.append(chosen)
        if chosen in good:
            return booted, chosen
    raise AssertionError(f"never settled: {booted}")


def test_a_good_update_is_tried_then_blessed() -> None:
    state = add(BootState({"v1": Entry(priority=1, successful=True)}), "v2")
    assert candidates(state) == ["v2", "v1"]
    state, trial = start_attempt(state, "v2", tries=3)
    assert trial and state.entries["v2"].tries_left == 2
    state = bless(state, "v2")
    state, trial = start_attempt(state, "v2", tries=3)
    assert not trial and state.entries["v2"].tries_left == 2
    assert default(state) == "v2" and rollback_target(state, "v2") == "v1"


@pytest.mark.parametrize("tries", [1, 2, 3, 5])
def test_a_bad_update_falls_back_after_exactly_tries_boots(tries: int) -> None:
    state = add(BootState({"v1": Entry(priority=1, successful=True)}), "v2")
    booted, settled = boot_until_stable(state, tries, good={"v1"})
    assert booted == ["v2"] * tries + ["v1"]
    assert settled == "v1"


def test_mark_bad_removes_from_candidates_and_keeps_the_reason() -> None:
    state = add(BootState({"v1": Entry(priority=1, successful=True)}), "v2")
    state = mark_bad(state, "v2", "image does not mount")
    assert candidates(state) == ["v1"]
    assert state.entries["v2"].bad == "image does not mount"


def test_set_default_gives_a_failed_deployment_a_fresh_trial() -> None:
    state = mark_bad(BootState({"v1": Entry(1, successful=True), "v2": Entry(2)}), "v2", "x")
    state = set_default(state, "v2")
    assert candidates(state)[0] == "v2" and state.entries["v2"].bad is None
    state = set_default(state, "v1")
    assert candidates(state) == ["v1", "v2"]


def test_once_boots_first_a_single_time() -> None:
    state = set_once(
        BootState({"v1": Entry(1, successful=True), "v2": Entry(2, successful=True)}), "v1"
    )
    assert candidates(state) == ["v1", "v2"]
    state, _ = start_attempt(state, "v1", 3)
    assert state.once is None and candidates(state) == ["v2", "v1"]
    with pytest.raises(KeyError):
        set_once(state, "nope")


def test_sync_forgets_missing_and_adds_unknown_below_all() -> None:
    state = BootState({"v1": Entry(5, successful=True), "gone": Entry(9)}, once="gone")
    synced = sync(state, ["v1", "manual"])
    assert set(synced.entries) == {"v1", "manual"}
    assert synced.once is None
    assert candidates(synced) == ["v1", "manual"]


def test_rebuild_keeps_what_history_knows() -> None:
    state = rebuild(
        [("old", "2024-01-01"), ("new", "2025-01-01"), ("mid", "2024-06-01")],
        blessed={"old"},
        bad={"new": "kernel panic"},
    )
    assert state.entries["old"].successful
    assert state.entries["new"].bad == "kernel panic"
    assert candidates(state) == ["mid", "old"]


def test_rebuild_never_leaves_nothing_bootable() -> None:
    state = rebuild([("a", "1"), ("b", "2")], blessed=set(), bad={"a": "x", "b": "y"})
    assert candidates(state) == ["b"]


@given(states)
def test_json_round_trip(state: BootState) -> None:
    assert BootState.from_json(state.to_json()) == state


@given(states, st.integers(0, 10_000))
def test_any_damage_to_the_file_is_detected(state: BootState, where: int) -> None:
    text = state.to_json()
    cut = text[: where % len(text)]
    if cut.rstrip() != text.rstrip():  # losing only the final newline loses nothing
        with pytest.raises(StateError):
            BootState.from_json(cut)
    position = where % len(text)
    flipped = text[:position] + chr(ord(text[position]) ^ 1) + text[position + 1 :]
    with contextlib.suppress(StateError):
        assert BootState.from_json(flipped) == state  # only white space may flip harmlessly


@pytest.mark.parametrize("text", ["", "{}", "[]", "null", '{"format": 1}', "\0\0\0", "garbage"])
def test_garbage_is_a_state_error(text: str) -> None:
    with pytest.raises(StateError):
        BootState.from_json(text)


@settings(max_examples=500)
@given(states, st.integers(1, 5))
def test_a_candidate_always_gets_closer_to_not_being_tried(state: BootState, tries: int) -> None:
    """Termination: every boot of an unblessed deployment uses up a try, so a machine whose
    updates all fail settles on a good deployment (or runs out) after finitely many boots."""
    for deployment_id in candidates(state):
        after, trial = start_attempt(state, deployment_id, tries)
        before = state.entries[deployment_id]
        entry = after.entries[deployment_id]
        if trial:
            left = tries if before.tries_left is None else before.tries_left
            assert entry.tries_left == max(left - 1, 0)  # a one-shot may boot one with none
        else:
            assert entry.successful


@settings(max_examples=500)
@given(states, st.integers(1, 4))
def test_a_successful_deployment_is_never_lost_to_failing_updates(
    state: BootState, tries: int
) -> None:
    good = {k for k, e in state.entries.items() if e.successful}
    if not good:
        return
    booted, settled = boot_until_stable(state, tries, good)
    assert settled in good
    # No deployment boots more times than its tries, unless it is good.
    for k in set(booted) - good:
        e = state.entries[k]
        limit = (tries if e.tries_left is None else e.tries_left) + (1 if state.once == k else 0)
        assert booted.count(k) <= max(limit, 1)


@given(states)
def test_candidates_are_exactly_the_bootable_ones_plus_once(state: BootState) -> None:
    order = candidates(state)
    assert len(order) == len(set(order))
    bootable = {k for k, e in state.entries.items() if e.bootable}
    assert set(order) - bootable <= ({state.once} if state.once else set())
    assert bootable <= set(order)


@given(states, ids)
def test_policy_functions_do_not_modify_their_argument(state: BootState, k: str) -> None:
    snapshot = BootState.from_json(state.to_json())
    if k in state.entries:
        mark_bad(state, k, "x")
        bless(state, k)
        set_default(state, k)
        start_attempt(state, k, 3)
    add(state, "new")
    sync(state, ["a"])
    assert state == snapshot


def test_used_up_trials_are_marked_bad_once_with_the_reason() -> None:
    state = BootState(
        {
            "v1": Entry(1, successful=True),
            "v2": Entry(2, tries_left=0),
            "v3": Entry(3, tries_left=0, bad="digest"),
        }
    )
    marked, used_up = mark_used_up(state)
    assert used_up == ["v2"]
    assert marked.entries["v2"].bad == USED_UP
    assert marked.entries["v3"].bad == "digest"
    assert mark_used_up(marked)[1] == []


# -- the plan of a boot, verification, and the last resort -------------------------------------


@given(states, st.none() | ids)
def test_the_plan_is_the_chosen_one_then_the_candidates(
    state: BootState, chosen: str | None
) -> None:
    order = plan(state, chosen)
    if chosen in state.entries:
        assert order[0] == chosen and not counts(chosen, chosen)
        assert order[1:] == [k for k in candidates(state) if k != chosen]
    else:
        assert order == candidates(state)  # a choice that is not on disk changes nothing
    assert all(counts(k, chosen) for k in order if k != chosen)


@given(entries)
def test_an_image_is_hashed_until_a_check_passed_and_never_once_known_good(entry: Entry) -> None:
    assert needs_verification(entry) == (not entry.successful and not entry.verified)


@given(states, ids)
def test_a_passed_check_is_all_verified_changes(state: BootState, k: str) -> None:
    if k not in state.entries:
        return
    after = verified(state, k)
    assert after.entries[k] == state.entries[k].replace(verified=True)
    assert {j: e for j, e in after.entries.items() if j != k} == {
        j: e for j, e in state.entries.items() if j != k
    }


@given(states, st.none() | ids, st.sets(ids))
def test_the_last_resort_offers_every_untried_deployment_last_started_first(
    state: BootState, last: str | None, tried: set[str]
) -> None:
    order = last_resort(state, last, tried)
    assert sorted(order) == sorted(set(state.entries) - tried)
    if last in order:
        assert order[0] == last
    rest = [k for k in order if k != last]
    used_up = [k for k in rest if state.entries[k].bad == USED_UP]
    assert rest[: len(used_up)] == used_up  # those that reached their init before the others


def test_the_last_resort_prefers_what_last_reached_its_init_then_newest() -> None:
    state = BootState(
        {
            "v1": Entry(1, tries_left=0, bad=USED_UP),
            "v2": Entry(2, tries_left=0, bad="image does not mount"),
            "v3": Entry(3, tries_left=0, bad=USED_UP),
        }
    )
    assert last_resort(state, None, set()) == ["v3", "v1", "v2"]
    assert last_resort(state, "v1", set()) == ["v1", "v3", "v2"]
    assert last_resort(state, "v1", {"v1"}) == ["v3", "v2"]


def test_a_factory_deployment_registered_known_good_is_not_a_trial() -> None:
    state = add(BootState(), "factory", known_good=True)
    entry = state.entries["factory"]
    assert entry.successful and entry.verified
    assert start_attempt(state, "factory", 3)[1] is False


def test_a_state_written_before_verified_existed_reads_as_unverified() -> None:
    text = BootState({"v1": Entry(1, tries_left=2)}).to_json()
    import binascii
    import json

    data = json.loads(text)
    del data["crc32"], data["deployments"]["v1"]["verified"]
    body = json.dumps(data, indent=2, sort_keys=True)
    old = f'{body[:-2]},\n  "crc32": "{binascii.crc32(body.encode()):08x}"\n}}\n'
    assert BootState.from_json(old).entries["v1"] == Entry(1, tries_left=2, verified=False)
