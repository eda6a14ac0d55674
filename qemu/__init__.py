"""The QEMU boot harness and its pytest plugin.

kernel.py     the kernel to boot: $OVERLAYROOT_KERNEL(_MODULES) or Debian's cloud kernel
accel.py      kvm only if a probe guest really boots under it, else tcg
machine.py    one guest: serial console through a pipe, wait_for, wait_exit, kill (power cut)
initramfs.py  busybox initramfs images (cpio command) for probes and harness tests
disks.py      GPT + ext4 disk images built and read without mounting
rootfs.py     test deployments whose /sbin/init prints OVERLAYROOT-TEST markers
plugin.py     fixtures `kernel`, `qemu_accel`, `machine`; console logs named on failure
"""
