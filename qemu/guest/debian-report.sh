#!/bin/sh
# /usr/lib/overlayroot-test/report of the Debian test images (qemu/debian.py, qemu/trixie.py),
# run once multi-user.target is reached: what the booted system sees, in OVERLAYROOT-TEST
# markers straight on the console (not through journald), then a poweroff.
exec >/dev/console 2>&1
# shellcheck source=common.sh
. /usr/lib/overlayroot-test/common.sh

mark multi_user_us "$(systemctl show -P ActiveEnterTimestampMonotonic multi-user.target)"
mark initrd_us "$(systemctl show -P InitRDTimestampMonotonic)"
mark userspace_us "$(systemctl show -P UserspaceTimestampMonotonic)"
read -r uptime _ < /proc/uptime
mark uptime "$uptime"
mark kernel "$(uname -r)"

if [ "$(try_write /.overlayroot-test-probe x)" = ok ]; then
    rm -f /.overlayroot-test-probe
    mark root_ro no
else
    mark root_ro yes
fi
probe tmp_writable /tmp/.overlayroot-test-probe
probe etc_writable /etc/.overlayroot-test-probe
mark_mounts
mark_init_nice

failed=$(systemctl list-units --state=failed --plain --no-legend --no-pager |
    while read -r unit _; do printf '%s ' "$unit"; done)
mark failed "$failed"
mark machine_id "$(cat /etc/machine-id)"
mark hostname "$(cat /etc/hostname)"
if [ -f /run/overlayroot/booted.json ]; then
    mark booted_json "$(tr -d '\n' < /run/overlayroot/booted.json)"
fi
# The bless: this unit runs after it (After=), which runs after boot-complete.target.
mark boot_complete "$(systemctl is-active boot-complete.target)"
mark boot_complete_us "$(systemctl show -P ActiveEnterTimestampMonotonic boot-complete.target)"
mark bless_active "$(systemctl is-active overlayroot-bless.service)"
mark bless_result "$(systemctl show -P Result overlayroot-bless.service)"
mark bless_start_us \
    "$(systemctl show -P ExecMainStartTimestampMonotonic overlayroot-bless.service)"
if command -v overlayroot > /dev/null && [ -f /run/overlayroot/booted.json ]; then
    mark status "$(overlayroot status --json | tr -d '\n')"
fi
mark modules "$(while read -r name _; do printf '%s ' "$name"; done < /proc/modules)"
# A module's parameter from the command line (loop.max_loop=): applied by whoever loaded it.
mark loop_max_loop "$(cat /sys/module/loop/parameters/max_loop 2> /dev/null)"
# The loop devices that exist (the stage's loop.max_loop=0: only the one it asked for).
loops=0
for device in /sys/block/loop*; do
    [ -e "$device" ] && loops=$((loops + 1))
done
mark loop_devices "$loops"

read_test_options
# test.analyze=1 (bench.integrations --analyze): where systemd's part of the boot went, for the
# log; after the markers above, so it does not count in the boot's figures. What
# `systemd-analyze blame` shows, which refuses to run before the boot has finished (this unit
# is part of it): each unit's activation time, the slowest first, with when it began (not
# devices: theirs is the wait for udev to announce them).
if [ -n "$analyze" ]; then
    systemctl show --no-pager -p Id -p InactiveExitTimestampMonotonic \
        -p ActiveEnterTimestampMonotonic '*' |
        awk 'BEGIN { RS = ""; FS = "\n" }
            {
                id = ""; began = 0; active = 0
                for (i = 1; i <= NF; i++) {
                    split($i, kv, "=")
                    if (kv[1] == "Id") id = kv[2]
                    if (kv[1] == "InactiveExitTimestampMonotonic") began = kv[2]
                    if (kv[1] == "ActiveEnterTimestampMonotonic") active = kv[2]
                }
                if (began > 0 && active > began && id !~ /\.device$/)
                    printf "%7.2fs  from %6.2fs  %s\n", (active - began) / 1e6, began / 1e6, id
            }' |
        sort -rn | head -n 30 | sed 's/^/overlayroot-test-blame: /'
    journalctl -b -u overlayroot-bless.service -o short-monotonic --no-pager 2>&1 |
        tail -n 15 | sed 's/^/overlayroot-test-bless: /'
fi
write_tokens
# test.deploy=ID: deploy the update the test put on the state filesystem at updates/ID.erofs
# (after the bless: the unit runs after it), as an update service would.
if [ -n "$deploy_id" ]; then
    overlayroot deploy --id "$deploy_id" "/run/overlayroot/state/updates/$deploy_id.erofs"
    mark deploy "$?"
fi
read_tokens_back

echo "OVERLAYROOT-TEST done"
systemctl --no-block poweroff
