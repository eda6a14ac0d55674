"""Load the kernel modules the builder listed, in its order, with finit_module(2)."""

from __future__ import annotations

import errno
import os

from overlayroot.core import syscalls

MODULES_LIST = "/usr/lib/overlayroot/modules.list"


def load_listed(listing: str = MODULES_LIST) -> tuple[list[str], list[str]]:
    """Load every module in ``listing`` (one path a line, dependencies first).

    Returns the names loaded and warnings for the ones that failed: a module that does not load
    (say, a driver for hardware this machine lacks) must not stop the boot by itself; the step
    that needs it fails later with a message about what is missing.
    """
    try:
        with open(listing) as f:
            paths = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return [], []
    loaded, warnings = [], []
    for path in paths:
        name = os.path.basename(path).split(".", 1)[0]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            warnings.append(f"cannot open kernel module {path}: {e.strerror}")
            continue
        try:
            syscalls.finit_module(fd, name)
            loaded.append(name)
        except OSError as e:
            # EEXIST: already loaded. ENODEV: a driver or an alternative implementation (e.g.
            # crc32c-intel on a CPU without SSE 4.2) for hardware this machine does not have.
            if e.errno not in (errno.EEXIST, errno.ENODEV):
                warnings.append(f"kernel module {name} did not load: {e.strerror}")
        finally:
            os.close(fd)
    return loaded, warnings
