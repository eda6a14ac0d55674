#!/bin/bash
# shellcheck disable=SC2154  # initdir, moddir, systemdsystemunitdir: set by dracut
# dracut module "overlayroot": the overlayroot stage turns the state filesystem that dracut
# mounted from root= into the assembled root (a read-only deployment, a writable /etc, the
# persistent /var and /home), in both dracut modes. See docs/integrations.md.
#
# Enable: copy this directory to /usr/lib/dracut/modules.d/90overlayroot, then
#   echo 'add_dracutmodules+=" overlayroot "' > /etc/dracut.conf.d/overlayroot.conf

# The builder is pip's /usr/local/bin/overlayroot, which dracut's PATH leaves out;
# $OVERLAYROOT_COMMAND (environment or dracut.conf.d) names another.
overlayroot_command() {
    if [[ $OVERLAYROOT_COMMAND ]]; then
        echo "$OVERLAYROOT_COMMAND"
    elif command -v overlayroot; then
        :
    elif [[ -x /usr/local/bin/overlayroot ]]; then
        echo /usr/local/bin/overlayroot
    fi
}

# called by dracut
check() {
    if [[ -z $(overlayroot_command) ]]; then
        derror "overlayroot: the overlayroot command is not installed (pip install" \
            "'overlayroot[build]'), or set OVERLAYROOT_COMMAND"
        return 1
    fi
    # Only when asked for: it changes what root= means.
    return 255
}

# called by dracut
depends() {
    echo rootfs-block
}

# called by dracut
installkernel() {
    # softdog: the watchdog of a trial boot, on machines without a hardware one.
    hostonly='' instmods overlay loop erofs squashfs softdog
}

# called by dracut
install() {
    local builder payload
    builder=$(overlayroot_command)
    payload=$(mktemp -d "$DRACUT_TMPDIR/overlayroot-payload.XXXXXX")
    # dracut ignores what install() returns: a stage that is not in the image must stop the
    # build, or the machine would boot the state filesystem as its root.
    if ! "$builder" initrd build --payload-dir "$payload" --entry overlayroot.boot.prepare > /dev/null; then
        dfatal "overlayroot: '$builder initrd build' failed; the error is above"
        exit 1
    fi
    # The frozen interpreter, its libraries and the stage all live under /usr; the payload's
    # /init, /dev and other top-level directories belong to dracut.
    cp -a "$payload/usr/." "$initdir/usr/"
    local link
    for link in "$payload"/*; do
        if [[ -L $link && ! -e $initdir/${link##*/} && ! -L $initdir/${link##*/} ]]; then
            cp -a "$link" "$initdir/"
        fi
    done
    rm -rf -- "$payload"
    inst_multiple modprobe

    if dracut_module_included "systemd"; then
        inst_simple "$moddir/overlayroot-prepare.service" \
            "$systemdsystemunitdir/overlayroot-prepare.service"
        $SYSTEMCTL -q --root "$initdir" add-wants initrd-root-fs.target overlayroot-prepare.service
    else
        # Early, so the other pre-pivot hooks (mount-usr at 50) see the assembled root.
        inst_hook pre-pivot 10 "$moddir/overlayroot-prepare.sh"
    fi
}
