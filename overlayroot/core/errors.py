"""The one exception type a user is meant to read."""


class BootError(Exception):
    """A failure the user can act on: the message names what failed and what to do next.

    The boot stage prints it as ``overlayroot: error: <message>`` with no traceback; the
    command-line tool prints it the same way and exits 1.
    """
