"""The ELF closure: real system binaries, and small libraries built to test the search rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from initrd.elf import ElfClosureError, Symlink, ld_so_conf_dirs, read_elf, resolve_closure

PYTHON = Path("/usr/bin/python3")
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.mark.skipif(not PYTHON.exists(), reason="no /usr/bin/python3")
def test_python_closure_has_libc_and_the_loader_under_its_pt_interp_name() -> None:
    info = read_elf(PYTHON)
    assert info.interpreter is not None
    closure = resolve_closure([PYTHON])
    assert "libc.so.6" in closure.libraries
    # Every link on the way to the loader is kept, so PT_INTERP resolves in the image.
    links = {link.path: link.target for link in closure.symlinks}
    path = info.interpreter
    for _ in range(10):
        parent = next((p for p in [path, *path.parents] if p in links), None)
        if parent is None:
            break
        target = PurePosixPath(links[parent])
        base = target if target.is_absolute() else parent.parent / target
        path = base / path.relative_to(parent)
    assert path in closure.files
    assert all(not Path(f).is_symlink() for f in closure.files)


def make_lib(
    root: Path,
    path: str,
    needs: list[str],
    *,
    rpath: str = "",
    runpath: str = "",
    soname: str | None = None,
) -> Path:
    """A libc-free shared object at ``root/path`` needing ``needs`` (by name)."""
    out = root / path.lstrip("/")
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_suffix(".c")
    src.write_text("int f(void) { return 0; }\n")
    args = ["gcc", "-shared", "-nostdlib", "-Wl,--no-as-needed", "-o", str(out), str(src)]
    args += [f"-Wl,--soname,{soname or Path(path).name}"]
    stubs = root / "stubs"
    stubs.mkdir(exist_ok=True)
    for name in needs:
        stub = stubs / name
        if not stub.exists():
            subprocess.run(
                ["gcc", "-shared", "-nostdlib", f"-Wl,--soname,{name}", "-o", str(stub), str(src)],
                check=True,
            )
        args.append(str(stub))
    if rpath:
        args += [f"-Wl,-rpath,{rpath}", "-Wl,--disable-new-dtags"]
    if runpath:
        args += [f"-Wl,-rpath,{runpath}", "-Wl,--enable-new-dtags"]
    subprocess.run(args, check=True)
    src.unlink()
    return out


@needs_gcc
def test_runpath_applies_only_to_the_objects_own_needs(tmp_path: Path) -> None:
    make_lib(tmp_path, "/opt/x/libb.so", ["libc1.so"])
    make_lib(tmp_path, "/opt/x/libc1.so", [])
    make_lib(tmp_path, "/app/exe", ["libb.so"], runpath="/opt/x")
    with pytest.raises(ElfClosureError, match=r"libb.so: needs libc1.so"):
        resolve_closure([Path("/app/exe")], tmp_path)


@needs_gcc
def test_rpath_is_inherited_by_the_libraries_loaded_through_it(tmp_path: Path) -> None:
    make_lib(tmp_path, "/opt/x/libb.so", ["libc1.so"])
    make_lib(tmp_path, "/opt/x/libc1.so", [])
    make_lib(tmp_path, "/app/exe", ["libb.so"], rpath="/opt/x")
    closure = resolve_closure([Path("/app/exe")], tmp_path)
    assert closure.libraries == {
        "libb.so": PurePosixPath("/opt/x/libb.so"),
        "libc1.so": PurePosixPath("/opt/x/libc1.so"),
    }


@needs_gcc
def test_origin_expands_to_the_objects_directory(tmp_path: Path) -> None:
    make_lib(tmp_path, "/app/lib/libb.so", [])
    make_lib(tmp_path, "/app/bin/exe", ["libb.so"], runpath="$ORIGIN/../lib")
    closure = resolve_closure([Path("/app/bin/exe")], tmp_path)
    assert closure.libraries["libb.so"] == PurePosixPath("/app/lib/libb.so")


@needs_gcc
def test_ld_so_conf_includes_are_searched_and_linked_into_a_default_dir(tmp_path: Path) -> None:
    (tmp_path / "etc/ld.so.conf.d").mkdir(parents=True)
    (tmp_path / "etc/ld.so.conf").write_text("# comment\ninclude /etc/ld.so.conf.d/*.conf\n")
    (tmp_path / "etc/ld.so.conf.d/opt.conf").write_text("/opt/lib\n")
    make_lib(tmp_path, "/opt/lib/libb.so", [])
    make_lib(tmp_path, "/app/exe", ["libb.so"])
    assert ld_so_conf_dirs(tmp_path) == ["/opt/lib"]
    closure = resolve_closure([Path("/app/exe")], tmp_path)
    assert closure.libraries["libb.so"] == PurePosixPath("/opt/lib/libb.so")
    assert Symlink(PurePosixPath("/lib/x86_64-linux-gnu/libb.so"), "/opt/lib/libb.so") in (
        closure.symlinks
    )


@needs_gcc
def test_a_library_of_another_machine_is_skipped(tmp_path: Path) -> None:
    wrong = make_lib(tmp_path, "/first/libb.so", [])
    data = bytearray(wrong.read_bytes())
    data[18:20] = (183).to_bytes(2, "little")  # e_machine = EM_AARCH64
    wrong.write_bytes(bytes(data))
    make_lib(tmp_path, "/second/libb.so", [])
    make_lib(tmp_path, "/app/exe", ["libb.so"], rpath="/first:/second")
    closure = resolve_closure([Path("/app/exe")], tmp_path)
    assert closure.libraries["libb.so"] == PurePosixPath("/second/libb.so")


def test_a_file_that_is_not_elf_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "script").write_text("#!/bin/sh\n")
    with pytest.raises(ElfClosureError, match="script: not a readable ELF file"):
        read_elf(Path("/script"), tmp_path)
