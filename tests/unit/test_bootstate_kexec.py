"""The boot rules when deployments carry kernels of their own: which step each candidate asks
of a boot, how the kexec'd boot counts, and a simulation of whole machines proving that no
kernel can loop and that a bad kernel falls back like any bad update."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from overlayroot.core.bootstate import (
    BOOT,
    DEGRADED,
    KEXEC,
    KNOWN_GOOD,
    REBOOT,
    TRIAL,
    USED_UP,
    WRONG_KERNEL,
    BootState,
    Entry,
    after_kexec,
    bless,
    counts,
    kernel_step,
    mark_bad,
    mark_used_up,
    plan,
    start_attempt,
)

kernels = st.sampled_from(["6.1.0-57-cloud-amd64", "6.12.95+deb12-cloud-amd64", "6.1.0-58"])
ids = st.sampled_from(["v1", "v2", "v3", "v4"])


@given(ids, st.none() | kernels, kernels, st.none() | ids)
def test_the_kernel_step_of_a_candidate(
    deployment: str, wanted: str | None, running: str, kexec_for: str | None
) -> None:
    step = kernel_step(deployment, wanted, running, kexec_for)
    if wanted is None or wanted == running:
        assert step == BOOT  # no kernel of its own, or this one: boot it here
    elif kexec_for is None:
        assert step == KEXEC  # started by the bootloader: switch
    elif kexec_for == deployment:
        assert step == WRONG_KERNEL  # switched for it, and still not its kernel
    else:
        assert step == REBOOT  # a kexec'd boot never switches again


def test_a_kexecd_boot_plans_its_deployment_first_and_takes_no_second_try() -> None:
    state = BootState({"v1": Entry(1, successful=True), "v2": Entry(2, tries_left=0)})
    # The stage before the kexec took v2's last try: v2 is not bootable by the usual rules...
    assert plan(state, None) == ["v1"]
    # ...but this boot is that try.
    assert plan(state, None, "v2") == ["v2", "v1"]
    assert not counts("v2", None, "v2") and counts("v1", None, "v2")
    marked, used_up = mark_used_up(state, "v2")
    assert used_up == [] and marked == state
    # The next boot through the firmware finds the try used up, as after any failed trial.
    assert mark_used_up(state)[0].entries["v2"].bad == USED_UP


def test_what_a_kexecd_boot_is() -> None:
    assert after_kexec(Entry(2, tries_left=1)) == TRIAL
    assert after_kexec(Entry(2, tries_left=0)) == TRIAL  # its last try, taken before the kexec
    assert after_kexec(Entry(2, successful=True, tries_left=0)) == KNOWN_GOOD
    assert after_kexec(Entry(2, tries_left=0, bad=USED_UP)) == DEGRADED  # only a last resort


# -- whole machines -----------------------------------------------------------------------------

FIRMWARE = "A"  # the kernel the bootloader loads
OUTCOMES = (
    "good",  # boots, is blessed
    "no-mount",  # its root fails to mount: marked bad in the same boot
    "crash",  # its root crashes after the hand-over: the try is used
    "kernel-unloadable",  # its kernel is refused by kexec_file_load: marked bad, same boot
    "kernel-panics",  # its kernel loads, then panics before any stage runs: a reset
    "kernel-lies",  # its manifest names a version its kernel file is not
)


def firmware_boot(
    state: BootState, kernel: dict[str, str | None], outcome: dict[str, str], tries: int
) -> tuple[BootState, list[str], str | None]:
    """One power-on, as the stage runs it (prepare.attempt), with kernels: returns the state,
    the kernels started (the bootloader's first) and the deployment that reached its init and
    stays up (None: the machine reset)."""
    running, kexec_for = FIRMWARE, None
    started = [running]
    while True:  # one pass per kernel started
        state, _ = mark_used_up(state, kexec_for)
        switched = False
        for d in plan(state, None, kexec_for):
            step = kernel_step(d, kernel[d], running, kexec_for)
            if step == REBOOT:
                return state, started, None
            if counts(d, None, kexec_for):
                state, _ = start_attempt(state, d, tries)
            if step == WRONG_KERNEL:
                state = mark_bad(state, d, "not the kernel its manifest names")
                continue
            if step == KEXEC:
                if outcome[d] == "kernel-unloadable":
                    state = mark_bad(state, d, outcome[d])
                    continue
                if outcome[d] == "kernel-panics":
                    return state, started, None
                wanted = kernel[d]
                assert wanted is not None
                running = "lie" if outcome[d] == "kernel-lies" else wanted
                kexec_for = d
                started.append(running)
                switched = True
                break
            if outcome[d] == "no-mount":
                state = mark_bad(state, d, outcome[d])
                continue
            if outcome[d] == "good":
                return bless(state, d), started, d
            return state, started, None  # crash: the try stays used
        if not switched:
            return state, started, None  # nothing bootable; the last resort is another test


machines = st.lists(
    st.tuples(st.sampled_from([None, "A", "B", "C"]), st.sampled_from(OUTCOMES)),
    min_size=1,
    max_size=4,
)


@settings(max_examples=500)
@given(machines, st.integers(1, 3))
def test_no_kernel_loops_and_a_bad_kernel_falls_back_like_a_bad_root(
    deployments: list[tuple[str | None, str]], tries: int
) -> None:
    """A known-good v0 under the bootloader's kernel, then updates with kernels of their own
    and any failure: every power-on starts at most two kernels, and the machine settles on a
    good deployment within ``tries`` boots per bad one, with no human action."""
    kernel: dict[str, str | None] = {"v0": None}
    outcome = {"v0": "good"}
    entries = {"v0": Entry(0, successful=True)}
    for priority, (k, result) in enumerate(deployments, 1):
        name = f"v{priority}"
        kernel[name], outcome[name] = k, result
        if result in ("kernel-unloadable", "kernel-panics", "kernel-lies") and k in (None, "A"):
            outcome[name] = "good"  # no switch: its kernel is never loaded
        entries[name] = Entry(priority)
    state = BootState(entries)
    up = []
    for _ in range(tries * len(deployments) + 1):
        state, started, booted = firmware_boot(state, kernel, outcome, tries)
        assert len(started) <= 2, started
        up.append(booted)
    settled = up[-1]
    assert settled is not None and outcome[settled] == "good"
    expected = max((k for k in outcome if outcome[k] == "good"), key=lambda k: int(k[1:]))
    assert settled == expected
    if settled != "v0" and kernel[settled] not in (None, FIRMWARE):
        # Until bless promotes its pair, the good deployment with its own kernel is reached
        # through a kexec at every boot, and only then.
        assert firmware_boot(state, kernel, outcome, tries)[1] == [FIRMWARE, kernel[settled]]


def test_a_kexecd_boot_whose_deployment_fails_reboots_for_the_others_kernel() -> None:
    kernel: dict[str, str | None] = {"v1": "A", "v2": "B"}
    outcome = {"v1": "good", "v2": "no-mount"}
    state = BootState({"v1": Entry(1, successful=True), "v2": Entry(2)})
    state, started, booted = firmware_boot(state, kernel, outcome, 3)
    # v2's kernel was started, its root failed there, and v1 needs the bootloader's kernel.
    assert (started, booted) == (["A", "B"], None)
    assert state.entries["v2"].bad == "no-mount"
    state, started, booted = firmware_boot(state, kernel, outcome, 3)
    assert (started, booted) == (["A"], "v1")
