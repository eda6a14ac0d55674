"""``overlayroot initrd build``: options, output, and the errors a user can meet."""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path

import pytest

from initrd import cli
from initrd.build import SOURCE_ROOT
from initrd.errors import BuildError
from initrd.freeze import freeze

needs_python = pytest.mark.skipif(
    not Path("/usr/bin/python3").exists(), reason="no /usr/bin/python3 target"
)


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def test_a_missing_modules_directory_names_it_and_the_option(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"/nope: no such modules directory.*--modules"):
        run("--modules", "/nope", "-o", str(tmp_path / "img"))


def test_a_missing_interpreter_names_it_and_the_option(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"/no/python: no such Python interpreter.*--python"):
        run("--python", "/no/python", "-o", str(tmp_path / "img"))


def test_an_unwritable_output_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(BuildError, match=r"file/img: cannot write there"):
        run("-o", str(tmp_path / "file/img"))
    with pytest.raises(BuildError, match="is a directory"):
        run("-o", str(tmp_path))


@needs_python
def test_an_unknown_module_names_it_and_the_modules_directory(tmp_path: Path) -> None:
    kdir = tmp_path / "6.1.0-test"
    kdir.mkdir()
    (kdir / "modules.builtin").write_text("")
    with pytest.raises(BuildError, match=rf"kernel module overlay \(requested\).*{kdir}"):
        run("--modules", str(kdir), "-o", str(tmp_path / "img"), "--compress", "none")


def test_add_module_without_modules_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="--add-module needs --modules"):
        run("--add-module", "dm-verity", "-o", str(tmp_path / "img"))


def test_a_bad_source_date_epoch_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(BuildError, match="SOURCE_DATE_EPOCH='yesterday'"):
        run("-o", str(tmp_path / "img"))


def test_output_and_payload_dir_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        run("-o", str(tmp_path / "img"), "--payload-dir", str(tmp_path / "p"))


@needs_python
def test_json_reports_the_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("-o", str(tmp_path / "img"), "--compress", "none", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["output"] == str(tmp_path / "img")
    assert result["size"] == (tmp_path / "img").stat().st_size
    frozen = freeze(Path("/usr/bin/python3"), SOURCE_ROOT)
    in_zip = [
        n for n in zipfile.ZipFile(io.BytesIO(frozen.zip_data)).namelist() if n.endswith(".pyc")
    ]
    assert result["frozen_modules"] == len(in_zip) and result["kernel_version"] is None
    assert result["kernel_modules"] == []


@needs_python
def test_summary_is_short_and_names_the_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("-o", str(tmp_path / "img"), "--compress", "gzip", "--busybox", "none") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'img'}: ") and "(gzip)" in out
    assert "no kernel modules" in out and len(out.splitlines()) == 3


BUSYBOX = Path("/usr/bin/busybox")
needs_busybox = pytest.mark.skipif(
    not BUSYBOX.exists(), reason="no /usr/bin/busybox (apt-get install busybox-static)"
)


@needs_python
@needs_busybox
def test_busybox_goes_where_the_rescue_shell_looks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from initrd.build import BUSYBOX_PATH
    from initrd.cpio import read_cpio
    from overlayroot.boot.rescue import BUSYBOX as RESCUE_BUSYBOX

    assert str(BUSYBOX_PATH) == RESCUE_BUSYBOX
    for option, expected in (("auto", BUSYBOX), (str(BUSYBOX), BUSYBOX), ("none", None)):
        image = tmp_path / f"img-{option.replace('/', '_')}"
        assert run("-o", str(image), "--compress", "none", "--busybox", option, "--json") == 0
        result = json.loads(capsys.readouterr().out)
        members = {m.name: m for m in read_cpio(image.read_bytes())}
        info = json.loads(members["usr/lib/overlayroot/build.json"].data)
        if expected is None:
            assert result["busybox"] is None and info["busybox"] is None
            assert "usr/lib/overlayroot/busybox" not in members
        else:
            assert result["busybox"] == str(expected)
            assert info["busybox"] == RESCUE_BUSYBOX
            assert members["usr/lib/overlayroot/busybox"].data == expected.read_bytes()
            assert members["usr/lib/overlayroot/busybox"].mode & 0o777 == 0o755


@needs_python
def test_a_payload_never_has_busybox_and_refuses_one_named(tmp_path: Path) -> None:
    assert run("--payload-dir", str(tmp_path / "p"), "--busybox", "auto") == 0
    assert not (tmp_path / "p/usr/lib/overlayroot/busybox").exists()
    with pytest.raises(BuildError) as error:
        run("--payload-dir", str(tmp_path / "q"), "--busybox", "/usr/bin/busybox")
    assert str(error.value) == (
        "--busybox /usr/bin/busybox: a payload (--payload-dir) has no rescue shell of its own,"
        " the initramfs generator that takes it brings one; leave --busybox out"
    )


def test_a_busybox_that_is_not_there_names_it_and_the_choices(tmp_path: Path) -> None:
    with pytest.raises(BuildError) as error:
        run("-o", str(tmp_path / "img"), "--busybox", "/no/busybox")
    assert str(error.value) == (
        "--busybox /no/busybox: no such executable file; give the path of a busybox binary"
        " (apt-get install busybox-static puts one at /usr/bin/busybox), auto or none"
    )


@needs_python
def test_a_busybox_that_is_not_a_program_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "busybox"
    script.write_text("#!/bin/sh\necho not really\n")
    script.chmod(0o755)
    with pytest.raises(
        BuildError,
        match=rf"^--busybox {script}: not a usable program for the"
        r" image: .*\(give a busybox binary, or none\)$",
    ):
        run("-o", str(tmp_path / "img"), "--busybox", str(script))
