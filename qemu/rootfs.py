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
APPLETS = ("sh", "mount", "cat", "tr", "rm", "sync", "poweroff", "reboot", "ls", "sleep", "echo",
           "mkdir", "grep", "uname", "insmod")
FAILURES = ("exit", "panic", "hang")
TEST_DIR = "usr/lib/overlayroot-test"
# Payload paths the test root does not take: the initramfs's own /init and its empty mount
# points and device nodes (the root has its own).
SEED = "seeded-from-image"

# Reads only builtins until the uptime is out, so the marker times the boot, not the script.
INIT_SCRIPT = r"""#!/bin/sh
[ -r /proc/uptime ] || /bin/mount -t proc proc /proc
read -r uptime _ < /proc/uptime
echo "OVERLAYROOT-TEST uptime=$uptime"
PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
mark() { echo "OVERLAYROOT-TEST $1=$2"; }
# busybox reboot / poweroff signal PID 1: TERM and USR2.
trap 'sync; reboot -f' TERM
trap 'sync; poweroff -f' USR2

# try_write FILE CONTENT: "ok", or the error text (e.g. "Read-only file system")
try_write() {
    error=$( { echo "$2" > "$1"; } 2>&1 ) && { echo ok; return; }
    echo "${error##*: }"
}

mark pid "$$"
mark image "$(cat /usr/lib/overlayroot-test/image)"
root_write=$(try_write /.overlayroot-test-probe x)
if [ "$root_write" = ok ]; then
    rm -f /.overlayroot-test-probe
    mark root_ro no
else
    mark root_ro yes
    mark root_write_error "$root_write"
fi
if [ "$(try_write /etc/.overlayroot-test-probe x)" = ok ]; then
    rm -f /etc/.overlayroot-test-probe
    mark etc_writable yes
else
    mark etc_writable no
fi

while read -r device mountpoint fstype options _; do
    case $mountpoint in
        /) mount_root="$device $fstype $options" ;;
        /etc) mount_etc="$device $fstype $options" ;;
        /var) mount_var="$device $fstype $options" ;;
        /home) mount_home="$device $fstype $options" ;;
    esac
done < /proc/mounts
mark mount_root "$mount_root"
mark mount_etc "$mount_etc"
mark mount_var "$mount_var"
mark mount_home "$mount_home"
if [ -f /run/overlayroot/booted.json ]; then
    mark booted_json "$(tr -d '\n' < /run/overlayroot/booted.json)"
fi

if [ -f /usr/lib/overlayroot-test/fail ]; then
    read -r failure < /usr/lib/overlayroot-test/fail
    mark failing "$failure"
    sync
    case $failure in
        exit) exit 1 ;;
        panic) echo c > /proc/sysrq-trigger ;;
        hang) while :; do sleep 3600; done ;;
    esac
fi

for word in $(cat /proc/cmdline); do
    case $word in
        test.write=*) token=${word#test.write=} ;;
        test.read=1) read_tokens=1 ;;
        test.run=*) run=${word#test.run=} ;;
        test.bless=1) bless=1 ;;
    esac
done
if [ -n "$token" ]; then
    mark write_etc "$(try_write /etc/test-token "$token")"
    mark write_var "$(try_write /var/test-token "$token")"
    mark write_home "$(try_write /home/test-token "$token")"
    mark write_root "$(try_write /test-token "$token")"
    sync
fi
if [ -n "$read_tokens" ]; then
    mark etc_token "$(cat /etc/test-token 2>/dev/null)"
    mark var_token "$(cat /var/test-token 2>/dev/null)"
    mark home_token "$(cat /home/test-token 2>/dev/null)"
    mark var_seed "$(cat /var/lib/testdata/seed 2>/dev/null)"
fi
if [ -n "$bless" ]; then
    overlayroot bless
    mark bless "$?"
fi
if [ -n "$run" ]; then
    if [ -f "/usr/lib/overlayroot-test/run/$run" ]; then
        sh "/usr/lib/overlayroot-test/run/$run"
        mark run_status "$?"
    else
        mark run_missing "$run"
    fi
fi

echo "OVERLAYROOT-TEST done"
sync
poweroff -f
"""


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
    (dest / "var" / "lib" / "testdata" / "seed").write_text(SEED + "\n")
    if fail is not None:
        (dest / TEST_DIR / "fail").write_text(fail + "\n")
    for name, text in (scripts or {}).items():
        (dest / TEST_DIR / "run" / name).write_text(text)
    if command is not None:
        add_command(dest, command)
    if with_init:
        init = dest / "sbin" / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
    return dest


def add_kernel(root: Path, vmlinuz: Path, initramfs: Path, version: str,
               modules: Path | None = None, module_names: tuple[str, ...] = ()) -> Path:
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
