"""bench.boot_time's options (the boots themselves are the benchmark, not a test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.boot_time import parse_args, ratio


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
