"""Freezing: what the target interpreter imports, compiled by it, into a stored zip."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from initrd.errors import BuildError
from initrd.freeze import freeze, make_zip

PYTHON = Path("/usr/bin/python3")
pytestmark = pytest.mark.skipif(not PYTHON.exists(), reason="no /usr/bin/python3 target")


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    """A tiny ``overlayroot`` package: its init imports a little stdlib and _cffi_backend."""
    package = tmp_path / "src/overlayroot"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "boot").mkdir()
    (package / "boot/__init__.py").write_text("")
    (package / "boot/init.py").write_text(
        "import struct\nfrom overlayroot import helper\n\ndef main() -> None:\n    print('ok')\n"
    )
    (package / "helper.py").write_text("import json\n")
    return tmp_path / "src"


def test_frozen_set_is_the_entry_modules_imports_plus_startup(stand_in: Path) -> None:
    frozen = freeze(PYTHON, stand_in)
    assert {"overlayroot", "overlayroot.boot.init", "overlayroot.helper", "struct", "json"} <= set(
        frozen.modules
    )
    assert {"encodings", "encodings.aliases", "encodings.utf_8"} <= set(frozen.modules)
    # Modules of the probe itself and of site must not leak in.
    assert not {"site", "importlib.util", "argparse"} & set(frozen.modules)
    names = zipfile.ZipFile(io.BytesIO(frozen.zip_data)).namelist()
    assert "overlayroot/__init__.pyc" in names and "encodings/utf_8.pyc" in names
    assert names == sorted(names)


def test_pyc_are_unchecked_hash_based_and_stored(stand_in: Path) -> None:
    frozen = freeze(PYTHON, stand_in)
    archive = zipfile.ZipFile(io.BytesIO(frozen.zip_data))
    for info in archive.infolist():
        assert info.compress_type == zipfile.ZIP_STORED
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        flags = int.from_bytes(archive.read(info)[4:8], "little")
        assert flags == 0b01, info.filename  # hash-based, check_source off


def test_extension_modules_go_to_lib_dynload(stand_in: Path) -> None:
    (stand_in / "overlayroot/boot/init.py").write_text("import _cffi_backend\n")
    try:
        frozen = freeze(PYTHON, stand_in)
    except BuildError as e:
        pytest.skip(f"target has no _cffi_backend: {e}")
    (ext,) = [e for e in frozen.extensions if e.name == "_cffi_backend"]
    assert ext.path.parent == frozen.dynload_dir
    assert ext.path.name == ext.source.name


def test_same_sources_freeze_to_the_same_bytes(stand_in: Path, tmp_path: Path) -> None:
    assert freeze(PYTHON, stand_in).zip_data == freeze(PYTHON, stand_in).zip_data
    assert make_zip({"b.pyc": b"2", "a.pyc": b"1"}) == make_zip({"a.pyc": b"1", "b.pyc": b"2"})


def test_an_entry_that_fails_to_import_is_a_boot_error(stand_in: Path) -> None:
    (stand_in / "overlayroot/boot/init.py").write_text("import no_such_module_here\n")
    with pytest.raises(BuildError, match="no_such_module_here"):
        freeze(PYTHON, stand_in)


def test_a_missing_interpreter_is_a_boot_error(stand_in: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"no such Python interpreter; pass .* --python"):
        freeze(tmp_path / "python9", stand_in)


def test_an_interpreter_that_is_not_python_is_a_boot_error(stand_in: Path, tmp_path: Path) -> None:
    impostor = tmp_path / "python3"
    impostor.write_text("#!/bin/sh\necho hello\n")
    impostor.chmod(0o755)
    with pytest.raises(BuildError) as error:
        freeze(impostor, stand_in)
    assert str(error.value) == (
        f"{os.path.realpath(impostor)}: answered 'hello\\n' when asked to read sys.path, not what"
        " a Python interpreter prints; pass the target's python3 with --python"
    )


# The standard library the boot stage carries: each module costs import time as PID 1 and
# bytes in the initramfs. Growing a set is a decision to make here, with a reason. The stage
# runs on Python 3.11 to 3.13, and each version's interpreter starts with different modules: the
# sets are pinned per version, as 3.11's and each later version's difference from it. The stage
# itself imports no stdlib module beyond __future__ (its JSON is the built-in _json's, its paths
# strings, its numbers and ids checked without re).
STAGE_STDLIB_311 = frozenset({"__future__", "encodings", "encodings.aliases", "encodings.utf_8"})
STAGE_STDLIB = {
    (3, 11): STAGE_STDLIB_311,
    # 3.13 (Debian 13): the interpreter's startup loads linecache.
    (3, 13): STAGE_STDLIB_311 | {"linecache"},
}
# Never in the stage, on any version: OpenSSL (hashlib), process and copying helpers, heavy
# imports.
NEVER_FROZEN = frozenset(
    {
        "subprocess",
        "shutil",
        "hashlib",
        "_hashlib",
        "ssl",
        "argparse",
        "dataclasses",
        "inspect",
        "typing",
    }
)


def stage_stdlib(version: tuple[int, int]) -> frozenset[str]:
    """The pinned set for ``version``; a version without one fails, saying what to decide."""
    if version not in STAGE_STDLIB:
        pytest.fail(
            f"no stage stdlib set is pinned for Python {version[0]}.{version[1]}: freeze"
            " the stage with it, review what it imports and add the set to"
            " STAGE_STDLIB in tests/unit/test_initrd_freeze.py"
        )
    return STAGE_STDLIB[version]


def test_the_stage_freezes_exactly_the_stdlib_modules_decided_on() -> None:
    frozen = freeze(PYTHON, Path(__file__).resolve().parents[2])
    check_stage_stdlib(frozen.version, frozen.modules)


def check_stage_stdlib(version: tuple[int, int], modules: tuple[str, ...] | list[str]) -> None:
    """``modules`` (all that was frozen) hold exactly the stdlib set pinned for ``version``."""
    pinned = stage_stdlib(version)
    stdlib = {m for m in modules if m.split(".")[0] != "overlayroot"}
    assert stdlib == pinned, (
        f"Python {version}: new: {sorted(stdlib - pinned)}, gone: {sorted(pinned - stdlib)}"
    )
    assert not NEVER_FROZEN & set(modules)
