"""The power-cut scenario's bookkeeping and the checker's judgements, without QEMU or mounts:
operations from marker sectors, cut points, state comparisons, journalled data, and the error
messages of the scenario and the benchmark."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from bench import powercut as bench
from overlayroot.core.bootstate import BootState, Entry
from overlayroot.core.layout import StateLayout
from qemu import powercut
from qemu.cutcheck import Kind, compare_states, cut_points, half_staged, journal_losses, sample
from qemu.logwrites import Flag, read_log
from qemu.powercut import MARKER_STRIDE, MARKERS, Operation, Run, ScenarioError, operations
from tests.unit.test_logwrites import make_log, sector

PAGE = 8  # sectors


def marker(seq: int, name: str) -> tuple[int, int, Flag, bytes]:
    text = f"PCUT {seq} {name}\n".encode().ljust(512, b"\0") + bytes(512 * (PAGE - 1))
    return MARKERS.offset // 512 + seq * MARKER_STRIDE, PAGE, Flag(0), text


def write(at: int) -> tuple[int, int, Flag, bytes]:
    return at, 1, Flag(0), sector(at % 256)


FLUSH = (0, 0, Flag.FLUSH, b"")


def run_of(tmp_path: Path, name: str = "run1") -> Run:
    return Run(
        name, "ext4", tmp_path / "base", tmp_path / "disk", tmp_path / "log", tmp_path / "console"
    )


def test_the_marker_sectors_split_a_log_into_the_boot_and_the_operations(
    tmp_path: Path,
) -> None:
    log = read_log(
        make_log(
            tmp_path / "log",
            [
                write(10),
                FLUSH,  # 0-1: the boot
                marker(1, "data"),
                FLUSH,
                write(11),  # 2-4
                marker(2, "deploy-dir"),
                FLUSH,  # 5-6
            ],
        )
    )
    assert operations(run_of(tmp_path), log) == [
        Operation("trial boot", -1, 2),
        Operation("fsync /var /home", 2, 5),
        Operation("deploy dir", 5, 7),
    ]


def test_a_marker_written_again_counts_where_it_was_first_written(tmp_path: Path) -> None:
    log = read_log(
        make_log(
            tmp_path / "log",
            [
                marker(1, "bless"),
                FLUSH,
                marker(1, "bless"),
                marker(2, "gc"),
                FLUSH,
            ],
        )
    )
    assert [(o.name, o.first) for o in operations(run_of(tmp_path, "run2"), log)] == [
        ("repair boot", -1),
        ("bless", 0),
        ("gc", 3),
    ]


def test_markers_out_of_order_are_a_scenario_error(tmp_path: Path) -> None:
    log = read_log(make_log(tmp_path / "log", [marker(2, "gc"), FLUSH, marker(1, "bless")]))
    with pytest.raises(
        ScenarioError,
        match=r"log: the markers are out of order: \[\(2, 'bless'\),"
        r" \(0, 'gc'\)\]",
    ):
        operations(run_of(tmp_path), log)


def test_cut_points_are_the_start_every_flush_and_halfway_between_flushes(
    tmp_path: Path,
) -> None:
    log = read_log(
        make_log(
            tmp_path / "log",
            [
                write(1),
                write(2),
                write(3),
                write(4),
                FLUSH,  # 0-4: torn after entry 1
                write(5),
                FLUSH,  # 5-6: one write, no torn point
                (0, 0, Flag.FUA, b""),  # 7
            ],
        )
    )
    assert cut_points(log) == [(-1, False), (1, True), (4, False), (6, False), (7, False)]


def test_a_sample_keeps_each_operations_first_and_last_cut(tmp_path: Path) -> None:
    run = run_of(tmp_path)
    ops = [Operation("trial boot", -1, 5), Operation("gc", 5, 20)]
    points = [(-1, False), *((p, False) for p in range(0, 20))]
    cuts = sample(run, ops, points, 7)
    assert [(c.operation.name, c.index, c.last_in_operation) for c in cuts] == [
        ("trial boot", -1, False),
        ("trial boot", 4, True),
        ("gc", 5, False),
        ("gc", 12, False),
        ("gc", 19, True),
    ]
    with pytest.raises(ValueError, match="--every 0: give 1"):
        sample(run, ops, points, 0)


def state(**entries: Entry) -> BootState:
    return BootState(dict(entries), generation=3)


def test_a_cut_may_not_add_tries_or_lose_a_bless() -> None:
    before = state(v1=Entry(tries_left=1), v2=Entry(successful=True), v3=Entry(tries_left=None))
    assert (
        compare_states(
            before, state(v1=Entry(tries_left=0), v3=Entry(tries_left=2)), adds_tries=False
        )
        == []
    )  # v2 removed by gc, v3 counted
    assert compare_states(
        before, state(v1=Entry(tries_left=None), v2=Entry()), adds_tries=False
    ) == [
        (
            Kind.TRIES,
            "the cut added tries to v1: 1 left when the operation began, None after the cut",
        ),
        (Kind.BLESS, "v2 lost its bless (it was known good when the operation began)"),
    ]
    assert compare_states(before, state(v1=Entry(tries_left=2)), adds_tries=True) == []


def test_journalled_data_that_is_missing_or_wrong_is_lost(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    blob = powercut.BLOB_BYTES
    for area in ("var", "home"):
        (Path(layout.top) / area / "pcut" / "data").mkdir(parents=True)
    var = Path(layout.top) / "var" / "pcut"
    (var / "data" / "1").write_bytes(blob + b"1\n")
    (var / "data" / "2").write_bytes(blob[:100])
    (var / "journal").write_bytes(b"1\n2\n3\n4")  # 4 is a torn line: never fsynced
    (Path(layout.top) / "home" / "pcut" / "journal").write_bytes(b"\0\0\n")
    lost, found = journal_losses(layout)
    assert lost == 2 * (len(blob) + 2)
    assert found == [
        "/var/pcut/data/2 was fsynced before the journal named it, and is 100 bytes, not as"
        " written",
        "/var/pcut/data/3 was fsynced before the journal named it, and is missing",
        "/home/pcut/journal holds a line that was never written: b'\\x00\\x00'",
    ]


def test_a_deployment_without_its_manifest_or_with_another_image_is_half_staged(
    tmp_path: Path,
) -> None:
    layout = StateLayout(tmp_path)
    directory = Path(layout.deployment_dir("v1"))
    directory.mkdir(parents=True)
    assert "deployment 'v1' has no manifest" in str(half_staged(layout, "v1"))
    image = directory / "root.erofs"
    image.write_bytes(b"image")
    manifest = {
        "id": "v1",
        "created": "2023-11-14T22:13:20Z",
        "format": "erofs",
        "image": "root.erofs",
        "sha256": hashlib.sha256(b"other").hexdigest(),
        "size": 5,
        "origin": "test",
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert half_staged(layout, "v1") == (f"its image {image} does not match its manifest's sha256")
    image.write_bytes(b"other")
    assert half_staged(layout, "v1") is None


def test_a_missing_tool_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "qemu.powercut.shutil.which",
        lambda tool: None if tool in ("mkfs.xfs", "sgdisk") else "/bin/true",
    )
    with pytest.raises(
        ScenarioError,
        match=r"the xfs power-cut scenario needs sgdisk, mkfs\.xfs:"
        " scripts/setup installs them",
    ):
        powercut.require_tools("xfs")


def test_a_failing_host_command_says_which_and_why(tmp_path: Path) -> None:
    with (
        pytest.raises(ScenarioError, match=r"losetup --find --show .* failed: .*"),
        powercut.loop_device(tmp_path / "missing.img", MARKERS),
    ):
        pass


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fs", "ext4,zfs"], "--fs ext4,zfs: choose among ext4, btrfs, xfs"),
        (["--every", "0"], "--every 0: give 1 \\(every cut point\\) or more"),
    ],
)
def test_the_benchmark_refuses_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_benchmark_needs_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("bench.powercut.os.geteuid", lambda: 1000)
    assert bench.main(["--fs", "ext4"]) == 2
    assert "run as root: it loop-mounts every cut's disk" in capsys.readouterr().err
