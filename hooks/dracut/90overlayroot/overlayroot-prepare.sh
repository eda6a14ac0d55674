#!/bin/sh
# dracut pre-pivot hook (dracut's shell init): assemble the root on $NEWROOT. Sourced by
# dracut's /init, so it must `return`, never `exit`.

# shellcheck source=/dev/null
type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh

# No modprobe: the stage loads overlay, erofs (squashfs, loop, softdog when a boot needs them)
# and their dependencies itself, from the image's modules.dep.
# PYTHONHASHSEED=0: no wait for the kernel's random pool (initrd/build.py, prepare_script).
if ! PYTHONHASHSEED=0 /usr/lib/overlayroot/prepare "$NEWROOT"; then
    # Honours rd.shell and rd.emergency=reboot|poweroff|halt.
    emergency_shell -n overlayroot "overlayroot could not assemble the root; the reason is above"
fi
return 0
