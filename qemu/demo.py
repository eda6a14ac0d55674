"""``scripts/demo``: build the initramfs, boot a machine under QEMU, update it from inside, then
give it a bad update and watch it come back by itself.

Five boots of Debian's cloud kernel with our standalone initramfs and a state disk:

1. deployment v1 boots on trial and is blessed; inside it, /etc is edited and update v2 is
   deployed with ``overlayroot deploy``;
2. v2 boots on trial, still has the /etc edit, is blessed, and deploys update v3;
3. v3 is bad: its kernel panics during boot (the machine restarts);
4. v3 panics again: its two tries are used up;
5. the machine is back on v2 with no human action; ``overlayroot status`` and
   ``overlayroot history`` say what happened and why.

Each boot takes 10-20 s under TCG emulation. Console logs land in ``.cache/demo/``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from initrd.build import BuildConfig, Compression, build_initramfs
from overlayroot.commands.fsops import Progress
from overlayroot.commands.images import build_image
from overlayroot.commands.staging import deploy
from qemu.accel import choose_accel
from qemu.disks import make_state_disk
from qemu.kernel import Kernel, debian_cloud_kernel, kernel_from_env
from qemu.machine import BootFailure, Machine
from qemu.paths import cache_dir
from qemu.rootfs import build_command_payload, make_test_root

LABEL = "demo-state"
TRIES = 2
CMDLINE = (
    f"console=ttyS0 root=LABEL={LABEL} overlayroot.tries={TRIES} overlayroot.watchdog=60"
    " overlayroot.onfail=poweroff quiet"
)
CREATED = 1_750_000_000
BOOT_TIMEOUT = 240.0


def section(name: str, lines: str) -> str:
    """A script fragment that prints ``lines``' output between two markers."""
    return f'echo "OVERLAYROOT-TEST begin={name}"\n{lines}\necho "OVERLAYROOT-TEST end={name}"\n'


SCRIPTS = {
    "install-v2": (
        "echo 'Welcome, edited on v1' > /etc/motd\n"
        + section("deploy", "overlayroot deploy --id v2 /run/overlayroot/state/updates/v2.erofs")
    ),
    "install-v3": (
        'echo "OVERLAYROOT-TEST motd=$(cat /etc/motd)"\n'
        + section("deploy", "overlayroot deploy --id v3 /run/overlayroot/state/updates/v3.erofs")
    ),
    "report": section("status", "overlayroot status") + section("history", "overlayroot history"),
}


def say(message: str = "") -> None:
    print(message, flush=True)


def between(console: str, name: str) -> list[str]:
    """What a script printed between its ``begin=name`` and ``end=name`` markers."""
    lines = console.splitlines()
    try:
        start = lines.index(f"OVERLAYROOT-TEST begin={name}")
        end = lines.index(f"OVERLAYROOT-TEST end={name}", start)
    except ValueError:
        return []
    # Kernel messages and progress bars (the guest's console is a terminal) are left out.
    return [
        line for line in lines[start + 1 : end] if not line.startswith("[") and "\x1b[" not in line
    ]


def stage_lines(console: str) -> list[str]:
    return [line for line in console.splitlines() if line.startswith("overlayroot:")]


class Demo:
    def __init__(self, kernel: Kernel, work: Path, accel: str) -> None:
        self.kernel = kernel
        self.work = work
        self.accel = accel
        self.boots = 0
        self.initrd = work / "initrd.img"
        self.disk = work / "state.img"

    def build(self) -> None:
        started = time.monotonic()
        result = build_initramfs(
            BuildConfig(
                modules_dir=self.kernel.modules, output=self.initrd, compress=Compression.ZSTD
            )
        )
        say(
            f"  initramfs: {result.size / 1e6:.1f} MB ({result.compression}),"
            f" {result.frozen_modules} frozen Python modules, {len(result.kernel_modules)}"
            f" kernel modules, built in {time.monotonic() - started:.0f} s"
        )
        payload = build_command_payload(self.work / "command")
        content = self.work / "state"
        content.mkdir()
        v1 = self.root("v1", payload)
        deploy(content, v1, deployment_id="v1", created=CREATED)
        updates = content / "updates"
        updates.mkdir()
        for name, fail in (("v2", None), ("v3", "panic")):
            root = self.root(name, payload, fail)
            build_image(root, updates / f"{name}.erofs", "erofs", name, CREATED, Progress(None))
        make_state_disk(
            self.disk,
            content,
            size_mb=256,
            fs_label=LABEL,
            fs_uuid="d3a0d3a0-0000-4000-8000-000000000001",
            partlabel="state",
            partuuid="d3a0d3a0-0000-4000-8000-000000000002",
        )
        say(
            f"  state disk: deployment v1; update images v2 (good) and v3 (its kernel panics"
            f" at boot) in /updates; {self.disk}"
        )

    def root(self, name: str, payload: Path, fail: str | None = None) -> Path:
        return make_test_root(
            self.work / f"root-{name}", image=name, fail=fail, command=payload, scripts=SCRIPTS
        )

    def boot(self, title: str, extra: str = "", *, expect_done: bool = True) -> Machine:
        self.boots += 1
        say(f"\nboot {self.boots}: {title}")
        log = self.work / f"boot{self.boots}.log"
        m = Machine(
            self.kernel,
            self.initrd,
            log_path=log,
            disks=[self.disk],
            cmdline=f"{CMDLINE} {extra}",
            accel=self.accel,
        )
        started = time.monotonic()
        with m:
            try:
                if expect_done:
                    m.wait_for("OVERLAYROOT-TEST done", BOOT_TIMEOUT)
                m.wait_exit(BOOT_TIMEOUT)
            except BootFailure:
                say(f"  the boot did not go as the demo expects; console log: {log}")
                raise
        for line in stage_lines(m.console):
            say(f"  {line}")
        panic = next((line for line in m.console.splitlines() if "Kernel panic" in line), None)
        if panic:
            say(f"  console: {panic.split('] ', 1)[-1]}")
        say(f"  ({time.monotonic() - started:.0f} s; console log {log})")
        return m

    def run(self) -> None:
        say("[1/2] building")
        self.build()
        say(f"\n[2/2] booting {self.kernel.version} under QEMU ({self.accel})")
        m = self.boot(
            "v1 on trial; bless it, edit /etc, deploy update v2 from inside",
            "test.bless=1 test.run=install-v2",
        )
        for line in between(m.console, "deploy"):
            say(f"  $ {line}")
        m = self.boot(
            "update v2 on trial; bless it, deploy update v3 from inside",
            "test.bless=1 test.run=install-v3",
        )
        say(f"  /etc/motd on v2: {m.markers().get('motd', '(missing)')}")
        for attempt in range(1, TRIES + 1):
            self.boot(
                f"update v3 on trial, attempt {attempt} of {TRIES}",
                "test.bless=1 test.run=report",
                expect_done=False,
            )
        m = self.boot(
            "nobody touched it: which deployment boots now?", "test.bless=1 test.run=report"
        )
        say("\n  $ overlayroot status")
        for line in between(m.console, "status"):
            say(f"  {line}")
        say("\n  $ overlayroot history")
        for line in between(m.console, "history"):
            say(f"  {line}")
        say("\nThe bad update used up its tries and the machine went back to v2 by itself.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="Build the overlayroot initramfs and boot it under QEMU: an update from"
        " inside the running system, then a bad update that falls back by itself.",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=cache_dir() / "demo",
        help="where the images and console logs go (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    kernel = kernel_from_env() or debian_cloud_kernel()
    started = time.monotonic()
    try:
        Demo(kernel, args.work, choose_accel(kernel)).run()
    except BootFailure as e:
        print(f"demo: {e.reason}; console log: {e.log_path}", file=sys.stderr)
        return 1
    say(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
