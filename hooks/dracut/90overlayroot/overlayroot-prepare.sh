#!/bin/sh
# dracut pre-pivot hook (dracut's shell init): assemble the root on $NEWROOT. Sourced by
# dracut's /init, so it must `return`, never `exit`.

# shellcheck source=/dev/null
type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh

modprobe -a -q overlay loop erofs squashfs
[ -e /dev/watchdog ] || modprobe -q softdog

if ! /usr/lib/overlayroot/prepare "$NEWROOT"; then
    # Honours rd.shell and rd.emergency=reboot|poweroff|halt.
    emergency_shell -n overlayroot "overlayroot could not assemble the root; the reason is above"
fi
return 0
