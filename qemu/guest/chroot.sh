#!/bin/sh
# sh chroot.sh ROOT COMMAND…, in the mount namespace of `unshare --mount` (qemu/trixie.py):
# COMMAND chrooted into ROOT with /proc, /sys, /dev and a /run mounted there; nothing stays
# mounted afterwards.
set -e
mount --make-rprivate /
root=$1
shift
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/run"
exec chroot "$root" "$@"
