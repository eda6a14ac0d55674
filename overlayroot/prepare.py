"""``python -m overlayroot.prepare /sysroot``: the entry point for dracut, mkinitcpio and
initramfs-tools, which mount ``root=`` (the state filesystem) themselves.

It turns the mounted state filesystem into the assembled root in place, like
``ostree-prepare-root /sysroot``, and leaves the switch of root to the framework. Exit status 0
means the root is ready; 1 means it is not, and the console says why.
"""

from __future__ import annotations

import sys

from overlayroot import syscalls
from overlayroot.assemble import Booted, assemble
from overlayroot.cmdline import Options, parse_options
from overlayroot.errors import BootError

RUN_DIR = "/run/overlayroot"


def prepare_root(sysroot: str, run_dir: str, opts: Options, device: str | None) -> Booted:
    """Make ``sysroot`` (the mounted state filesystem) the assembled root."""
    # The framework may have mounted root= read-only (``ro`` on the command line); the state
    # filesystem holds the writable layers.
    try:
        syscalls.mount(None, sysroot, None, syscalls.MS_REMOUNT)
    except OSError as e:
        raise BootError(
            f"cannot remount the state filesystem on {sysroot} read-write: {e}"
        ) from None
    return assemble(sysroot, run_dir, opts, device=device)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m overlayroot.prepare SYSROOT", file=sys.stderr)
        return 2
    try:
        with open("/proc/cmdline") as f:
            opts, warnings = parse_options(f.read())
        for warning in warnings:
            print(f"overlayroot: warning: {warning}", flush=True)
        if not opts.enabled:
            print("overlayroot: overlayroot=off: leaving the root as it is", flush=True)
            return 0
        booted = prepare_root(args[0], RUN_DIR, opts, opts.state)
    except BootError as e:
        print(f"overlayroot: error: {e}", flush=True)
        return 1
    print(f"overlayroot: prepared deployment {booted.deployment.id} on {args[0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
