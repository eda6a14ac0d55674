"""The QEMU boot harness and its pytest plugin."""
