"""The committed cffi module is what ffi_build generates from the declarations."""

from __future__ import annotations

from pathlib import Path

from overlayroot.core import ffi_build
from overlayroot.core.ffi_build import generate


def test_the_generated_module_is_current(tmp_path: Path) -> None:
    fresh = tmp_path / "_syscalls_ffi.py"
    generate(fresh)
    committed = Path(ffi_build.__file__).with_name("_syscalls_ffi.py")
    assert fresh.read_text() == committed.read_text(), (
        "overlayroot/core/_syscalls_ffi.py is stale: run `python -m overlayroot.core.ffi_build`"
    )
