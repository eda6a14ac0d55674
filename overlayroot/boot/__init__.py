"""The boot stage: what runs in the initramfs, as PID 1 of our own image or from a generator's
hook. It imports only this package and :mod:`overlayroot.core` (a test pins that), and stays
quick to import: no ``subprocess``, ``shutil`` or ``dataclasses``."""
