"""bench.integrations: the split of a boot and the table, on made-up consoles (the boots
themselves are the benchmark's)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest

from bench.integrations import analysis_lines, main, phases, table
from qemu.machine import BootFailure

CONSOLE = "[    0.000000] Linux version 6.12\n[    7.126712] Run /init as init process\n"
MARKERS = {"userspace_us": "26595051", "multi_user_us": "149759750"}


def test_a_boot_is_split_at_run_init_and_the_real_inits_start() -> None:
    split = phases(MARKERS, CONSOLE, Path("boot.log"))
    assert split == pytest.approx(
        {
            "kernel_s": 7.126712,
            "initramfs_s": 26.595051 - 7.126712,
            "userspace_s": 149.759750 - 26.595051,
            "multi_user_s": 149.759750,
        }
    )


def test_a_console_without_run_init_is_a_boot_failure_naming_the_log() -> None:
    with pytest.raises(BootFailure) as error:
        phases(MARKERS, "[    0.000000] Linux version 6.12\n", Path("boot.log"))
    assert error.value.reason == "no 'Run /init as init process' line with a timestamp"
    assert error.value.log_path == Path("boot.log")


def test_the_table_gives_ratios_to_plain_dracut_of_the_same_suite_and_boot_kind() -> None:
    def config(suite: str, name: str, boot: str, initrd: float, total: float) -> dict[str, object]:
        return {
            "suite": suite,
            "name": name,
            "boot": boot,
            "initramfs_bytes": 2**20,
            "median": {
                "kernel_s": 1.0,
                "initramfs_s": initrd,
                "userspace_s": total - 1.0 - initrd,
                "multi_user_s": total,
            },
        }

    report = {
        "accel": "tcg",
        "runs": 3,
        "configurations": [
            config("trixie", "standalone", "later", 2.0, 30.0),
            config("trixie", "dracut", "later", 10.0, 60.0),
            config("bookworm", "standalone", "first", 5.0, 40.0),
        ],
    }
    lines = table(report).splitlines()
    assert lines[2].split()[-2:] == ["0.20", "0.50"]
    assert lines[3].split()[-2:] == ["1.00", "1.00"]
    assert lines[4].split()[-1] == "40.0"  # no bookworm baseline ran: no ratios


def test_an_unknown_suite_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--suites", "bookworm,sid"])
    assert "sid: not one of bookworm, trixie" in capsys.readouterr().err


def test_the_table_gives_our_hooks_cost_on_its_generator_and_the_hosts_load() -> None:
    def config(name: str, total: float, load: float) -> dict[str, object]:
        return {
            "suite": "bookworm",
            "name": name,
            "boot": "later",
            "initramfs_bytes": 2**20,
            "boots": [{"load_1m": load, "other_qemu": 1.0}],
            "median": {
                "kernel_s": 1.0,
                "initramfs_s": 4.0,
                "userspace_s": total - 5.0,
                "multi_user_s": total,
            },
        }

    report = {
        "accel": "tcg",
        "runs": 3,
        "configurations": [
            config("dracut", 50.0, 1.0),
            config("initramfs-tools", 40.0, 3.0),
            config("initramfs-tools+overlayroot", 42.0, 2.0),
        ],
    }
    lines = table(report).splitlines()
    assert lines[1] == (
        "host load (1 min) during the boots: median 2.0, max 3.0; other QEMU guests beside a"
        " boot: max 1"
    )
    assert lines[5].split()[-3:] == ["1.00", "0.84", "1.05"]  # hook x: 42 / 40
    assert lines[4].split()[-1] == "0.80"  # a plain generator has no hook column


def test_the_table_names_a_configuration_that_failed_and_where_its_log_is() -> None:
    report = {
        "accel": "tcg",
        "runs": 3,
        "configurations": [],
        "failed": {"trixie/dracut": "failed units: x.service (console log: /logs/a.log)"},
    }
    assert table(report).splitlines()[-1] == (
        "trixie/dracut: FAILED, left out: failed units: x.service (console log: /logs/a.log)"
    )


def test_later_boots_only_and_a_failing_configuration_left_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The run loop with the boots faked: ``--boots later`` still primes each disk with a first
    boot (not reported), and a configuration whose boot fails is left out, named with its log,
    while the others are measured."""
    from bench import integrations
    from qemu.kernel import Kernel

    kernel = Kernel(tmp_path / "vmlinuz", tmp_path / "modules", "6.12")
    disk, initrd = tmp_path / "disk.img", tmp_path / "initrd.img"
    disk.write_bytes(b"")
    initrd.write_bytes(b"x")
    setups = [
        integrations.Setup("trixie", name, kernel, initrd, disk, "ro") for name in ("good", "bad")
    ]
    booted: list[str] = []
    cmdlines: set[str] = set()
    clocks: set[bool] = set()

    def boot_once(accel: str, icount: bool, setup: object, source: Path, work: Path, name: str,
                  timeout: float, keep: Path | None = None,
                  analysis: list[str] | None = None) -> dict[str, float]:  # fmt: skip
        booted.append(name)
        clocks.add(icount)
        assert isinstance(setup, integrations.Setup)
        cmdlines.add(setup.cmdline)
        if analysis is not None:
            analysis.append(f"blame: 1.0s {name}.service")
        if name.startswith("trixie-bad-later"):
            log = tmp_path / "bad.log"
            log.write_text("console")
            raise BootFailure("failed units: x.service", log, "console")
        if keep is not None:
            keep.write_bytes(b"")
        return {"kernel_s": 1.0, "initramfs_s": 2.0, "userspace_s": 3.0, "multi_user_s": 6.0,
                "load_1m": 0.5, "other_qemu": 0.0}  # fmt: skip

    monkeypatch.setattr(integrations, "kernel_from_env", lambda: kernel)
    monkeypatch.setattr(integrations, "choose_accel", lambda k: "tcg")
    monkeypatch.setattr(integrations, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(integrations, "trixie_setups", lambda work, only: setups)
    monkeypatch.setattr(integrations, "boot_once", boot_once)
    args = argparse.Namespace(
        suites=["trixie"], boots=["later"], only=[], runs=2, timeout=1.0, keep=False,
        analyze=True, append="overlayroot.debug", clock="instructions",
    )  # fmt: skip
    report = integrations.run_benchmark(args)
    assert clocks == {True}  # every boot, the priming ones too, on the instruction clock
    assert report["clock"] == "instructions"
    assert booted == [
        "trixie-good-first-prime",
        "trixie-bad-first-prime",
        "trixie-good-later-0",
        "trixie-bad-later-0",
        "trixie-good-later-1",
    ]
    configurations: Any = report["configurations"]
    assert [(c["name"], c["boot"], len(c["boots"])) for c in configurations] == [
        ("good", "later", 2)
    ]
    failed: Any = report["failed"]
    assert list(failed) == ["trixie/bad"]
    assert "failed units: x.service (console log: " in failed["trixie/bad"]
    assert cmdlines == {"ro overlayroot.debug test.analyze=1"}  # --append, --analyze
    # --analyze: the last boot of each kind that ran, under its label.
    assert report["analysis"] == {
        "trixie/good/first": ["blame: 1.0s trixie-good-first-prime.service"],
        "trixie/bad/first": ["blame: 1.0s trixie-bad-first-prime.service"],
        "trixie/good/later": ["blame: 1.0s trixie-good-later-1.service"],
    }
    assert "trixie/good/later: systemd-analyze\n  blame: 1.0s" in integrations.analysis_text(report)


def test_the_instruction_clock_without_tcg_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import integrations
    from qemu.kernel import Kernel

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(integrations, "kernel_from_env", lambda: Kernel(tmp_path, tmp_path, "6.12"))
    monkeypatch.setattr(integrations, "choose_accel", lambda k: "kvm")
    assert main(["--clock", "instructions"]) == 1
    assert capsys.readouterr().err == (
        "bench.integrations: the instruction clock needs TCG; the accel here is kvm\n"
    )


def test_the_guests_analysis_lines_are_read_from_the_console() -> None:
    console = (
        "OVERLAYROOT-TEST uptime=40\r\n"
        "overlayroot-test-blame: 5.1s systemd-udev-settle.service\r\n"
        "[  41.0] some kernel line\n"
        "overlayroot-test-bless: [   48.1] overlayroot[612]: overlayroot: blessed v1\n"
    )
    assert analysis_lines(console) == [
        "blame: 5.1s systemd-udev-settle.service",
        "bless: [   48.1] overlayroot[612]: overlayroot: blessed v1",
    ]
