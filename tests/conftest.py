"""Suite-wide settings."""

from hypothesis import settings

# The suite shares two cores with QEMU guests: time per example varies too much for deadlines.
settings.register_profile("overlayroot", deadline=None)
settings.load_profile("overlayroot")
