"""Deployment manifests and ids, fuzzed: a damaged ``manifest.json`` is a BootError naming the
file, whatever bytes it holds, and ``status`` and ``gc`` say so instead of a traceback."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlayroot.commands import cli
from overlayroot.core import layout
from overlayroot.core.bootstate import BootState, Entry
from overlayroot.core.errors import BootError
from overlayroot.core.layout import Manifest, StateLayout, check_id, is_id
from overlayroot.core.statefile import save
from tests import fuzzing
from tests.unit.test_fuzz_state import DEEP, JSON_VALUES

GOOD: dict[str, Any] = {
    "id": "v1",
    "created": "2024-01-01T00:00:00Z",
    "format": "erofs",
    "image": "root.erofs",
    "sha256": "0" * 64,
    "size": 4096,
    "origin": "/x",
    "blake2b": "1" * 64,
}
# A good manifest with fields dropped or replaced by any JSON value, or a huge or odd number.
ODD_NUMBERS = st.sampled_from(
    [
        "1e999",
        "-1e999",
        "NaN",
        "Infinity",
        "1" * 400,
        "1" * 5000,
        "-1",
        "1.5",
        "true",
        "9223372036854775808",
        '"12"',
    ]
)
MUTATED = st.tuples(
    st.dictionaries(st.sampled_from(sorted(GOOD)), JSON_VALUES, max_size=3),
    st.sets(st.sampled_from(sorted(GOOD)), max_size=2),
).map(
    lambda change: json.dumps(
        {k: v for k, v in {**GOOD, **change[0]}.items() if k not in change[1]}
    )
)
GOOD_KERNEL: dict[str, Any] = {
    "version": "6.1.0-27-cloud-amd64",
    "vmlinuz": "vmlinuz",
    "initramfs": "initramfs.img",
    "vmlinuz_sha256": "a" * 64,
    "initramfs_sha256": "b" * 64,
    "kargs": ["console=ttyS0", "quiet"],
}
# A good manifest with a kernel whose fields are dropped or replaced, or kargs made up.
KARGS = st.lists(
    st.one_of(
        st.text(max_size=12),
        st.sampled_from(
            ["root=/dev/sda", "overlayroot.deployment=v2", "--", "a b", 'x="y"', "é", "ok=1"]
        ),
    ),
    max_size=4,
)
MUTATED_KERNEL = st.tuples(
    st.dictionaries(
        st.sampled_from(sorted(GOOD_KERNEL)), st.one_of(JSON_VALUES, KARGS), max_size=3
    ),
    st.sets(st.sampled_from(sorted(GOOD_KERNEL)), max_size=2),
).map(
    lambda change: json.dumps(
        {
            **GOOD,
            "kernel": {k: v for k, v in {**GOOD_KERNEL, **change[0]}.items() if k not in change[1]},
        }
    )
)
MANIFEST_TEXT = st.one_of(
    st.text(),
    DEEP,
    JSON_VALUES.map(json.dumps),
    MUTATED,
    MUTATED_KERNEL,
    JSON_VALUES.map(lambda kernel: json.dumps({**GOOD, "kernel": kernel})),
    ODD_NUMBERS.map(lambda n: json.dumps(GOOD).replace('"size": 4096', f'"size": {n}')),
)
MANIFEST_BYTES = st.one_of(
    st.binary(max_size=300),
    MANIFEST_TEXT.map(str.encode),
    MANIFEST_TEXT.map(str.encode).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda i: b[:i] + b"\xff" + b[i:])
    ),
)


def feed_manifest_text(text: str) -> None:
    manifest = Manifest.from_json(text, Path("manifest.json"))
    assert manifest.image == layout.FORMATS[manifest.format].image
    manifest.to_json().encode()


def feed_manifest_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = StateLayout(tmp)
        (Path(state.deployments) / "v1").mkdir(parents=True)
        (Path(state.deployments) / "v1" / "manifest.json").write_bytes(data)
        state.read_manifest("v1")


READERS = {
    "layout.Manifest.from_json": fuzzing.Reader(MANIFEST_TEXT, feed_manifest_text, (BootError,)),
    "layout.StateLayout.read_manifest": fuzzing.Reader(
        MANIFEST_BYTES, feed_manifest_file, (BootError,)
    ),
    "layout.check_id": fuzzing.Reader(st.text(), check_id, (BootError,)),
}


@pytest.mark.parametrize("name", READERS)
def test_reading_a_manifest_raises_only_boot_errors(name: str) -> None:
    reader = READERS[name]
    fuzzing.check(reader, fuzzing.examples(reader))


# -- the cases of issue 7 ----------------------------------------------------------------------

DAMAGED = {
    "invalid UTF-8": (
        json.dumps(GOOD).replace("/x", "/\udcff").encode("utf-8", "surrogateescape"),
        "(not UTF-8 text: invalid start byte at byte 194)",
    ),
    "size 1e999": (
        json.dumps(GOOD).replace("4096", "1e999").encode(),
        "1e999 is not a number JSON allows",
    ),
    "size a string": (
        json.dumps({**GOOD, "size": "4096"}).encode(),
        "'size' is not a whole number of bytes from 0 to 9223372036854775807",
    ),
    "size 10**400": (
        json.dumps({**GOOD, "size": 10**400}).encode(),
        "'size' is not a whole number of bytes",
    ),
    "size -1": (json.dumps({**GOOD, "size": -1}).encode(), "'size' is not a whole number"),
    "size true": (json.dumps({**GOOD, "size": True}).encode(), "'size' is not a whole number"),
    "size 1.5": (json.dumps({**GOOD, "size": 1.5}).encode(), "'size' is not a whole number"),
    "format a list": (
        json.dumps({**GOOD, "format": ["erofs"]}).encode(),
        "'format' is not a string",
    ),
    "origin an object": (json.dumps({**GOOD, "origin": {}}).encode(), "'origin' is not a string"),
    "no sha256": (
        json.dumps({k: v for k, v in GOOD.items() if k != "sha256"}).encode(),
        "no 'sha256'",
    ),
    "sha256 in capitals": (
        json.dumps({**GOOD, "sha256": "A" * 64}).encode(),
        "'sha256' is not 64 lowercase hexadecimal digits",
    ),
    "sha256 too short": (
        json.dumps({**GOOD, "sha256": "ab"}).encode(),
        "'sha256' is not 64 lowercase hexadecimal digits",
    ),
    "blake2b a number": (json.dumps({**GOOD, "blake2b": 7}).encode(), "'blake2b' is not a string"),
    "blake2b not hex": (
        json.dumps({**GOOD, "blake2b": "g" * 64}).encode(),
        "'blake2b' is not 64 lowercase hexadecimal digits",
    ),
    "a list": (b"[1, 2]", "not a JSON object"),
    "60000 [": (b"[" * 60_000, "nested more than 16 levels"),  # within the 64 KiB limit
}


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_manifest_is_a_boot_error_naming_the_file(tmp_path: Path, case: str) -> None:
    data, problem = DAMAGED[case]
    state = StateLayout(tmp_path)
    path = Path(state.deployments) / "v1" / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    with pytest.raises(BootError) as error:
        state.read_manifest("v1")
    assert str(error.value).startswith(f"{path}: not a valid deployment manifest (")
    assert problem in str(error.value)


def test_a_manifest_of_wrong_fields_says_the_deployment_cannot_be_used() -> None:
    with pytest.raises(
        BootError,
        match=r"^m: not a valid deployment manifest \('size' is not a"
        r" whole number of bytes from 0 to 9223372036854775807\); this deployment"
        r" cannot be used: deploy its image again$",
    ):
        Manifest.from_json(json.dumps({**GOOD, "size": 1.5}), Path("m"))


def test_a_manifest_written_before_blake2b_is_read_and_written_without_it() -> None:
    old = json.dumps({k: v for k, v in GOOD.items() if k != "blake2b"})
    manifest = Manifest.from_json(old, Path("m"))
    assert manifest.blake2b is None
    assert "blake2b" not in json.loads(manifest.to_json())
    assert json.loads(manifest.to_json()) == json.loads(old)


def test_a_manifest_keeps_its_blake2b() -> None:
    manifest = Manifest.from_json(json.dumps(GOOD), Path("m"))
    assert manifest.blake2b == "1" * 64
    assert json.loads(manifest.to_json()) == GOOD


def test_a_manifest_without_an_origin_is_still_read() -> None:
    text = json.dumps({k: v for k, v in GOOD.items() if k != "origin"})
    assert Manifest.from_json(text, Path("m")).origin == ""


def sysroot_with_a_damaged_manifest(root: Path, case: str) -> Path:
    state = StateLayout(root)
    for deployment_id in ("v1", "v2"):
        (Path(state.deployments) / deployment_id / "root").mkdir(parents=True)
        manifest = {**GOOD, "id": deployment_id, "format": "dir", "image": "root"}
        (Path(state.deployments) / deployment_id / "manifest.json").write_text(json.dumps(manifest))
    (Path(state.deployments) / "v1" / "manifest.json").write_bytes(DAMAGED[case][0])
    save(state, BootState({"v1": Entry(priority=1, successful=True), "v2": Entry(priority=2)}))
    return Path(state.deployments) / "v1" / "manifest.json"


@pytest.mark.parametrize("case", ["invalid UTF-8", "size 1e999", "size 10**400", "60000 ["])
def test_status_reports_a_damaged_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path = sysroot_with_a_damaged_manifest(tmp_path, case)
    assert cli.main(["status", "--sysroot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"note: {path}: not a valid deployment manifest (" in out
    assert cli.main(["status", "--json", "--sysroot", str(tmp_path)]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert notes[0].startswith(f"{path}: not a valid deployment manifest (")


@pytest.mark.parametrize("dry_run", [["--dry-run"], []])
@pytest.mark.parametrize("case", ["invalid UTF-8", "size 1e999"])
def test_gc_warns_of_a_damaged_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, dry_run: list[str]
) -> None:
    path = sysroot_with_a_damaged_manifest(tmp_path, case)
    assert cli.main(["gc", "--keep", "1", *dry_run, "--sysroot", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"overlayroot: warning: {path}: not a valid deployment manifest (" in err


@pytest.mark.parametrize("deployment_id", ["v1\n", "", "\n", ".v1", "a" * 65, "v/1", "ü"])
def test_check_id_refuses_what_is_not_an_id(deployment_id: str) -> None:
    with pytest.raises(BootError, match=r"^invalid deployment id .*: use 1-64 letters, digits"):
        check_id(deployment_id)


ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")  # what an id is, as a regular expression


@given(
    st.text(alphabet=st.sampled_from("aZ09._+-/\n é٣") | st.characters(), max_size=66)
    | st.text(alphabet="ab1._", min_size=60, max_size=70)
)
def test_an_id_is_what_the_pattern_says(name: str) -> None:
    assert is_id(name) == bool(ID.fullmatch(name))


def test_a_directory_named_with_a_trailing_newline_is_no_deployment(tmp_path: Path) -> None:
    state = StateLayout(tmp_path)
    for name in ("v1", "v2\n"):
        (Path(state.deployments) / name).mkdir(parents=True)
    assert state.deployment_ids() == ["v1"]
