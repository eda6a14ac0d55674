"""The ``overlayroot`` command: deployments and their boot state, and ``initrd build``.

This module is frozen into the initramfs with the rest of the package, so it imports only
``argparse`` at the top; each subcommand imports its module when it runs (``FROZEN_MODULES``
lists them, for a frozen copy of the command). ``initrd build`` belongs to the builder (the
``build`` extra), which the initramfs does not carry: its options are parsed by ``initrd.cli``
once it is imported, so ``overlayroot --help`` works without it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from overlayroot import __version__
from overlayroot.core.errors import BootError

# Every module the commands import when they run, besides this one: what a frozen copy of the
# command (the busybox test root's, say) must carry. The freezer sees only top-level imports.
FROZEN_MODULES = (
    "overlayroot.commands.deploy",
    "overlayroot.commands.manage",
    "overlayroot.commands.status",
    "overlayroot.commands.health",
    "overlayroot.commands.etcdiff",
    "overlayroot.commands.bootpair",
    "tomllib",  # deploy reads a root's kargs.d
    "traceback",  # --debug
)

SYSROOT_HELP = (
    "the state filesystem, mounted at DIR (default: the one this system booted from, as"
    " /run/overlayroot/booted.json says)"
)


BOOT_DIR_HELP = (
    "the boot pair's directory (default: the one line of /etc/overlayroot/boot-dir in a booted"
    " system, else overlayroot/boot on the state filesystem)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlayroot",
        description="Boot an immutable Linux root from deployments on a state filesystem.",
    )
    parser.add_argument("--version", action="version", version=f"overlayroot {__version__}")
    parser.add_argument("--debug", action="store_true", help="print a traceback with every error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--sysroot", metavar="DIR", help=SYSROOT_HELP)

    def command(name: str, handler: str, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=description)
        sub.set_defaults(handler=handler)
        return sub

    status = command(
        "status",
        "status:run_status",
        "show the deployments and their boot state",
        "A table of the deployments: which one is booted, the default, the rollback and the"
        " one-shot choice; priority, tries left, whether each is known good (blessed), why one"
        " was marked bad; created, size and origin.",
    )
    status.add_argument("--json", action="store_true", help="print it as JSON")
    status.add_argument("--boot-dir", metavar="DIR", help=BOOT_DIR_HELP)

    deploy = command(
        "deploy",
        "deploy:run",
        "stage a deployment and make it the default, on trial",
        "Write a deployment (erofs, squashfs or a tree) with its manifest into the state"
        " filesystem and make it the default, on trial. In a booted system, it starts with a"
        " copy of the booted deployment's /etc changes.",
    )
    add_deploy_arguments(deploy)

    command(
        "rollback",
        "manage:run_rollback",
        "boot the previous good deployment next",
        "Make the best known-good deployment other than the booted one the default.",
    )
    bless = command(
        "bless",
        "health:run_bless",
        "run the health checks, then mark the booted deployment good",
        "Run the health checks in /etc/overlayroot/check.d/required/ and wanted/; if every"
        " required one passes, mark the booted deployment successful and stop the trial boot's"
        " watchdog. A required check that fails on a trial boot marks the deployment bad and"
        " reboots into the fallback.",
    )
    bless.add_argument(
        "--no-reboot",
        action="store_true",
        help="when a required check fails, mark the deployment bad but do not reboot",
    )
    bless.add_argument("--boot-dir", metavar="DIR", help=BOOT_DIR_HELP)
    bless.add_argument(
        "--check-timeout",
        type=seconds,
        default=60.0,
        metavar="S",
        help="seconds a check may run before it is killed and fails, unless it"
        " names its own with overlayroot-timeout=S in its first lines"
        " (default 60)",
    )

    promote = command(
        "promote",
        "bootpair:run_promote",
        "put a deployment's kernel in the boot pair",
        "Make the boot pair (the vmlinuz and initrd.img one static bootloader entry loads) hold"
        " the kernel and initramfs of a deployment: ID, or by default the newest known-good"
        " deployment that has a kernel of its own. bless does this by itself; this command is"
        " for image pipelines and repairs. Safe against a power cut at any point.",
    )
    promote.add_argument("id", metavar="ID", nargs="?")
    promote.add_argument("--boot-dir", metavar="DIR", help=BOOT_DIR_HELP)

    mark_bad = command(
        "mark-bad",
        "manage:run_mark_bad",
        "never boot a deployment again by itself",
        "Mark a deployment bad: it is not booted again unless chosen by hand.",
    )
    mark_bad.add_argument("id", metavar="ID")
    mark_bad.add_argument(
        "--reason",
        default="marked bad by hand (overlayroot mark-bad)",
        help="why, for status and history",
    )

    set_default = command(
        "set-default",
        "manage:run_set_default",
        "choose the deployment to boot",
        "Make a deployment the default; one not known good gets a fresh set of tries.",
    )
    set_default.add_argument("id", metavar="ID")
    set_default.add_argument(
        "--once", action="store_true", help="boot it next time only, then the default again"
    )

    for name, verb in (("pin", "keep"), ("unpin", "stop keeping")):
        pin = command(
            name,
            f"manage:run_{name}",
            f"{verb} a deployment through gc",
            f"{verb.capitalize()} a deployment through `overlayroot gc`.",
        )
        pin.add_argument("id", metavar="ID")

    gc = command(
        "gc",
        "manage:run_gc",
        "remove old deployments",
        "Remove the deployments beyond the newest N, with their /etc; never the booted, the"
        " default, the rollback, the one-shot or a pinned one.",
    )
    gc.add_argument(
        "--keep",
        type=int,
        required=True,
        metavar="N",
        help="how many of the newest deployments to keep",
    )
    gc.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")

    etc = commands.add_parser(
        "etc", help="the /etc of deployments", description="The /etc of deployments."
    )
    etc_commands = etc.add_subparsers(dest="etc_command", metavar="COMMAND", required=True)
    diff = etc_commands.add_parser(
        "diff",
        parents=[common],
        help="local changes to /etc",
        description="What was added, modified and deleted in a deployment's /etc, against its"
        " image's /etc (default: the booted deployment, else the default).",
    )
    diff.set_defaults(handler="etcdiff:run")
    diff.add_argument("id", metavar="ID", nargs="?")
    diff.add_argument("--json", action="store_true", help="print it as JSON")

    history = command(
        "history",
        "status:run_history",
        "show the boot history",
        "Every boot attempt with its outcome, and the fallbacks, blessings and recoveries.",
    )
    history.add_argument("-n", type=int, metavar="N", dest="count", help="only the last N entries")
    history.add_argument("--json", action="store_true", help="print it as JSON")

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
    build.set_defaults(
        handler=run_builder,
        builder="initrd.cli",
        prog="overlayroot initrd build",
        description="Freeze the overlayroot boot stage into an initramfs.",
    )

    install = commands.add_parser(
        "install-command",
        help="put the frozen overlayroot command into an image's root, Python included"
        " (options: overlayroot install-command --help)",
        add_help=False,
        prefix_chars="\0",
    )
    install.add_argument("arguments", nargs=argparse.REMAINDER)
    install.set_defaults(
        handler=run_builder,
        builder="initrd.command",
        prog="overlayroot install-command",
        description="Put the overlayroot command into the root of an image that has no Python"
        " (or another one): the interpreter, its libraries, the frozen modules and"
        " /usr/bin/overlayroot. Files the root has already are kept unless --replace.",
    )
    return parser


def seconds(text: str) -> float:
    """A positive number of seconds, as an argparse type."""
    try:
        value = float(text) if text.isascii() else -1.0
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 to 86400]")
    return value


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    # Declared here rather than in overlayroot.commands.deploy: importing that for its options
    # would cost every command.
    parser.add_argument(
        "source", help="a directory tree, a tar archive of one, or an erofs or squashfs image"
    )
    parser.add_argument(
        "--id",
        dest="deployment_id",
        metavar="ID",
        help="deployment id (default: the creation time, YYYYMMDD.HHMMSS in UTC)",
    )
    parser.add_argument(
        "--format",
        choices=["erofs", "squashfs", "dir"],  # = layout.FORMATS (a test checks)
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
        "--known-good",
        action="store_true",
        help="register the deployment as known good (blessed) instead of on trial: for a"
        " factory image whose first deployment was tested before it shipped, so that a missing"
        " or failing bless can never use up its tries",
    )
    parser.add_argument(
        "--kernel",
        metavar="VERSION",
        help="the root's kernel to deploy with it, when it has several (default: the newest);"
        " kernels are found at /usr/lib/modules/VERSION/vmlinuz (initramfs.img next to it) and"
        " /boot/vmlinuz-VERSION (/boot/initrd.img-VERSION)",
    )
    parser.add_argument(
        "--no-kernel",
        action="store_true",
        help="deploy without the root's kernel: the deployment boots under the running kernel",
    )
    parser.add_argument(
        "--karg",
        metavar="ARG",
        action="append",
        default=[],
        help="a kernel argument the deployment's kernel boots with (repeatable), after those of"
        " the root's /usr/lib/bootc/kargs.d/*.toml",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the manifest and the path as JSON"
    )


def run_builder(args: argparse.Namespace) -> int:
    """A subcommand of the builder (``initrd build``, ``install-command``), which parses its own
    options: the builder is an optional part (``pip install 'overlayroot[build]'``)."""
    try:
        module = importlib.import_module(args.builder)
        errors = importlib.import_module("initrd.errors")
    except ImportError as e:
        raise BootError(
            f"the initramfs builder is not installed ({e}): pip install 'overlayroot[build]'"
        ) from None
    parser = argparse.ArgumentParser(prog=args.prog, description=args.description)
    module.add_arguments(parser)
    try:
        return int(module.run(parser.parse_args(args.arguments)))
    except errors.BuildError as e:
        raise BootError(str(e)) from None  # printed like every other error of the command


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler = args.handler
        if isinstance(handler, str):
            module, name = handler.split(":")
            handler = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        return int(handler(args))
    except BootError as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"overlayroot: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("overlayroot: interrupted", file=sys.stderr)
        return 130
