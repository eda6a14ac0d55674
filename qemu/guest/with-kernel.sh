#!/bin/sh
# sh with-kernel.sh SCRATCH KVER MODULES CONFIG COMMAND…, in the mount namespace of
# `unshare --mount` (qemu/debian.py): run COMMAND (a generator) with MODULES at
# /lib/modules/KVER and CONFIG at /boot/config-KVER. /lib (often a link to usr/lib) and /boot
# get tmpfs-backed overlays so nothing is written to the host.
set -e
mount --make-rprivate /
mount -t tmpfs tmpfs "$1"
for dir in /lib /boot; do
    real=$(readlink -f "$dir")
    mkdir -p "$1/upper$real" "$1/work$real"
    mount -t overlay overlay -o "lowerdir=$real,upperdir=$1/upper$real,workdir=$1/work$real" "$real"
done
mkdir -p "/lib/modules/$2"
mount --bind "$3" "/lib/modules/$2"
cp "$4" "/boot/config-$2"
shift 4
exec "$@"
