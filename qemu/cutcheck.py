"""Hold every disk a power cut leaves behind to overlayroot's promises, on the host.

For each flush point of a recorded run (qemu/powercut.py), the disk is rebuilt as a cut there
leaves it (qemu/logwrites.py), its state partition is loop-mounted in a private mount namespace,
and:

1. what the cut left, before any boot: the fsynced ``/var`` and ``/home`` data is intact (every
   ``N`` in a journal has its ``data/N``); ``boot.json`` reads (recovered from
   ``boot.json.prev`` is fine, rebuilt from scratch is a loss when the operation started from a
   readable one); no deployment that was not known good has more tries than when the
   operation began, and no known-good one lost its bless; every bootable deployment's manifest
   reads and its image matches its sha256 (nothing half-staged is bootable);
2. the trial boot's own promises: once the root is handed over (the run's first marker), the
   try is on disk; and until the boot state records the image as verified, a boot verifies it
   (the image is damaged on a copy of the cut's disk, and the next boot must refuse it);
3. the next boot: ``prepare_root`` reaches a deployment that is known good or a counted trial,
   without failing over a half-staged one, and ``/var`` holds what the image seeds into it;
4. the next command cleans up: ``overlayroot gc`` succeeds and leaves no ``.staging-*`` or
   ``.removing-*`` directory, and ``overlayroot status`` works.

Each broken promise is a violation naming the cut: filesystem, run, log entry, operation.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import subprocess
import traceback
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from overlayroot.boot.cmdline import parse_options
from overlayroot.boot.console import Console
from overlayroot.boot.prepare import prepare_root
from overlayroot.commands.cli import main as overlayroot_cli
from overlayroot.core import bootstate, statefile, syscalls
from overlayroot.core.bootstate import BootState
from overlayroot.core.digest import image_sha256
from overlayroot.core.errors import BootError
from overlayroot.core.layout import StateLayout
from qemu.logwrites import Replayer, WriteLog, copy_sparse, read_log
from qemu.mounts import mounts_under
from qemu.powercut import (
    BLOB_BYTES,
    CMDLINE,
    SEED_FILES,
    STATE,
    Operation,
    Run,
    ScenarioError,
    operations,
    seed_content,
)

CLONE_NEWNS = 0x00020000
DATA_AREAS = ("var", "home")
# set-default gives a deployment not known good a fresh set of tries: adding them is its job.
ADDS_TRIES = ("set-default",)
DAMAGE = 4096  # bytes overwritten in the middle of an image to see whether a boot verifies it


def enter_private_mount_namespace() -> None:
    """Make every mount from here on private to this process (and gone with it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "unshare(CLONE_NEWNS)")
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)


class Kind(StrEnum):
    """The promise a violation breaks."""

    UNBOOTABLE = "unbootable"
    FAILOVER = "failed over a half-staged deployment"
    NOT_GOOD = "booted neither a known-good nor a counted trial"
    DATA = "fsynced data lost"
    STATE_LOST = "boot state lost"
    TRIES = "tries added"
    BLESS = "bless lost"
    HALF_STAGED = "half-staged deployment bootable"
    HANDOVER = "handed over before the try was on disk"
    VERIFY = "first-boot verification skipped"
    SEED = "/var seeding not atomic"
    CLEANUP = "the next command does not clean up"


@dataclass(frozen=True)
class Violation:
    kind: Kind
    message: str


@dataclass(frozen=True)
class Cut:
    run: Run
    operation: Operation
    index: int
    """The log entry the disk stands at; -1: as the run found it."""
    torn: bool
    """A cut between flushes: the writes since the last flush reached the disk up to ``index``
    (in order), the rest did not. Otherwise the cut is at a flush (or FUA) entry."""
    last_in_operation: bool

    def describe(self) -> str:
        if self.index < 0:
            at = "before its first write"
        else:
            at = f"{'between flushes ' if self.torn else ''}at log entry {self.index}"
        return f"{self.run.fs} {self.run.name} cut {at} ({self.operation.name})"


@dataclass
class Outcome:
    cut: Cut
    violations: list[Violation] = field(default_factory=list)
    lost_bytes: int = 0
    unbootable: bool = False
    state: BootState | None = None
    rebuilt: bool = False
    booted: str | None = None

    def add(self, kind: Kind, message: str) -> None:
        self.violations.append(Violation(kind, message))


def simulate(
    runs: list[Run], work: Path, every: int, progress: Callable[[Outcome], None] | None = None
) -> list[Outcome]:
    """Check the disk at every ``every``-th cut point of each run (and always at each
    operation's first and last one), in log order: ``cut_points`` says where."""
    outcomes = []
    checker = Checker(work)
    for run in runs:
        log = read_log(run.log)
        ops = operations(run, log)
        replay = Replayer(log, run.base, work / "replay.img")
        references: dict[Operation, Outcome] = {}
        base: Outcome | None = None
        for cut in sample(run, ops, cut_points(log), every):
            if cut.index >= 0:
                replay.advance(cut.index)
            outcome = checker.check(replay.image, cut, references.get(cut.operation), base)
            references.setdefault(cut.operation, outcome)
            if base is None:
                base = outcome
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome)
        replay.image.unlink()
    return outcomes


def cut_points(log: WriteLog) -> list[tuple[int, bool]]:
    """(entry, torn) of the cuts a log allows, in order: the disk as the run found it, every
    flush or FUA entry, and between two of them with two writes or more, halfway through those
    writes (a volatile cache may keep any part of what was not flushed; keeping the first half
    in order is one such part, and the one that tears a multi-write update)."""
    points = [(-1, False)]
    previous = -1
    for durable in log.durable_points():
        writes = [e.index for e in log.entries[previous + 1 : durable] if e.writes]
        if len(writes) >= 2:
            points.append((writes[len(writes) // 2 - 1], True))
        points.append((durable, False))
        previous = durable
    return points


def sample(run: Run, ops: list[Operation], points: list[tuple[int, bool]], every: int) -> list[Cut]:
    if every < 1:
        raise ValueError(f"--every {every}: give 1 (every cut point) or more")
    cuts = []
    for op in ops:
        mine = [(p, torn) for p, torn in points if op.first <= p < op.end]
        for number, (point, torn) in enumerate(mine):
            last = number == len(mine) - 1
            if number % every == 0 or last:
                cuts.append(Cut(run, op, point, torn, last))
    return cuts


class Checker:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.mnt = work / "mnt"
        work.mkdir(parents=True, exist_ok=True)

    def check(
        self, disk: Path, cut: Cut, reference: Outcome | None, base: Outcome | None
    ) -> Outcome:
        outcome = Outcome(cut)
        image = self.work / "cut.img"
        copy_sparse(disk, image)
        probe = None
        if self._may_probe(cut, base):
            probe = self.work / "probe.img"
            copy_sparse(disk, probe)
        try:
            with self._mounted(image, cut.run.fs) as top:
                self._check_what_was_left(outcome, StateLayout(top), reference, base)
            if probe is not None and self._unverified(outcome):
                self._probe_verification(outcome, probe)
            with self._mounted(image, cut.run.fs) as top:
                state_top = self._check_next_boot(outcome, top)
                self._check_cleanup(outcome, state_top)
        except ScenarioError as e:
            outcome.add(Kind.UNBOOTABLE, f"the state filesystem does not mount: {e}")
            outcome.unbootable = True
        finally:
            image.unlink(missing_ok=True)
            if probe is not None:
                probe.unlink(missing_ok=True)
        return outcome

    # -- 1. what the cut left ------------------------------------------------------------------

    def _check_what_was_left(
        self, outcome: Outcome, layout: StateLayout, reference: Outcome | None, base: Outcome | None
    ) -> None:
        lost, broken = journal_losses(layout)
        outcome.lost_bytes = lost
        for message in broken:
            outcome.add(Kind.DATA, message)
        try:
            state, notes = statefile.load(layout)
        except Exception as e:  # any exception here is a finding, not a checker bug
            outcome.add(Kind.STATE_LOST, f"boot.json does not read: {e!r}")
            return
        outcome.state = state
        outcome.rebuilt = any(note.startswith("rebuilt") for note in notes)
        if outcome.rebuilt and reference is not None and not reference.rebuilt:
            outcome.add(Kind.STATE_LOST, f"the boot state was lost and rebuilt: {'; '.join(notes)}")
        if reference is not None and reference.state is not None:
            for kind, message in compare_states(
                reference.state, state, adds_tries=outcome.cut.operation.name in ADDS_TRIES
            ):
                outcome.add(kind, message)
        trial = outcome.cut.run.trial
        if (
            outcome.cut.last_in_operation
            and outcome.cut.index >= 0
            and trial is not None
            and outcome.cut.operation.first < 0
            and base is not None
            and base.state is not None
            and trial in base.state.entries
        ):
            before = base.state.entries[trial].tries_left
            after = state.entries[trial].tries_left if trial in state.entries else None
            if after is None or (before is not None and after >= before):
                outcome.add(
                    Kind.HANDOVER,
                    f"the trial boot of {trial} handed over the root before its try was on"
                    f" disk (tries left {before} before the boot, {after} at hand-over)",
                )
        listed = [k for k in state.entries if k.startswith(".")]
        if listed:
            outcome.add(
                Kind.HALF_STAGED,
                f"the boot state lists {', '.join(listed)}: a directory being staged or removed",
            )
        for deployment_id in bootstate.candidates(state):
            problem = half_staged(layout, deployment_id)
            if problem:
                outcome.add(
                    Kind.HALF_STAGED,
                    f"bootable deployment {deployment_id} is half-staged: {problem}",
                )

    # -- 2. the first boot's verification -------------------------------------------------------

    def _may_probe(self, cut: Cut, base: Outcome | None) -> bool:
        trial = cut.run.trial
        if cut.operation.first >= 0 or trial is None:
            return False
        if base is None:
            return False  # this is the base itself
        return (
            base.state is not None
            and trial in base.state.entries
            and (not base.state.entries[trial].verified)
        )

    def _unverified(self, outcome: Outcome) -> bool:
        trial = outcome.cut.run.trial
        state = outcome.state
        return state is not None and trial in state.entries and not state.entries[trial].verified

    def _probe_verification(self, outcome: Outcome, probe: Path) -> None:
        trial = outcome.cut.run.trial
        assert trial is not None
        with self._mounted(probe, outcome.cut.run.fs) as top:
            layout = StateLayout(top)
            try:
                manifest = layout.read_manifest(trial)
            except BootError:
                return  # not bootable as it stands: the half-staged check says so
            if manifest.format == "dir":
                return  # a tree is checked by its mount points and init, not a digest
            image = Path(layout.image_path(manifest))
            with image.open("r+b") as f:
                f.seek(max(0, image.stat().st_size // 2 - DAMAGE // 2))
                f.write(b"\xff" * DAMAGE)
            booted, _ = self._boot(top)
        if booted is not None and booted.get("deployment") == trial:
            outcome.add(
                Kind.VERIFY,
                f"first-boot verification skipped after the cut: the state did not record"
                f" {trial}'s image as verified, yet the next boot ran it, damaged, without"
                " checking its sha256",
            )

    # -- 3. the next boot -----------------------------------------------------------------------

    def _check_next_boot(self, outcome: Outcome, top: Path) -> Path:
        booted, console = self._boot(top)
        if booted is None:
            outcome.unbootable = True
            outcome.add(Kind.UNBOOTABLE, f"no deployment boots after the cut: {console.strip()}")
            return top
        state_top = Path(str(booted["state"]))
        deployment = str(booted["deployment"])
        outcome.booted = deployment
        if deployment.startswith("."):
            outcome.add(
                Kind.HALF_STAGED,
                f"the boot after the cut booted {deployment}, a directory being staged or removed",
            )
        if booted.get("failed"):
            outcome.add(Kind.FAILOVER, f"the boot after the cut failed over {booted['failed']}")
        state, _ = statefile.load(StateLayout(state_top))
        entry = state.entries.get(deployment)
        good = entry is not None and (
            entry.successful or (booted.get("trial") is True and booted.get("counted") is True)
        )
        if not good:
            outcome.add(
                Kind.NOT_GOOD,
                f"the boot after the cut reached {deployment}, neither"
                f" known good nor a counted trial ({entry})",
            )
        seeds = top / "var" / "lib" / "testdata"
        missing = [n for n in range(SEED_FILES) if _read(seeds / f"seed-{n:02}") != seed_content(n)]
        if missing:
            outcome.add(
                Kind.SEED,
                f"/var lacks what the image seeds into it: {len(missing)} of {SEED_FILES} seed"
                " files missing or damaged (the seeding of an empty /var is not atomic)",
            )
        return state_top

    def _boot(self, top: Path) -> tuple[dict[str, object] | None, str]:
        run_dir = self.mnt / "run"
        run_dir.mkdir(exist_ok=True)
        (run_dir / "booted.json").unlink(missing_ok=True)
        opts, _ = parse_options(CMDLINE)
        out = io.StringIO()
        try:
            with redirect_stdout(out), redirect_stderr(out):
                prepare_root(str(top), str(run_dir), opts, "/dev/cut", Console())
        except BootError as e:
            return None, f"{out.getvalue()}{e}"
        except Exception:
            return None, f"{out.getvalue()}the boot stage crashed: {traceback.format_exc()}"
        data = json.loads((run_dir / "booted.json").read_text())
        assert isinstance(data, dict)
        return data, out.getvalue()

    # -- 4. the next command cleans up ----------------------------------------------------------

    def _check_cleanup(self, outcome: Outcome, state_top: Path) -> None:
        for command in (["gc", "--keep", "100"], ["status", "--json"]):
            code, output = run_cli([*command, "--sysroot", str(state_top)])
            if code != 0:
                outcome.add(
                    Kind.CLEANUP,
                    f"`overlayroot {command[0]}` after the cut failed ({code}): {output.strip()}",
                )
        deployments = StateLayout(state_top).deployments
        left = sorted(
            n
            for n in os.listdir(deployments)
            if n.startswith(".staging-") or n.startswith(".removing-")
        )
        if left:
            outcome.add(Kind.CLEANUP, f"`overlayroot gc` left {', '.join(left)} behind")

    @contextlib.contextmanager
    def _mounted(self, image: Path, fs: str) -> Iterator[Path]:
        sysroot = self.mnt / "sysroot"
        sysroot.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [
                "mount",
                "-t",
                fs,
                "-o",
                f"loop,offset={STATE.offset},sizelimit={STATE.size}",
                str(image),
                str(sysroot),
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise ScenarioError(f"mount -t {fs} {image}: {result.stderr.strip()}")
        try:
            yield sysroot
        finally:
            unmount_below(self.mnt)


def compare_states(
    before: BootState, after: BootState, *, adds_tries: bool
) -> list[tuple[Kind, str]]:
    """What a cut must never do to the boot state: add tries, or forget a bless."""
    found = []
    for deployment_id, old in before.entries.items():
        new = after.entries.get(deployment_id)
        if new is None:
            continue  # gc removes deployments; a deployment gone is not one that boots
        if old.successful and not new.successful:
            found.append(
                (
                    Kind.BLESS,
                    f"{deployment_id} lost its bless (it was known good when the operation began)",
                )
            )
        elif (
            not old.successful
            and not adds_tries
            and old.tries_left is not None
            and (new.tries_left is None or new.tries_left > old.tries_left)
        ):
            found.append(
                (
                    Kind.TRIES,
                    f"the cut added tries to {deployment_id}: {old.tries_left}"
                    f" left when the operation began, {new.tries_left} after"
                    " the cut",
                )
            )
    return found


def half_staged(layout: StateLayout, deployment_id: str) -> str | None:
    """Why a deployment cannot be booted as it stands, or None."""
    try:
        manifest = layout.read_manifest(deployment_id)
    except BootError as e:
        return str(e)
    try:
        digest = image_sha256(layout.image_path(manifest))
    except OSError as e:
        return f"its image {layout.image_path(manifest)} does not read: {e.strerror}"
    if digest != manifest.sha256:
        return f"its image {layout.image_path(manifest)} does not match its manifest's sha256"
    return None


def journal_losses(layout: StateLayout) -> tuple[int, list[str]]:
    """Bytes of journalled, fsynced data that a cut lost, and what is wrong."""
    lost, found = 0, []
    for area in DATA_AREAS:
        directory = Path(layout.top, area, "pcut")
        journal = _read(directory / "journal")
        if journal is None:
            continue
        *complete, _ = journal.split(b"\n")  # a torn last line was never fsynced
        for line in complete:
            if not line.isdigit():
                found.append(
                    f"/{area}/pcut/journal holds a line that was never written: {line[:40]!r}"
                )
                continue
            expected = BLOB_BYTES + line + b"\n"
            actual = _read(directory / "data" / line.decode())
            if actual != expected:
                lost += len(expected)
                what = "missing" if actual is None else f"{len(actual)} bytes, not as written"
                found.append(
                    f"/{area}/pcut/data/{line.decode()} was fsynced before the journal"
                    f" named it, and is {what}"
                )
    return lost, found


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        try:
            code = overlayroot_cli(argv)
        except Exception:
            return 1, f"{out.getvalue()}{traceback.format_exc()}"
    return code, out.getvalue()


def unmount_below(path: Path) -> None:
    """Unmount everything at or below ``path``, innermost first."""
    for point in reversed(mounts_under(path)):
        try:
            syscalls.umount(point, 0)
        except OSError:
            syscalls.umount(point, syscalls.MNT_DETACH)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
