# shellcheck shell=sh
# What the test roots' scripts share (busybox-init.sh, debian-report.sh): markers on the
# console, write probes, the mounts, and the tokens the kernel command line asks for. Sourced
# from /usr/lib/overlayroot-test/common.sh in the guest.

# mark NAME VALUE: one "OVERLAYROOT-TEST NAME=VALUE" line, what the harness reads.
mark() { echo "OVERLAYROOT-TEST $1=$2"; }

# try_write FILE CONTENT: "ok", or the error text (e.g. "Read-only file system")
try_write() {
    error=$( { echo "$2" > "$1"; } 2>&1 ) && { echo ok; return; }
    echo "${error##*: }"
}

# probe NAME PATH: mark NAME yes when PATH can be written (and removes it), no otherwise.
probe() {
    if [ "$(try_write "$2" x)" = ok ]; then
        rm -f "$2"
        mark "$1" yes
    else
        mark "$1" no
    fi
}

# mark_mounts: what is mounted on /, /etc, /var and /home ("" when nothing).
mark_mounts() {
    mount_root="" mount_etc="" mount_var="" mount_home=""
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
}

# read_test_options: the test.* words of the kernel command line, as variables for the script
# that sources this file (each script uses its own).
read_test_options() {
    # shellcheck disable=SC2034  # run, bless, deploy_id, analyze: read by the sourcing script
    token="" read_tokens="" run="" bless="" deploy_id="" analyze=""
    read -r cmdline < /proc/cmdline
    for word in $cmdline; do
        # shellcheck disable=SC2034
        case $word in
            test.write=*) token=${word#test.write=} ;;
            test.read=1) read_tokens=1 ;;
            test.run=*) run=${word#test.run=} ;;
            test.bless=1) bless=1 ;;
            test.deploy=*) deploy_id=${word#test.deploy=} ;;
            test.analyze=1) analyze=1 ;;
        esac
    done
}

# write_tokens: test.write=TOKEN into /etc, /var, /home and / (the last must fail: read-only).
write_tokens() {
    [ -n "$token" ] || return 0
    mark write_etc "$(try_write /etc/test-token "$token")"
    mark write_var "$(try_write /var/test-token "$token")"
    mark write_home "$(try_write /home/test-token "$token")"
    mark write_root "$(try_write /test-token "$token")"
    sync
}

# read_tokens_back: test.read=1 marks what an earlier boot's write_tokens left.
read_tokens_back() {
    [ -n "$read_tokens" ] || return 0
    mark etc_token "$(cat /etc/test-token 2>/dev/null)"
    mark var_token "$(cat /var/test-token 2>/dev/null)"
    mark home_token "$(cat /home/test-token 2>/dev/null)"
}

# mark_init_nice: PID 1's nice value (field 19 of /proc/1/stat; its name, field 2, has no
# spaces): the stage runs hurried and must hand the real init the usual priority.
mark_init_nice() {
    read -r stat < /proc/1/stat
    # shellcheck disable=SC2086  # split into the fields
    set -- $stat
    shift 18
    mark init_nice "$1"
}
