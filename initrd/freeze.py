"""Freeze exactly the Python modules the boot stage imports, compiled by the target interpreter.

The target interpreter (not the one running the builder) imports the entry modules in a
subprocess started like the stage itself (``-E -s -S``, an empty environment), with the source
root first on ``sys.path`` followed by the interpreter's normal path — ``site`` is what adds
Debian's ``dist-packages``, where ``_cffi_backend`` lives, so that path is asked for in a first,
separate run and the import run itself never executes ``site``. Every module in ``sys.modules``
afterwards that came from a file is frozen: ``.py`` sources become unchecked hash-based ``.pyc``
(no mtimes, compiled by the target for its own bytecode version, as ``-OO`` compiles: no
docstrings and no asserts, less to load at boot) in a stored zip, extension modules go to
``lib-dynload``. Built-in and frozen modules live in the interpreter binary.

Only imports that happen at import time are seen: a function-level ``import`` that runs later
must be listed as an extra entry module (the stage's own are in ``LAZY_IMPORTS``).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from initrd.errors import BuildError

DEFAULT_ENTRIES = ("overlayroot.boot.init",)
# Stage modules imported inside the functions that need them, so that a normal boot does not
# pay for loading them: frozen with any entry of the stage (tests/unit/test_layering.py checks
# that every module the stage imports, at the top or in a function, is frozen).
LAZY_IMPORTS = (
    "overlayroot.boot.kexec",
    "overlayroot.boot.priority",  # imported by the image's scripts first (build.HURRY)
    "overlayroot.boot.rescue",
    "overlayroot.core.digest",
    "overlayroot.core.treecopy",
    "overlayroot.core.watchdog",
)

# Runs in the target interpreter. The modules present before the entries are imported are the
# ones startup itself loads (encodings…): they are frozen too. Nothing is imported by the probe
# before that snapshot is complete.
_PROBE = r"""
import sys
sep = sys.argv.index("--")
zip_path, entries, sys.path[:] = sys.argv[1], sys.argv[2:sep], sys.argv[sep + 1:]
for entry in entries:
    __import__(entry)
found = []
for name, module in sorted(sys.modules.items()):
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None)
    if origin in (None, "built-in", "frozen") or not origin.startswith("/"):
        continue
    found.append((name, origin, spec.submodule_search_locations is not None))
import json
from importlib.util import source_hash
from importlib._bootstrap_external import _code_to_hash_pyc
out = []
for name, origin, package in found:
    entry = {"name": name, "origin": origin, "package": package}
    if origin.endswith(".py"):
        arcname = name.replace(".", "/") + ("/__init__.pyc" if package else ".pyc")
        with open(origin, "rb") as f:
            source = f.read()
        code = compile(
            source, zip_path + "/" + arcname[:-1], "exec", dont_inherit=True, optimize=2
        )
        entry["arcname"] = arcname
        entry["pyc"] = bytes(_code_to_hash_pyc(code, source_hash(source), False)).hex()
    out.append(entry)
print(json.dumps(out))
"""

_PATHS = r"""
import json, sys
print(json.dumps({
    "path": [p for p in sys.path if p],
    "version": list(sys.version_info[:2]),
    "prefix": sys.prefix,
    "exec_prefix": sys.exec_prefix,
    "platlibdir": sys.platlibdir,
}))
"""


@dataclass(frozen=True)
class Extension:
    name: str
    source: Path
    """The ``.so`` on the host."""
    path: PurePosixPath
    """Where it goes in the image (in ``lib-dynload``)."""


@dataclass(frozen=True)
class Frozen:
    python: PurePosixPath
    """The real path of the interpreter (also its path in the image)."""
    version: tuple[int, int]
    zip_path: PurePosixPath
    zip_data: bytes
    dynload_dir: PurePosixPath
    modules: tuple[str, ...]
    """Every module in the zip, sorted."""
    extensions: tuple[Extension, ...]


def freeze(
    python: Path,
    source_root: Path,
    entries: tuple[str, ...] = DEFAULT_ENTRIES,
    source_date_epoch: int = 0,
) -> Frozen:
    """Import ``entries`` with ``python`` from ``source_root`` and freeze what they load.

    Raises BuildError when the interpreter cannot be run or an entry module fails to import.
    """
    if not os.access(python, os.X_OK) or not python.is_file():
        raise BuildError(
            f"{python}: no such Python interpreter; pass the target's python3 with --python"
        )
    if any(e.startswith("overlayroot.") for e in entries):
        entries += tuple(
            m
            for m in LAZY_IMPORTS
            if m not in entries and source_root.joinpath(*m.split(".")).with_suffix(".py").exists()
        )
    real = Path(os.path.realpath(python))
    info = _run(real, ["-E", "-s", "-c", _PATHS], "read sys.path")
    major, minor = info["version"]
    libdir = PurePosixPath(info["prefix"]) / info["platlibdir"]
    zip_path = libdir / f"python{major}{minor}.zip"
    dynload = (
        PurePosixPath(info["exec_prefix"]) / info["platlibdir"] / f"python{major}.{minor}"
    ) / "lib-dynload"
    search = [str(source_root.resolve()), *(p for p in info["path"] if p != str(zip_path))]
    argv = ["-E", "-s", "-S", "-c", _PROBE, str(zip_path), *entries, "--", *search]
    found = _run(real, argv, f"import {', '.join(entries)} from {source_root}")

    members: dict[str, bytes] = {}
    extensions: list[Extension] = []
    for module in found:
        if "pyc" in module:
            members[module["arcname"]] = bytes.fromhex(module["pyc"])
        elif module["origin"].endswith(".so"):
            if "." in module["name"]:
                raise BuildError(
                    f"{module['origin']}: extension module {module['name']} is inside a "
                    "package; only top-level extension modules can be frozen (lib-dynload)"
                )
            origin = Path(module["origin"])
            extensions.append(Extension(module["name"], origin, dynload / origin.name))
        else:
            raise BuildError(
                f"{module['origin']}: module {module['name']} is neither Python source nor "
                "an extension module and cannot be frozen"
            )
    return Frozen(
        python=PurePosixPath(real),
        version=(major, minor),
        zip_path=zip_path,
        zip_data=make_zip(members, source_date_epoch),
        dynload_dir=dynload,
        modules=tuple(sorted(m["name"] for m in found if "pyc" in m)),
        extensions=tuple(extensions),
    )


def make_zip(members: dict[str, bytes], source_date_epoch: int = 0) -> bytes:
    """A stored (uncompressed) zip of ``members``, sorted, with fixed timestamps.

    zipimport reads stored entries without zlib; the timestamps are clamped to 1980, the
    earliest a zip can hold.
    """
    stamp = time.gmtime(max(source_date_epoch, 315532800))[:6]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            archive.writestr(info, members[name])
    return buffer.getvalue()


def _run(python: Path, args: list[str], what: str) -> Any:
    """What the interpreter prints as JSON when it runs ``args``."""
    try:
        proc = subprocess.run(
            [str(python), *args], capture_output=True, text=True, env={}, check=False
        )
    except OSError as e:
        raise BuildError(f"{python}: cannot run it to {what} ({e.strerror})") from e
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        raise BuildError(
            f"{python}: failed to {what}:\n  " + "\n  ".join(tail or ["(no error output)"])
        )
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise BuildError(
            f"{python}: answered {proc.stdout[:60]!r} when asked to {what}, not what a Python"
            " interpreter prints; pass the target's python3 with --python"
        ) from None
