"""The builder's one exception type a user is meant to read."""


class BuildError(Exception):
    """An initramfs build that cannot go on: the message names what failed and what to do.

    ``overlayroot initrd build`` prints it as ``overlayroot: error: <message>`` and exits 1.
    The builder runs at image build time, never in the boot stage: it does not raise the
    stage's ``BuildError``.
    """
