#!/bin/sh
# /sbin/init of the busybox test roots (qemu/rootfs.py): says what the booted system sees in
# OVERLAYROOT-TEST markers, does what the kernel command line's test.* words ask, powers off.
# Reads only builtins until the uptime is out, so the marker times the boot, not the script.
[ -r /proc/uptime ] || /bin/mount -t proc proc /proc
read -r uptime _ < /proc/uptime
echo "OVERLAYROOT-TEST uptime=$uptime"
PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
# shellcheck source=common.sh
. /usr/lib/overlayroot-test/common.sh
# busybox reboot / poweroff signal PID 1: TERM and USR2.
trap 'sync; reboot -f' TERM
trap 'sync; poweroff -f' USR2

mark pid "$$"
mark image "$(cat /usr/lib/overlayroot-test/image)"
mark kernel "$(uname -r)"
root_write=$(try_write /.overlayroot-test-probe x)
if [ "$root_write" = ok ]; then
    rm -f /.overlayroot-test-probe
    mark root_ro no
else
    mark root_ro yes
    mark root_write_error "$root_write"
fi
probe etc_writable /etc/.overlayroot-test-probe
mark_mounts
mark_init_nice
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

read_test_options
write_tokens
read_tokens_back
if [ -n "$read_tokens" ]; then
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
