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
    overlayroot_decompress overlay loop erofs squashfs softdog
}

# The stage's modules and what they need, stored decompressed, as initramfs-tools stores every
# module "for boot speed": the kernel then does not decompress them at each boot (Debian 13's
# .ko.xz: erofs and overlay load in 77 and 98 ms of the instruction clock instead of 103 and
# 136), and the image is compressed as a whole anyway. The signature is inside the compressed
# file, so the kernel checks it as before. dracut runs depmod on the image after every module's
# installkernel, so modules.dep names the new files. Without the tool a module stays compressed,
# and still loads.
overlayroot_decompress() {
    local name line file
    local -a tool
    for name in "$@"; do
        line=$(grep -m1 -E "(^|/)$name\.ko(\.(xz|zst|gz))?:" "$srcmods/modules.dep" 2> /dev/null) || continue
        for file in ${line/:/}; do
            file=$initdir/lib/modules/$kernel/$file
            case $file in
                *.ko.xz) tool=(xz -d -f) ;;
                *.ko.zst) tool=(zstd -q -d -f --rm) ;;
                *.ko.gz) tool=(gzip -d -f) ;;
                *) continue ;;
            esac
            if [[ ! -f $file ]] || ! command -v "${tool[0]}" > /dev/null; then
                continue
            fi
            "${tool[@]}" -- "$file" || dwarn "overlayroot: could not decompress $file; it stays as it is"
        done
    done
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
