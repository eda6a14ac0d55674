"""Load the kernel modules the builder listed, in its order, with finit_module(2)."""

from __future__ import annotations

import errno
import os

from overlayroot import syscalls

MODULES_LIST = "/usr/lib/overlayroot/modules.list"
# The same list for one kernel release, named by it: an initramfs that carries the modules of two
# kernels (the boot pair's while it changes kernels, docs/kernels.md) has one list for each.
RELEASE_LIST = "/usr/lib/overlayroot/modules.d/{release}.list"


def listing_for(release: str) -> str:
    """The running kernel's own list when the initramfs has one, else the single list."""
    own = RELEASE_LIST.format(release=release)
    return own if os.path.exists(own) else MODULES_LIST


def load_listed(listing: str | None = None) -> tuple[list[str], list[str]]:
    """Load every module in ``listing`` (one path a line, dependencies first; default: the
    running kernel's list).

    Returns the names loaded and warnings for the ones that failed: a module that does not load
    (say, a driver for hardware this machine lacks) must not stop the boot by itself; the step
    that needs it fails later with a message about what is missing.
    """
    if listing is None:
        listing = listing_for(os.uname().release)
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
