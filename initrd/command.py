"""``overlayroot install-command ROOT``: the frozen ``overlayroot`` command, put into an image's
root that has no Python of its own (or not the one overlayroot needs).

What lands in ROOT: the interpreter at its own path, every library of its closure with the
loader, the frozen zip of the command's modules (``cli`` and each subcommand's, see
``overlayroot.commands.cli.FROZEN_MODULES``) beside the interpreter's standard library, and
``/usr/bin/overlayroot``, a two-line launcher. The same builder as the initramfs's freezes it,
so the result is as reproducible.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from initrd.build import BuildConfig, build_initramfs
from initrd.errors import BuildError

ENTRY = "overlayroot.commands.cli"
# What a payload holds that belongs to an initramfs, not to a root.
NOT_FOR_A_ROOT = ("init", "dev", "proc", "sys", "run", "tmp", "sysroot")
LAUNCHER = Path("usr/bin/overlayroot")


def launcher(python: str) -> str:
    return f"#!{python} -IS\nimport sys\n\nfrom {ENTRY} import main\n\nsys.exit(main())\n"


def build_command(dest: Path, python: Path = Path("/usr/bin/python3")) -> Path:
    """The frozen command as a tree at ``dest`` (an empty or new directory), ready to copy into
    any number of roots with :func:`install_command`."""
    from overlayroot.commands.cli import FROZEN_MODULES

    result = build_initramfs(
        BuildConfig(
            modules_dir=None,
            output=dest,
            payload=True,
            python=python,
            entries=(ENTRY, *FROZEN_MODULES),
        )
    )
    for name in NOT_FOR_A_ROOT:
        path = dest / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    (dest / LAUNCHER).parent.mkdir(parents=True, exist_ok=True)
    (dest / LAUNCHER).write_text(launcher(result.python))
    (dest / LAUNCHER).chmod(0o755)
    return dest


def install_command(payload: Path, root: Path, *, replace: bool = False) -> list[str]:
    """Copy ``payload`` (made by :func:`build_command`) into ``root``; returns the paths kept
    because ``root`` had them already. Without ``replace`` a file the root has is kept: an
    image's own libc is as new as the builder's or newer, and replacing it could break the
    image's other programs. The launcher is always written."""
    if not root.is_dir():
        raise BuildError(
            f"{root} is not a directory: give the root of the image to install the command into"
        )
    kept: list[str] = []
    for entry in sorted(os.listdir(payload)):
        _merge(payload / entry, root / entry, Path(entry), replace, kept)
    shutil.copy2(payload / LAUNCHER, root / LAUNCHER)
    return [k for k in kept if Path(k) != LAUNCHER]


def _merge(source: Path, target: Path, relative: Path, replace: bool, kept: list[str]) -> None:
    if source.is_symlink():
        if target.is_symlink() and os.readlink(target) == os.readlink(source):
            return  # the same link (lib -> usr/lib)
        if not os.path.lexists(target):
            target.symlink_to(os.readlink(source))
        elif replace and not target.is_dir():
            target.unlink()
            target.symlink_to(os.readlink(source))
        else:
            kept.append(str(relative))
    elif source.is_dir():
        if target.is_symlink() and target.is_dir():
            # usrmerge: /lib -> usr/lib in the image; merge through the link.
            pass
        else:
            target.mkdir(exist_ok=True)
        for entry in sorted(os.listdir(source)):
            _merge(source / entry, target / entry, relative / entry, replace, kept)
    elif os.path.lexists(target) and not replace:
        kept.append(str(relative))
    else:
        if target.is_symlink():
            target.unlink()
        shutil.copy2(source, target)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "root",
        metavar="ROOT",
        type=Path,
        help="the root directory of the image to install the command into",
    )
    parser.add_argument(
        "--python",
        metavar="PATH",
        type=Path,
        default=Path("/usr/bin/python3"),
        help="the interpreter to freeze the command for; it is copied into ROOT at the same"
        " path (default: /usr/bin/python3)",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="replace files ROOT has already (libraries, the interpreter); by default the"
        " image's own are kept",
    )
    parser.add_argument("--json", action="store_true", help="print what was done as JSON")


def run(args: argparse.Namespace) -> int:
    root: Path = args.root
    if not root.is_dir():
        raise BuildError(
            f"{root} is not a directory: give the root of the image to install the command into"
        )
    with tempfile.TemporaryDirectory(prefix="overlayroot-command.") as work:
        payload = build_command(Path(work) / "payload", args.python)
        kept = install_command(payload, root, replace=args.replace)
    report = {"root": str(root), "command": f"/{LAUNCHER}", "kept": kept}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"installed /{LAUNCHER} into {root}"
            + (f"; kept {len(kept)} files the image had (--replace replaces them)" if kept else "")
        )
    return 0
