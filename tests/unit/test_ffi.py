"""The committed cffi module is what ffi_build generates from the declarations."""

from __future__ import annotations

from pathlib import Path

import overlayroot
from overlayroot.ffi_build import generate


def test_the_generated_module_is_current(tmp_path: Path) -> None:
    fresh = tmp_path / "_syscalls_ffi.py"
    generate(fresh)
    committed = Path(overlayroot.__file__).with_name("_syscalls_ffi.py")
    assert fresh.read_text() == committed.read_text(), (
        "overlayroot/_syscalls_ffi.py is stale: run `python -m overlayroot.ffi_build`"
    )
