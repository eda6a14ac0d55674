"""``overlayroot deploy``: the command line (arguments, ``--created``, the default id) around
:func:`overlayroot.commands.staging.deploy`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from overlayroot.commands import target
from overlayroot.commands.fsops import Progress
from overlayroot.commands.staging import KernelChoice, deploy
from overlayroot.core.errors import BootError

# --created: 9999-12-31T23:59:59Z is the last second whose year has the four digits that the
# manifest's time and the default id are written with.
MAX_EPOCH = 253402300799


def run(args: argparse.Namespace) -> int:
    created = parse_created(args.created, os.environ.get("SOURCE_DATE_EPOCH"))
    where = target.find(args.sysroot)
    if args.sysroot is None:
        target.require_root("overlayroot deploy", where)
    etc_from = None
    if where.booted_id is not None:
        etc_from = Path(where.layout.etc_upper(where.booted_id))
        if not etc_from.is_dir():
            print(
                f"overlayroot: warning: the booted deployment has no /etc upper at {etc_from}:"
                " the new deployment starts with the image's /etc",
                file=sys.stderr,
            )
            etc_from = None
    manifest, final = deploy(
        Path(where.layout.root),
        Path(args.source),
        deployment_id=args.deployment_id,
        fmt=args.format,
        created=created,
        progress=Progress.for_stream(sys.stderr),
        etc_from=etc_from,
        known_good=args.known_good,
        kernel=KernelChoice(args.kernel, args.no_kernel, args.karg),
    )
    if args.json:
        print(json.dumps({**manifest.to_dict(), "path": str(final)}, indent=2, sort_keys=True))
    else:
        print(
            f"deployed {manifest.id} ({manifest.format}, {manifest.size / 2**20:.1f} MiB,"
            f" sha256 {manifest.sha256[:16]}…) at {final}"
        )
        if manifest.kernel is not None:
            kargs = " ".join(manifest.kernel.kargs) or "none"
            print(
                f"{manifest.id} has its own kernel {manifest.kernel.version} (kernel arguments:"
                f" {kargs})"
            )
        else:
            print(f"{manifest.id} has no kernel of its own: it boots under the running kernel")
        carried = f"; /etc carried forward from {where.booted_id}" if etc_from else ""
        if args.known_good:
            print(f"{manifest.id} is the default now, known good: it boots next{carried}")
        else:
            print(
                f"{manifest.id} is the default now, on trial: it boots next{carried}; once it"
                " works, `overlayroot bless` keeps it"
            )
    return 0


def parse_created(option: str | None, source_date_epoch: str | None) -> int | None:
    """UNIX seconds from ``--created`` or ``SOURCE_DATE_EPOCH``; None means "now, not fixed"."""
    if option is not None:
        text, what = option, "--created"
    elif source_date_epoch:
        text, what = "@" + source_date_epoch.strip(), "SOURCE_DATE_EPOCH"
    else:
        return None
    try:
        if text.startswith("@"):
            digits = text[1:]  # ASCII digits only: int() also takes "٣", "1_0" and " 1"
            epoch = int(digits) if digits.isascii() and digits.isdigit() else -1
        else:
            from datetime import UTC, datetime

            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            epoch = int(moment.timestamp())
    except ValueError:  # also digits beyond what int() converts
        epoch = -1
    if not 0 <= epoch <= MAX_EPOCH:
        raise BootError(
            f"{what} {text!r} is not a time from 1970 to 9999: give RFC 3339"
            f" ('2024-05-01T12:00:00Z') or '@<unix seconds>' (0 to {MAX_EPOCH})"
        )
    return epoch
