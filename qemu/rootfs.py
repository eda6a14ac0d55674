"""Test deployments: a tiny busybox root whose init reports what it sees as console markers.

What the init does beyond reporting, chosen by the root and by the kernel command line:

- ``make_test_root(fail=...)``: the root is a bad update. After its markers its init exits
  (``exit``: the kernel panics, "Attempted to kill init"), crashes the kernel through sysrq
  (``panic``) or hangs forever (``hang``: only a watchdog gets the machine back).
- ``make_test_root(command=...)``: the root carries the ``overlayroot`` command, frozen (the root
  has no Python of its own): the stage's interpreter and libraries and a zip of the modules the
  commands import, built by ``initrd`` as a payload, plus ``/usr/bin/overlayroot``.
- ``make_test_root(scripts={NAME: text})`` and ``test.run=NAME`` on the command line: the init
  runs ``/usr/lib/overlayroot-test/run/NAME`` with ``sh`` (scripts print their own markers) and
  reports ``run_status``.
- ``test.bless=1``: the init runs ``overlayroot bless``, standing in for boot-complete.target
  and overlayroot-bless.service, and reports ``bless``.

A ``reboot`` or ``poweroff`` without ``-f`` (what ``overlayroot bless`` runs) signals PID 1; the
init traps the signal and does it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from qemu.initramfs import BUSYBOX

MOUNT_POINTS = ("etc", "var", "home", "run", "proc", "sys", "dev", "tmp", "root")
APPLETS = (
    "sh",
    "mount",
    "cat",
    "tr",
    "rm",
    "sync",
    "poweroff",
    "reboot",
    "ls",
    "sleep",
    "echo",
    "mkdir",
    "grep",
    "uname",
    "insmod",
)
FAILURES = ("exit", "panic", "hang")
TEST_DIR = "usr/lib/overlayroot-test"
# Payload paths the test root does not take: the initramfs's own /init and its empty mount
# points and device nodes (the root has its own).
SEED = "seeded-from-image"

# The guest side, in files shellcheck sees (tests/unit/test_hooks_shellcheck.py).
GUEST = Path(__file__).resolve().parent / "guest"
COMMON_SCRIPT = GUEST / "common.sh"
INIT_SCRIPT = GUEST / "busybox-init.sh"


def make_test_root(
    dest: Path,
    *,
    with_init: bool = True,
    image: str = "test",
    fail: str | None = None,
    command: Path | None = None,
    scripts: Mapping[str, str] | None = None,
) -> Path:
    """A busybox root at `dest` whose /sbin/init prints OVERLAYROOT-TEST markers and powers off.

    `image` names this root in the `image=` marker, to tell deployments apart. `fail` (one of
    FAILURES) makes it a bad update; `command` is a payload from `build_command_payload` to make
    `overlayroot` available; `scripts` are what `test.run=NAME` can run.
    """
    if fail is not None and fail not in FAILURES:
        raise ValueError(f"fail={fail!r} is not one of {FAILURES}")
    dest.mkdir(parents=True, exist_ok=True)
    for directory in (*MOUNT_POINTS, "bin", "sbin", f"{TEST_DIR}/run", "var/lib/testdata"):
        (dest / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    for applet in APPLETS:
        (dest / "bin" / applet).symlink_to("busybox")
    (dest / "etc" / "hostname").write_text("overlayroot-test\n")
    (dest / "etc" / "os-release").write_text('ID=overlayroot-test\nNAME="overlayroot test root"\n')
    (dest / TEST_DIR / "image").write_text(image + "\n")
    shutil.copy2(COMMON_SCRIPT, dest / TEST_DIR / COMMON_SCRIPT.name)
    (dest / "var" / "lib" / "testdata" / "seed").write_text(SEED + "\n")
    if fail is not None:
        (dest / TEST_DIR / "fail").write_text(fail + "\n")
    for name, text in (scripts or {}).items():
        (dest / TEST_DIR / "run" / name).write_text(text)
    if command is not None:
        add_command(dest, command)
    if with_init:
        init = dest / "sbin" / "init"
        shutil.copy2(INIT_SCRIPT, init)
        init.chmod(0o755)
    return dest


def add_kernel(
    root: Path,
    vmlinuz: Path,
    initramfs: Path,
    version: str,
    modules: Path | None = None,
    module_names: tuple[str, ...] = (),
) -> Path:
    """Give the root a kernel of its own, the bootc way: ``/usr/lib/modules/<version>/vmlinuz``
    and ``initramfs.img``, plus the modules named (``dummy``: paths found in ``modules``'s
    ``modules.dep``, stored decompressed, so busybox ``insmod`` loads them from
    ``/lib/modules/<version>/<path>``). Returns the kernel's directory in the root."""
    from initrd.kmod import decompress

    directory = root / "usr" / "lib" / "modules" / version
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(vmlinuz, directory / "vmlinuz")
    shutil.copy2(initramfs, directory / "initramfs.img")
    if module_names:
        assert modules is not None
        wanted = {name.replace("-", "_") for name in module_names}
        for line in (modules / "modules.dep").read_text().splitlines():
            relative = line.partition(":")[0]
            name = Path(relative).name.split(".ko")[0].replace("-", "_")
            if name in wanted:
                target = root / "lib" / "modules" / version / relative.split(".ko")[0]
                target = target.with_name(target.name + ".ko")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(decompress(modules / relative))
                wanted.discard(name)
        if wanted:
            raise ValueError(f"modules {sorted(wanted)} are not in {modules}/modules.dep")
    return directory


def make_broken_root(dest: Path) -> Path:
    """A test root with everything but /sbin/init."""
    return make_test_root(dest, with_init=False, image="broken")


def build_command_payload(dest: Path) -> Path:
    """The frozen `overlayroot` command as a tree at `dest` (built once, then copied into any
    number of roots by `make_test_root(command=dest)`): what `overlayroot install-command`
    builds."""
    from initrd.command import build_command

    return build_command(dest)


def add_command(root: Path, payload: Path) -> None:
    """The payload's interpreter, libraries, frozen modules and `/usr/bin/overlayroot` in
    `root`, as `overlayroot install-command --replace ROOT` puts them."""
    from initrd.command import install_command

    install_command(payload, root, replace=True)
