"""The power-cut scenario: a state disk, guest boots that record every write, and the operations
each logged write belongs to.

A scenario is three boots of one state disk, each a QEMU run whose disk sits behind
``blklogwrites`` (qemu/logwrites.py), so that a replay can stop at any flush the guest made:

1. ``run1``: the first boot of ``v1``, a trial (the counter write, ``/var`` seeded from the image
   into an empty ``/var``, the image's first-boot sha256); then, from inside: fsynced data in
   ``/var`` and ``/home``, ``overlayroot deploy`` of a ``dir`` tree (``v2``), of a tar archive
   (``v4``, unpacked by GNU tar into a ``dir`` deployment) and of an erofs image file
   (``v3``), ``rollback``, ``bless``, ``gc --keep 2`` (removes ``v2`` and ``vold``), more
   data, and last a torn
   ``boot.json`` (garbage written over it, as a cut in the middle of a careless write would);
2. ``run2``: the boot that repairs ``boot.json``; data; ``set-default v3``; ``gc --keep 1``
   (removes ``v4``);
3. ``run3``: the first boot of ``v3`` (a trial of an image deployed from inside); data.

The guest says which operation starts by writing a marker sector (``PCUT <seq> <name>``) to a
second partition of the same disk and fsyncing it, so markers and the operation's own writes
share one log in the order the disk saw them: every entry from a marker to the next belongs to
the named operation, and the entries before the first marker to the boot.

The fsynced data follows one rule a checker can hold any cut to: ``data/N`` is written and
fsynced (with its directory) *before* ``N`` is appended to ``journal`` and that is fsynced, so
every ``N`` in a journal must have its data intact after any cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from initrd.elf import resolve_closure
from overlayroot.commands.fsops import Progress
from overlayroot.commands.images import build_image
from overlayroot.commands.staging import deploy
from overlayroot.core import bootstate, statefile
from overlayroot.core.layout import StateLayout
from qemu.kernel import Kernel
from qemu.logwrites import WriteLog, copy_sparse, sectors_written
from qemu.machine import LoggedDisk, Machine
from qemu.rootfs import TEST_DIR, make_test_root

FILESYSTEMS = ("ext4", "btrfs", "xfs")
MKFS = {
    "ext4": ("mkfs.ext4", "-q", "-F", "-L"),
    "btrfs": ("mkfs.btrfs", "-q", "-f", "-L"),
    "xfs": ("mkfs.xfs", "-q", "-f", "-L"),
}
MODULES = ("btrfs", "xfs")  # ext4 is built into Debian's kernel
LABEL = "or-state"
MIB = 1 << 20
SECTOR = 512
DISK_MB = 320  # mkfs.xfs refuses less than 300 MiB
MARKER_MB = 2
MARKER_STRIDE = 8  # sectors: one 4 KiB page per marker, so no marker write rewrites another
MARKER_MAGIC = b"PCUT "
CREATED = 1_700_000_000
TRIES = 2
CMDLINE = (
    f"root=LABEL={LABEL} overlayroot.onfail=poweroff overlayroot.timeout=20"
    f" overlayroot.tries={TRIES} overlayroot.watchdog=0"
)
BOOT_TIMEOUT = 600  # seconds of TCG time for a whole run, boot and operations
BLOB = f"{TEST_DIR}/blob"
BLOB_BYTES = hashlib.sha256(b"overlayroot power cut").digest() * 512  # 16 KiB
SEED_FILES = 24  # files the images carry in /var, seeded into an empty persistent /var
TREE = f"{TEST_DIR}/trees/v2"
UPDATE = "updates/v3.erofs"  # on the state filesystem, outside overlayroot/
TARBALL = "updates/v4.tar"

_PRELUDE = f"""\
seq=0
mark() {{
    seq=$((seq + 1))
    printf 'PCUT %s %s\\n' "$seq" "$1" |
        busybox dd of=/dev/vda2 bs={SECTOR} seek=$((seq * {MARKER_STRIDE})) conv=sync,fsync \
2>/dev/null
    echo "OVERLAYROOT-TEST op$seq=$1"
}}
step() {{
    name=$1
    shift
    mark "$name"
    "$@"
    echo "OVERLAYROOT-TEST rc_$seq=$?"
}}
data() {{
    for n in "$@"; do
        for dir in /var/pcut /home/pcut; do
            if [ ! -d $dir/data ]; then
                mkdir -p $dir/data
                busybox sync $dir/data $dir "${{dir%/pcut}}"
            fi
            {{ cat /{BLOB}; echo "$n"; }} > $dir/data/$n
            busybox sync $dir/data/$n $dir/data
            echo "$n" >> $dir/journal
            busybox sync $dir/journal $dir
        done
    done
}}
tear() {{
    printf 'garbage{{' > /run/overlayroot/state/overlayroot/boot.json
    busybox sync /run/overlayroot/state/overlayroot/boot.json
}}
"""
SCRIPTS = {
    "run1": _PRELUDE
    + f"""\
step data data 1 2 3 4
step deploy-dir overlayroot deploy --format dir --id v2 /{TREE}
step deploy-tar overlayroot deploy --format dir --id v4 /run/overlayroot/state/{TARBALL}
step deploy-image overlayroot deploy --id v3 /run/overlayroot/state/{UPDATE}
step rollback overlayroot rollback
step bless overlayroot bless --no-reboot
step gc overlayroot gc --keep 2
step data data 5 6 7 8
step tear tear
mark end
""",
    "run2": _PRELUDE
    + """\
step data data 9 10 11 12
step set-default overlayroot set-default v3
step gc overlayroot gc --keep 1
mark end
""",
    "run3": _PRELUDE
    + """\
step data data 13 14 15 16
mark end
""",
}
# What each run's boot is, for the report, and the deployment it boots on trial.
BOOTS = {"run1": ("trial boot", "v1"), "run2": ("repair boot", None), "run3": ("trial boot", "v3")}
OPERATION_NAMES = {
    "data": "fsync /var /home",
    "deploy-dir": "deploy dir",
    "deploy-image": "deploy image",
    "deploy-tar": "deploy tar",
    "rollback": "rollback",
    "bless": "bless",
    "gc": "gc",
    "tear": "tear boot.json",
    "set-default": "set-default",
    "end": "power off",
}


class ScenarioError(RuntimeError):
    """The scenario itself did not run (a tool missing, a command that failed in the guest):
    not a finding about power cuts."""


@dataclass(frozen=True)
class Partition:
    offset: int
    size: int

    @property
    def sectors(self) -> tuple[int, int]:
        return self.offset // SECTOR, self.size // SECTOR


STATE = Partition(MIB, (DISK_MB - 2 - MARKER_MB) * MIB)
MARKERS = Partition((DISK_MB - 1 - MARKER_MB) * MIB, MARKER_MB * MIB)


@dataclass(frozen=True)
class Run:
    """One recorded boot: the disk it started from, its write log, the console."""

    name: str
    fs: str
    base: Path
    disk: Path
    log: Path
    console: Path

    @property
    def boot_operation(self) -> str:
        return BOOTS[self.name][0]

    @property
    def trial(self) -> str | None:
        return BOOTS[self.name][1]


@dataclass(frozen=True)
class Operation:
    """Log entries ``first`` to ``end - 1`` of a run belong to ``name``."""

    name: str
    first: int
    end: int


def require_tools(fs: str) -> None:
    needed = (
        "qemu-system-x86_64",
        "sgdisk",
        "losetup",
        "mount",
        "umount",
        "cp",
        "mkfs.erofs",
        MKFS[fs][0],
    )
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        raise ScenarioError(
            f"the {fs} power-cut scenario needs {', '.join(missing)}: scripts/setup installs them"
        )


def add_gnu_tar(root: Path) -> None:
    """GNU tar and its libraries, at their host paths: ``deploy`` unpacks a tar source with it
    (owners, xattrs), which busybox tar cannot do."""
    tar = shutil.which("tar")
    if tar is None:
        raise ScenarioError("the power-cut scenario needs GNU tar: apt-get install tar")
    closure = resolve_closure([Path(tar)])
    for link in closure.symlinks:
        dest = root / link.path.relative_to("/")
        if not os.path.lexists(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(link.target)
    for path in closure.files:
        dest = root / path.relative_to("/")
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)


def make_root(base: Path, name: str, payload: Path | None) -> Path:
    root = make_test_root(base / f"root-{name}", image=name, command=payload, scripts=SCRIPTS)
    (root / BLOB).write_bytes(BLOB_BYTES)
    seeds = root / "var" / "lib" / "testdata"
    for number in range(SEED_FILES):
        (seeds / f"seed-{number:02}").write_bytes(seed_content(number))
    return root


def seed_content(number: int) -> bytes:
    return f"seed file {number} of the image's /var\n".encode() * 100


def make_state_disk(base: Path, fs: str, payload: Path | None) -> Path:
    """The disk run1 starts from: ``vold`` and ``v0`` blessed, ``v1`` new (both with the command,
    ``v1`` with GNU tar), ``v3`` as an image file and ``v4`` as a tar archive to deploy,
    ``v2``'s tree inside ``v1``; ``/var`` and ``/home``
    empty. Without ``payload`` (the frozen command), the disk can be checked, not booted."""
    require_tools(fs)
    disk = base / "base.img"
    with disk.open("wb") as f:
        f.truncate(DISK_MB * MIB)
    state_first, state_count = STATE.sectors
    marker_first, marker_count = MARKERS.sectors
    _run("sgdisk",
         "--new", f"1:{state_first}:{state_first + state_count - 1}", "--change-name", "1:state",
         "--new", f"2:{marker_first}:{marker_first + marker_count - 1}",
         "--change-name", "2:markers", str(disk))  # fmt: skip
    roots = base / "roots"
    v1 = make_root(roots, "v1", payload)
    add_gnu_tar(v1)
    tree = v1 / TREE
    tree.parent.mkdir(parents=True)
    shutil.copytree(make_root(roots, "v2", None), tree, symlinks=True)
    with loop_device(disk, STATE) as device:
        _run(*MKFS[fs], LABEL, device)
        with mounted(device, fs, base / "mnt") as top:
            # v0 carries the command too: run2 boots it.
            for offset, (name, command) in enumerate((("vold", None), ("v0", payload))):
                deploy(
                    top,
                    make_root(roots, name, command),
                    deployment_id=name,
                    created=CREATED + offset,
                )
                _bless(StateLayout(top), name)
            deploy(top, v1, deployment_id="v1", created=CREATED + 2)
            (top / UPDATE).parent.mkdir()
            build_image(
                make_root(roots, "v3", None),
                top / UPDATE,
                "erofs",
                "v3",
                CREATED + 3,
                Progress(None),
            )
            _run(
                "tar",
                "--create",
                "--numeric-owner",
                f"--file={top / TARBALL}",
                f"--directory={make_root(roots, 'v4', None)}",
                ".",
            )
    shutil.rmtree(roots)
    return disk


def _bless(layout: StateLayout, name: str) -> None:
    state, _ = statefile.load(layout)
    statefile.save(layout, bootstate.bless(state, name))
    statefile.append_history(layout, "blessed", name)


def record(
    base_disk: Path, work: Path, fs: str, kernel: Kernel, initrd: Path, accel: str
) -> list[Run]:
    """Boot the scenario's three runs one after the other, each logged from the disk the last
    one left; returns them with their pristine starting disks."""
    runs = []
    start = base_disk
    for name in SCRIPTS:
        run = Run(
            name,
            fs,
            work / f"{name}.base.img",
            work / f"{name}.img",
            work / f"{name}.log",
            work / f"{name}.console.log",
        )
        copy_sparse(start, run.base)
        copy_sparse(run.base, run.disk)
        machine = Machine(
            kernel,
            initrd,
            log_path=run.console,
            disks=[LoggedDisk(run.disk, run.log)],
            cmdline=f"{CMDLINE} test.run={name}",
            accel=accel,
        )
        with machine:
            machine.wait_for(
                "OVERLAYROOT-TEST done",
                BOOT_TIMEOUT,
                failure=("Kernel panic - not syncing", "overlayroot: error:", "Traceback"),
            )
            machine.wait_exit(120)
        failed = {k: v for k, v in machine.markers().items() if k.startswith("rc_") and v != "0"}
        if failed or machine.markers().get("run_status") != "0":
            raise ScenarioError(
                f"{fs} {name}: a step failed in the guest ({failed or 'run'}): see {run.console}"
            )
        runs.append(run)
        start = run.disk
    return runs


def operations(run: Run, log: WriteLog) -> list[Operation]:
    """The run's operations, from the marker sectors in its log: the boot first."""
    first, count = MARKERS.sectors
    starts: dict[int, tuple[int, str]] = {}
    for entry, sector, sectors in sectors_written(log, first, count):
        data = log.data(entry, sector, sectors)
        for at in range(0, len(data), SECTOR):
            text = data[at : at + SECTOR]
            if not text.startswith(MARKER_MAGIC):
                continue
            seq, _, name = text[len(MARKER_MAGIC) :].split(b"\n")[0].decode().partition(" ")
            starts.setdefault(int(seq), (entry.index, name))
    ordered = [starts[seq] for seq in sorted(starts)]
    if [index for index, _ in ordered] != sorted(index for index, _ in ordered):
        raise ScenarioError(f"{run.log}: the markers are out of order: {ordered}")
    ops = [Operation(run.boot_operation, -1, ordered[0][0] if ordered else len(log.entries))]
    for number, (index, name) in enumerate(ordered):
        end = ordered[number + 1][0] if number + 1 < len(ordered) else len(log.entries)
        ops.append(Operation(OPERATION_NAMES.get(name, name), index, end))
    return ops


@contextlib.contextmanager
def loop_device(image: Path, partition: Partition) -> Iterator[str]:
    device = _run(
        "losetup",
        "--find",
        "--show",
        "--offset",
        str(partition.offset),
        "--sizelimit",
        str(partition.size),
        str(image),
    ).strip()
    try:
        yield device
    finally:
        _run("losetup", "--detach", device)


@contextlib.contextmanager
def mounted(device: str, fs: str, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", fs, device, str(where))
    try:
        yield where
    finally:
        _run("umount", str(where))


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ScenarioError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


def record_scenario(
    work: Path, fs: str, kernel: Kernel, initrd: Path, accel: str, payload: Path
) -> list[Run]:
    """Make the state disk for ``fs`` in ``work`` and record the scenario's runs on it."""
    base = make_state_disk(work, fs, payload)
    runs = record(base, work, fs, kernel, initrd, accel)
    base.unlink()
    for run in runs:
        run.disk.unlink()  # the next run's base, or the end state: the log rebuilds both
    return runs
