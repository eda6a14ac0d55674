#!/bin/busybox sh
# shellcheck shell=dash
# The floor of the stage-time ratio: the least a hand-written busybox shell /init can do to boot
# the kind of root overlayroot boots. Load the modules, find the state filesystem by label, mount
# it, loop-mount the erofs lower read-only, put an overlay with a persistent upper on /etc, bind
# /var and /home, switch_root. No checks, no counting, no fallback, no messages: a Python stage
# that forks nothing should get close to this. bench.boot_time builds the image and the disk.
B=/bin/busybox
$B mount -t proc proc /proc; $B mount -t sysfs sys /sys; $B mount -t devtmpfs dev /dev
$B mkdir -p /run && $B mount -t tmpfs -o mode=0755,nodev,nosuid run /run
for m in $($B cat /modules.order); do $B insmod "/lib/modules/$m.ko" 2>/dev/null; done
dev=""
while [ -z "$dev" ]; do dev=$($B findfs LABEL=floorstate 2>/dev/null) || $B usleep 20000; done
$B mkdir -p /state /newroot && $B mount -t ext4 "$dev" /state
$B mount -t erofs -o ro,loop /state/deploy/root.erofs /newroot
$B mkdir -p /state/etc/upper /state/etc/work /state/var /state/home
$B mount -t overlay overlay -o lowerdir=/newroot/etc,upperdir=/state/etc/upper,workdir=/state/etc/work,index=off,redirect_dir=off,metacopy=off /newroot/etc
$B mount --bind /state/var /newroot/var; $B mount --bind /state/home /newroot/home
$B mount --move /run /newroot/run
$B mount --move /proc /newroot/proc; $B mount --move /sys /newroot/sys; $B mount --move /dev /newroot/dev
exec $B switch_root /newroot /sbin/init
