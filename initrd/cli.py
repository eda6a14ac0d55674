"""``overlayroot initrd build``: options and the command itself."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from initrd.build import PREPARE_ENTRY, BuildConfig, BuildResult, Compression, build_initramfs
from initrd.errors import BuildError
from initrd.freeze import DEFAULT_ENTRIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--modules",
        metavar="DIR",
        type=Path,
        help="the kernel's /lib/modules/<version> directory (default: no kernel modules)",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--output", metavar="FILE", type=Path, help="the image to write")
    target.add_argument(
        "--payload-dir",
        metavar="DIR",
        type=Path,
        help="write the image's tree into this empty directory instead of an archive",
    )
    parser.add_argument(
        "--python",
        metavar="PATH",
        type=Path,
        default=Path("/usr/bin/python3"),
        help="the interpreter to freeze the stage for (default: /usr/bin/python3)",
    )
    parser.add_argument(
        "--compress",
        choices=[c.value for c in Compression],
        default=Compression.ZSTD.value,
        help="archive compression (default: zstd; none builds fastest, for tests)",
    )
    parser.add_argument(
        "--add-module",
        metavar="NAME",
        action="append",
        default=[],
        help="a kernel module to add to the defaults, with its dependencies (repeatable)",
    )
    parser.add_argument(
        "--entry",
        metavar="MODULE",
        action="append",
        default=[],
        help="a module to freeze with everything it imports (repeatable; default:"
        f" {', '.join(DEFAULT_ENTRIES)}); {PREPARE_ENTRY} also installs"
        " /usr/lib/overlayroot/prepare, the command the dracut, initramfs-tools and mkinitcpio"
        " hooks run",
    )
    parser.add_argument(
        "--busybox",
        metavar="PATH|auto|none",
        default="auto",
        help="busybox for the rescue shell (overlayroot.break=, overlayroot.onfail=shell):"
        " a busybox binary, auto (the default: /usr/bin/busybox when installed, e.g. by"
        " busybox-static) or none (a Python prompt only); Debian's busybox-static adds 0.6 MB"
        " to a zstd image."
        " Never in a --payload-dir: the generator that takes it brings its own shell",
    )
    parser.add_argument("--json", action="store_true", help="print the build result as JSON")


def run(args: argparse.Namespace) -> int:
    if args.add_module and args.modules is None:
        raise BuildError("--add-module needs --modules DIR: the modules come from that directory")
    config = BuildConfig(
        modules_dir=args.modules,
        output=args.payload_dir or args.output,
        python=args.python,
        compress=Compression(args.compress),
        extra_modules=tuple(args.add_module),
        source_date_epoch=_source_date_epoch(),
        payload=args.payload_dir is not None,
        entries=tuple(args.entry) or DEFAULT_ENTRIES,
        busybox=args.busybox,
    )
    result = build_initramfs(config)
    print(json.dumps(result.to_json(), indent=2) if args.json else summary(result))
    return 0


def summary(result: BuildResult) -> str:
    kernel = (
        f"{len(result.kernel_modules)} kernel modules for {result.kernel_version}"
        if result.kernel_version
        else "no kernel modules"
    )
    return (
        f"{result.output}: {result.size / 1e6:.1f} MB ({result.compression}), "
        f"{result.entries} entries in {result.seconds:.1f} s\n"
        f"  {result.python}: {result.frozen_modules} frozen modules, "
        f"{len(result.extension_modules)} extension modules, {result.libraries} libraries\n"
        f"  {kernel}"
        + (f"\n  rescue shell: busybox from {result.busybox}" if result.busybox else "")
    )


MAX_EPOCH = 0xFFFFFFFF  # cpio's 8 hex digits of mtime: early in 2106


def _source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH", "0")
    # ASCII digits only: int() also takes "٣", "1_0", " 1" and "+1".
    epoch = int(value) if value.isascii() and value.isdigit() and len(value) < 20 else -1
    if not 0 <= epoch <= MAX_EPOCH:
        raise BuildError(
            f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds since 1970 up to {MAX_EPOCH}"
            " (what a cpio archive holds); unset it or fix it"
        )
    return epoch
