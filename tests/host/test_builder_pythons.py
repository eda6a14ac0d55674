"""The builder and the stage on every Python from 3.11 it can find: each host interpreter
(``/usr/bin/python3.N``, ``/usr/local/bin/python3.N``) through this checkout's builder with
``--python``, and Debian 13's Python 3.13 through the builder pip installed inside the trixie
image (qemu.trixie), run there with that Python.

Each payload (the standalone image's entry and the hooks' together) must freeze exactly the
stdlib set pinned for its version (tests/unit/test_initrd_freeze.py), carry neither OpenSSL
nor hashlib, and its stage must hash with the interpreter's built-in sha256 (``_sha256`` up to
3.11, ``_sha2`` from 3.12) when run by the frozen interpreter alone, chrooted into the payload.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from qemu import trixie
from tests.unit.test_initrd_freeze import check_stage_stdlib

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chroot")

CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
PYTHON_NAME = re.compile(r"python3\.(1[1-9]|[2-9][0-9])")
# Run by the payload's own interpreter (-I -S, as the stage starts): the stage's digests of a
# file of the payload (sha256 and BLAKE2b-256), and which sha256 module served it.
STAGE_DIGEST = (
    "import sys\nfrom overlayroot.core import digest\n"
    "print(digest.sha256.__module__, digest.file_sha256(sys.argv[1]),"
    " digest.HAS_BLAKE2B and digest.file_blake2b(sys.argv[1]))"
)
DIGESTED = "usr/lib/overlayroot/build.json"


def host_pythons() -> list[Path]:
    """The host's interpreters from 3.11 on, one per real file."""
    found: dict[str, Path] = {}
    for directory in (Path("/usr/bin"), Path("/usr/local/bin")):
        for path in sorted(directory.glob("python3.*")):
            if PYTHON_NAME.fullmatch(path.name) and os.access(path, os.X_OK):
                found.setdefault(os.path.realpath(path), path)
    return list(found.values())


def zip_modules(names: list[str]) -> list[str]:
    """Module names from the paths of a frozen zip's .pyc files."""
    return [n.removesuffix(".pyc").removesuffix("/__init__").replace("/", ".") for n in names]


def check_payload(
    info: dict[str, Any],
    zip_names: list[str],
    files: list[str],
    stage_digest: str,
    expected: tuple[str, str],
) -> None:
    version = tuple(int(p) for p in info["python_version"].split("."))
    assert len(version) == 2
    check_stage_stdlib((version[0], version[1]), zip_modules(zip_names))
    assert not [f for f in files if re.search(r"lib(crypto|ssl)\.so|_hashlib", f)], files
    module, sha256, blake2b = stage_digest.split()
    assert module == ("_sha256" if version < (3, 12) else "_sha2")
    assert (sha256, blake2b) == expected


@pytest.mark.parametrize("python", host_pythons(), ids=lambda p: p.name)
def test_the_builder_freezes_the_stage_for_each_host_python(python: Path, tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "overlayroot",
            "initrd",
            "build",
            "--python",
            str(python),
            "--payload-dir",
            str(payload),
            "--entry",
            "overlayroot.boot.init",
            "--entry",
            "overlayroot.boot.prepare",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    info = json.loads((payload / "usr/lib/overlayroot/build.json").read_text())
    (zip_path,) = (payload / "usr/lib").glob("python3*.zip")
    files = [str(p.relative_to(payload)) for p in payload.rglob("*")]
    ran = subprocess.run(
        [CHROOT, str(payload), info["python"], "-I", "-S", "-c", STAGE_DIGEST, "/" + DIGESTED],
        capture_output=True,
        text=True,
        env={},
    )
    assert ran.returncode == 0, ran.stderr
    digested = (payload / DIGESTED).read_bytes()
    expected = (
        hashlib.sha256(digested).hexdigest(),
        hashlib.blake2b(digested, digest_size=32).hexdigest(),
    )
    check_payload(info, zipfile.ZipFile(zip_path).namelist(), files, ran.stdout, expected)


# Runs inside the trixie image with its Python 3.13: the pip-installed command builds a payload
# in /run (a tmpfs of the chroot's namespace: the cached image is not changed), the payload's
# interpreter runs the stage's digest chrooted into it, and the findings come back as JSON.
IN_TRIXIE = r"""
import glob, hashlib, json, os, subprocess, sys, zipfile
payload = "/run/payload"
subprocess.run(["overlayroot", "initrd", "build", "--payload-dir", payload,
                "--entry", "overlayroot.boot.init", "--entry", "overlayroot.boot.prepare",
                "--json"],
               check=True, stdout=subprocess.DEVNULL)
info = json.load(open(payload + "/usr/lib/overlayroot/build.json"))
(zip_path,) = glob.glob(payload + "/usr/lib/python3*.zip")
files = [os.path.relpath(os.path.join(d, n), payload) for d, ds, ns in os.walk(payload)
         for n in ds + ns]
ran = subprocess.run(["/usr/sbin/chroot", payload, info["python"], "-I", "-S", "-c", sys.argv[1],
                      "/" + sys.argv[2]], capture_output=True, text=True, env={}, check=True)
print(json.dumps({
    "builder": "%d.%d" % sys.version_info[:2], "info": info, "files": files,
    "zip": zipfile.ZipFile(zip_path).namelist(), "stage_digest": ran.stdout,
    "expected": [hashlib.sha256(open(payload + "/" + sys.argv[2], "rb").read()).hexdigest(),
                 hashlib.blake2b(open(payload + "/" + sys.argv[2], "rb").read(),
                                 digest_size=32).hexdigest()],
}))
"""


def test_the_builder_inside_debian_13_freezes_the_stage_for_its_python_3_13() -> None:
    try:
        image = trixie.trixie_image()
    except trixie.TrixieUnavailable as e:
        pytest.skip(f"the trixie image cannot be built here: {e}")
    found = json.loads(
        trixie.in_chroot(image.root, trixie.PYTHON, "-c", IN_TRIXIE, STAGE_DIGEST, DIGESTED)
    )
    assert found["builder"] == found["info"]["python_version"] == "3.13"
    check_payload(
        found["info"],
        found["zip"],
        found["files"],
        found["stage_digest"],
        tuple(found["expected"]),
    )


def test_the_trixie_images_initramfs_were_frozen_by_its_own_python() -> None:
    """Both initramfs images qemu.trixie builds inside the image (the standalone one and
    update-initramfs' with our hook) carry a stage frozen by the image's Python 3.13, not the
    host's: build.json says which interpreter; and pip put the command in /usr/local/bin."""
    try:
        image = trixie.trixie_image()
    except trixie.TrixieUnavailable as e:
        pytest.skip(f"the trixie image cannot be built here: {e}")
    assert image.python_version == "3.13"
    for initrd in (image.standalone, image.initramfs_tools):
        info = json.loads(trixie.initrd_member(initrd, "usr/lib/overlayroot/build.json"))
        assert (info["python"], info["python_version"]) == ("/usr/bin/python3.13", "3.13")
    assert (image.root / "usr/local/bin/overlayroot").exists()
