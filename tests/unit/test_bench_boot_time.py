"""bench.boot_time's options (the boots themselves are the benchmark, not a test)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from bench.boot_time import (
    FLOOR,
    HOST,
    INSTRUCTIONS,
    TRIAL,
    Boot,
    parse_args,
    ratio,
    round_ratio,
    setup_stats,
    table,
)


def test_a_baseline_that_is_not_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--baseline", str(tmp_path / "old.img")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"error: --baseline {tmp_path / 'old.img'}: no such file; give an initramfs image built"
        " by `overlayroot initrd build`\n"
    )
    image = tmp_path / "old.img"
    image.write_bytes(b"070701")
    assert parse_args(["--baseline", str(image)]).baseline == image


def test_ratios_are_of_the_medians() -> None:
    stats: dict[str, dict[str, object]] = {
        "trial": {"guest_seconds": {"median": 3.0}},
        "trial-baseline": {"guest_seconds": {"median": 6.0}},
        "floor": {"guest_seconds": {"median": 2.0}},
        "failed": {"guest_seconds": None},
    }
    assert ratio(stats, "trial", "floor") == 1.5
    assert ratio(stats, "trial", "trial-baseline") == 0.5
    assert ratio(stats, "failed", "floor") is None


def test_round_ratios_pair_the_boots_of_each_round() -> None:
    boots = [
        Boot("trial", 1, True, initramfs_seconds=3.0),
        Boot("floor", 1, True, initramfs_seconds=2.0),
        Boot("trial", 2, True, initramfs_seconds=6.0),  # a slow round: both slow
        Boot("floor", 2, True, initramfs_seconds=5.0),
        Boot("trial", 3, True, initramfs_seconds=1.0),
        Boot("floor", 3, False),  # no pair
        Boot("trial", 4, False),
        Boot("floor", 4, True, initramfs_seconds=1.0),
    ]
    assert round_ratio(boots, "trial", "floor") == 1.35  # median of 1.5 and 1.2
    assert round_ratio(boots[4:], "trial", "floor") is None


def test_the_clock_is_host_instructions_or_both(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args([]).clock == "both"
    assert parse_args(["--clock", "instructions"]).clock == "instructions"
    with pytest.raises(SystemExit):
        parse_args(["--clock", "wall"])
    assert "invalid choice: 'wall'" in capsys.readouterr().err


def test_the_table_has_a_section_per_clock() -> None:
    boots = [
        Boot(name, 1, True, clock=clock, run_init=1.0, marker_uptime=1.0 + figure,
             initramfs_seconds=figure, wall_seconds=9.0, busy_cpus=1.0)
        for clock, figures in ((HOST, (1.5, 1.0)), (INSTRUCTIONS, (0.42, 0.4)))
        for name, figure in zip((TRIAL, FLOOR), figures, strict=True)
    ]  # fmt: skip
    stats = {
        clock: {name: setup_stats([b for b in boots if (b.clock, b.setup) == (clock, name)])
                for name in (TRIAL, FLOOR)}
        for clock in (HOST, INSTRUCTIONS)
    }  # fmt: skip
    image = {"path_kind": "x", "size": 1, "compression": "-", "frozen_modules": 1,
             "kernel_modules": 1}  # fmt: skip
    report: dict[str, object] = {
        "kernel": "k", "accel": "tcg", "runs": 1, "loadavg_start": [0], "loadavg_end": [0],
        "images": {TRIAL: image, FLOOR: image}, "stats": stats,
        "ratios": {c: {"trial/floor": ratio(stats[c], TRIAL, FLOOR)} for c in stats},
        "round_ratios": {c: {"trial/floor": round_ratio(
            [b for b in boots if b.clock == c], TRIAL, FLOOR)} for c in stats},
        "dracut_error": None, "boots": [asdict(b) for b in boots], "total_seconds": 1.0,
    }  # fmt: skip
    text = table(report)
    assert "ratio trial/floor (host clock): 1.5 of the medians, 1.5 median of the rounds" in text
    assert (
        "ratio trial/floor (instructions clock): 1.05 of the medians, 1.05 median of the rounds"
        in text
    )
    assert "instructions clock: 'Run /init' -> deployment init, guest seconds" in text
