"""What the boot stage and the commands share: the on-disk model (``layout``), the boot state
and its rules (``bootstate``, ``statefile``), the system calls, and the stage-safe helpers for
files, digests and JSON. Frozen into the initramfs with the stage, so just as cheap to import."""
