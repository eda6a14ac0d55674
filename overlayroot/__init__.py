"""overlayroot: boot an immutable, self-healing root from a frozen Python initramfs stage.

The package is frozen into the initramfs, so importing it must stay cheap: no module here
imports anything at import time that the boot stage does not need.
"""

__version__ = "0.1.0"
