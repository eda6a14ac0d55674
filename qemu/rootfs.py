"""Test deployments: a tiny busybox root whose init reports what it sees as console markers."""

from __future__ import annotations

import shutil
from pathlib import Path

from qemu.initramfs import BUSYBOX

MOUNT_POINTS = ("etc", "var", "home", "run", "proc", "sys", "dev", "tmp", "root")
APPLETS = ("sh", "mount", "cat", "tr", "rm", "sync", "poweroff", "reboot", "ls", "sleep")
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

for word in $(cat /proc/cmdline); do
    case $word in
        test.write=*) token=${word#test.write=} ;;
        test.read=1) read_tokens=1 ;;
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

echo "OVERLAYROOT-TEST done"
sync
poweroff -f
"""


def make_test_root(dest: Path, *, with_init: bool = True, image: str = "test") -> Path:
    """A busybox root at `dest` whose /sbin/init prints OVERLAYROOT-TEST markers and powers off.

    `image` names this root in the `image=` marker, to tell deployments apart.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for directory in (*MOUNT_POINTS, "bin", "sbin", "usr/lib/overlayroot-test", "var/lib/testdata"):
        (dest / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    for applet in APPLETS:
        (dest / "bin" / applet).symlink_to("busybox")
    (dest / "etc" / "hostname").write_text("overlayroot-test\n")
    (dest / "etc" / "os-release").write_text('ID=overlayroot-test\nNAME="overlayroot test root"\n')
    (dest / "usr" / "lib" / "overlayroot-test" / "image").write_text(image + "\n")
    (dest / "var" / "lib" / "testdata" / "seed").write_text(SEED + "\n")
    if with_init:
        init = dest / "sbin" / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
    return dest


def make_broken_root(dest: Path) -> Path:
    """A test root with everything but /sbin/init."""
    return make_test_root(dest, with_init=False, image="broken")
