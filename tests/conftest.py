"""Suite-wide settings."""

from hypothesis import settings

# The QEMU harness's fixtures (kernel, machine, …): a plugin of this checkout, not installed.
pytest_plugins = ["qemu.plugin"]

# The suite shares two cores with QEMU guests: time per example varies too much for deadlines.
settings.register_profile("overlayroot", deadline=None)
settings.load_profile("overlayroot")
