"""The ``overlayroot`` command: ``deploy``, ``initrd build``.

This module is frozen into the initramfs with the rest of the package, so it imports only
``argparse`` at the top; each subcommand imports its module when it runs. ``initrd build``
belongs to the builder (the ``build`` extra), which the initramfs does not carry: its options are
parsed by ``initrd.cli`` once it is imported, so ``overlayroot --help`` works without it.
"""

from __future__ import annotations

import argparse
import sys

from overlayroot import __version__
from overlayroot.errors import BootError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlayroot",
        description="Boot an immutable Linux root from deployments on a state filesystem.",
    )
    parser.add_argument("--version", action="version", version=f"overlayroot {__version__}")
    parser.add_argument("--debug", action="store_true", help="print a traceback with every error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    deploy = commands.add_parser(
        "deploy",
        help="lay out a deployment on a state filesystem",
        description="Write a deployment (erofs, squashfs or a tree) with its manifest into"
        " <sysroot>/overlayroot/, with the persistent directories the boot stage expects.",
    )
    add_deploy_arguments(deploy)
    deploy.set_defaults(handler=run_deploy)

    initrd = commands.add_parser(
        "initrd", help="build initramfs images", description="Build initramfs images."
    )
    initrd_commands = initrd.add_subparsers(dest="initrd_command", metavar="COMMAND", required=True)
    build = initrd_commands.add_parser(
        "build",
        help="freeze the boot stage into an initramfs (options: overlayroot initrd build --help)",
        add_help=False,
        prefix_chars="\0",
    )
    build.add_argument("arguments", nargs=argparse.REMAINDER)
    build.set_defaults(handler=run_initrd_build)
    return parser


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    # Declared here rather than in overlayroot.deploy: importing that for its options would cost
    # every command.
    parser.add_argument(
        "--sysroot",
        required=True,
        help="the state filesystem's root (mounted, or a directory to pack later)",
    )
    parser.add_argument("source", help="a directory tree, or an erofs or squashfs image file")
    parser.add_argument(
        "--id",
        dest="deployment_id",
        metavar="ID",
        help="deployment id (default: the creation time, YYYYMMDD.HHMMSS in UTC)",
    )
    parser.add_argument(
        "--format",
        choices=["erofs", "squashfs", "dir"],
        help="what to build from a directory source (default: erofs); an image source is"
        " detected from its superblock and copied as is",
    )
    parser.add_argument(
        "--created",
        metavar="TIME",
        help="creation time, RFC 3339 ('2024-05-01T12:00:00Z') or '@<unix seconds>'; fixes the"
        " image's build time and every file's mtime so that builds are reproducible (default:"
        " $SOURCE_DATE_EPOCH, else now with mtimes kept)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the manifest and the path as JSON"
    )


def run_deploy(args: argparse.Namespace) -> int:
    from overlayroot import deploy

    return deploy.run(args)


def run_initrd_build(args: argparse.Namespace) -> int:
    import importlib

    try:
        # By name: the builder is optional, and absent from the initramfs.
        cli = importlib.import_module("initrd.cli")
    except ImportError as e:
        raise BootError(
            f"the initramfs builder is not installed ({e}): pip install 'overlayroot[build]'"
        ) from None
    parser = argparse.ArgumentParser(
        prog="overlayroot initrd build",
        description="Freeze the overlayroot boot stage into an initramfs.",
    )
    cli.add_arguments(parser)
    return int(cli.run(parser.parse_args(args.arguments)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except BootError as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"overlayroot: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("overlayroot: interrupted", file=sys.stderr)
        return 130
