"""The package layout is the architecture: the boot stage (``overlayroot.boot``) and what it
shares with the commands (``overlayroot.core``) never reach the commands, the builder or the
harness, and the stage's frozen import closure stays inside boot + core."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from initrd.build import PREPARE_ENTRY
from initrd.freeze import DEFAULT_ENTRIES, freeze

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "overlayroot"
PYTHON = Path("/usr/bin/python3")
# Never imported by the stage, not even inside a function: the stage runs as PID 1 with only
# what was frozen, and these are the commands' (or the build's) tools.
STAGE_FORBIDDEN = (
    "overlayroot.commands",
    "initrd",
    "qemu",
    "bench",
    "tests",
    "subprocess",
    "shutil",
    "argparse",
    "dataclasses",
    "hashlib",
    "tempfile",
    "random",
)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, as absolute names."""
    found: set[str] = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


STAGE_MODULES = sorted(p for sub in ("boot", "core") for p in (PACKAGE / sub).glob("*.py"))


@pytest.mark.parametrize("path", STAGE_MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stage_modules_never_import_the_commands_or_tools(path: Path) -> None:
    bad = sorted(m for m in imports(path) if within(m, STAGE_FORBIDDEN))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_never_imports_the_boot_stage(path: Path) -> None:
    """The commands import core; core importing boot would drag the stage into them."""
    bad = sorted(m for m in imports(path) if within(m, ("overlayroot.boot",)))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "commands").glob("*.py")), ids=lambda p: p.name)
def test_commands_reach_the_stage_only_through_core(path: Path) -> None:
    bad = sorted(m for m in imports(path) if within(m, ("overlayroot.boot",)))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_imports_checker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    module = PACKAGE / "boot" / "probe_for_the_test.py"  # never written: parsed from text below
    source = "def f():\n    import subprocess\n    from ..commands import deploy\n"
    fake = tmp_path / "overlayroot" / "boot" / module.name
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    found = {m for m in _imports_under(fake, tmp_path)}
    assert {"subprocess", "overlayroot.commands", "overlayroot.commands.deploy"} <= found


def _imports_under(path: Path, root: Path) -> set[str]:
    global ROOT
    saved, ROOT = ROOT, root
    try:
        return imports(path)
    finally:
        ROOT = saved


@pytest.mark.skipif(not PYTHON.exists(), reason="no /usr/bin/python3 to freeze the stage with")
def test_the_frozen_stage_holds_only_boot_and_core() -> None:
    frozen = freeze(PYTHON, ROOT, entries=(*DEFAULT_ENTRIES, PREPARE_ENTRY))
    ours = sorted(m for m in frozen.modules if m.split(".")[0] == "overlayroot")
    assert "overlayroot.boot.prepare" in ours and "overlayroot.core.bootstate" in ours
    outside = [
        m
        for m in ours
        if m != "overlayroot" and not within(m, ("overlayroot.boot", "overlayroot.core"))
    ]
    assert not outside, f"the stage's import closure leaves boot + core: {outside}"
    assert "overlayroot.core.ffi_build" not in ours


@pytest.mark.skipif(not PYTHON.exists(), reason="no /usr/bin/python3 to freeze the stage with")
@pytest.mark.parametrize("entry", [DEFAULT_ENTRIES[0], PREPARE_ENTRY])
def test_every_stage_module_the_stage_can_import_is_frozen(entry: str) -> None:
    """Modules imported inside a function (so that a normal boot does not load them) are not
    seen by the freeze's import run: initrd.freeze.LAZY_IMPORTS adds them. A new lazy import
    that is not listed there would fail only on the boot that needs it."""
    frozen = set(freeze(PYTHON, ROOT, entries=(entry,)).modules)
    reachable: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in reachable:
            continue
        reachable.add(name)
        path = ROOT.joinpath(*name.split("."))
        source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        todo += [
            m
            for m in imports(source)
            if within(m, ("overlayroot.boot", "overlayroot.core"))
            and (ROOT.joinpath(*m.split(".")).with_suffix(".py")).exists()
        ]
    missing = sorted(reachable - frozen)
    assert not missing, f"imported by the stage but not frozen: {missing} (add to LAZY_IMPORTS)"
