"""The initramfs builder: freezes the runtime into a minimal, reproducible initramfs."""
