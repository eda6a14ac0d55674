"""A deployment's own kernel in its manifest (issue 9): read strictly, written back the same,
absent from the manifests of deployments without one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from overlayroot.core.errors import BootError
from overlayroot.core.layout import Kernel, Manifest, StateLayout, check_karg
from tests.unit.test_fuzz_manifest import GOOD, GOOD_KERNEL


def manifest_text(**kernel_changes: Any) -> str:
    return json.dumps({**GOOD, "kernel": {**GOOD_KERNEL, **kernel_changes}})


def test_a_manifest_with_a_kernel_is_read_and_written_back_the_same() -> None:
    manifest = Manifest.from_json(manifest_text(), Path("m"))
    assert manifest.kernel == Kernel(
        version="6.1.0-27-cloud-amd64",
        vmlinuz_sha256="a" * 64,
        initramfs_sha256="b" * 64,
        kargs=["console=ttyS0", "quiet"],
    )
    assert json.loads(manifest.to_json()) == {**GOOD, "kernel": GOOD_KERNEL}
    assert Manifest.from_json(manifest.to_json(), Path("m")) == manifest


@pytest.mark.parametrize("kernel", ["absent", None])
def test_a_manifest_without_a_kernel_is_valid_and_written_without_the_field(
    kernel: str | None,
) -> None:
    data = dict(GOOD) if kernel == "absent" else {**GOOD, "kernel": None}
    manifest = Manifest.from_json(json.dumps(data), Path("m"))
    assert manifest.kernel is None
    assert "kernel" not in manifest.to_json()
    assert json.loads(manifest.to_json()) == GOOD


def test_a_kernel_with_no_arguments_is_valid() -> None:
    manifest = Manifest.from_json(manifest_text(kargs=[]), Path("m"))
    assert manifest.kernel is not None and manifest.kernel.kargs == []


BAD_KERNELS: dict[str, tuple[object, str]] = {
    "a string": ("vmlinuz", "'kernel' is neither null nor a JSON object"),
    "a list": ([], "'kernel' is neither null nor a JSON object"),
    "no version": ({k: v for k, v in GOOD_KERNEL.items() if k != "version"}, "no 'kernel.version'"),
    "no kargs": ({k: v for k, v in GOOD_KERNEL.items() if k != "kargs"}, "no 'kernel.kargs'"),
    "version a number": ({**GOOD_KERNEL, "version": 6}, "'kernel.version' is not a string"),
    "version a path": (
        {**GOOD_KERNEL, "version": "../6.1"},
        "'kernel.version' '../6.1' is not a kernel release",
    ),
    "version empty": ({**GOOD_KERNEL, "version": ""}, "'kernel.version' '' is not a kernel"),
    "version too long": ({**GOOD_KERNEL, "version": "6" * 65}, "is not a kernel release"),
    "vmlinuz elsewhere": (
        {**GOOD_KERNEL, "vmlinuz": "../../etc/shadow"},
        "'kernel.vmlinuz' is '../../etc/shadow', not 'vmlinuz'",
    ),
    "initramfs elsewhere": (
        {**GOOD_KERNEL, "initramfs": "root.erofs"},
        "'kernel.initramfs' is 'root.erofs', not 'initramfs.img'",
    ),
    "digest short": (
        {**GOOD_KERNEL, "vmlinuz_sha256": "ab"},
        "'kernel.vmlinuz_sha256' is not 64 lowercase hexadecimal digits",
    ),
    "digest upper case": (
        {**GOOD_KERNEL, "initramfs_sha256": "A" * 64},
        "'kernel.initramfs_sha256' is not 64 lowercase hexadecimal digits",
    ),
    "digest a list": (
        {**GOOD_KERNEL, "vmlinuz_sha256": ["a" * 64]},
        "'kernel.vmlinuz_sha256' is not a string",
    ),
    "kargs a string": ({**GOOD_KERNEL, "kargs": "quiet"}, "'kernel.kargs' is not a list of"),
    "kargs of numbers": ({**GOOD_KERNEL, "kargs": [1]}, "'kernel.kargs' is not a list of"),
    "karg with a space": (
        {**GOOD_KERNEL, "kargs": ["a b"]},
        "kernel argument 'a b' is not one word of printable ASCII",
    ),
    "karg empty": ({**GOOD_KERNEL, "kargs": [""]}, "kernel argument '' is not one word"),
    "karg quoted": (
        {**GOOD_KERNEL, "kargs": ['x="y"']},
        "is not one word of printable ASCII without quotes",
    ),
    "karg root=": (
        {**GOOD_KERNEL, "kargs": ["root=/dev/sda1"]},
        "kernel argument 'root=/dev/sda1' is the machine's, not a deployment's",
    ),
    "karg overlayroot.": (
        {**GOOD_KERNEL, "kargs": ["overlayroot.deployment=v1"]},
        "'overlayroot.deployment=v1' is the machine's",
    ),
    "karg --": ({**GOOD_KERNEL, "kargs": ["--"]}, "kernel argument '--' is the machine's"),
    "kargs too long": (
        {**GOOD_KERNEL, "kargs": ["a" * 600, "b" * 600]},
        "'kernel.kargs' are longer than 1024 characters",
    ),
}


@pytest.mark.parametrize("case", BAD_KERNELS)
def test_a_bad_kernel_is_a_boot_error_naming_the_manifest(tmp_path: Path, case: str) -> None:
    kernel, problem = BAD_KERNELS[case]
    state = StateLayout(tmp_path)
    path = Path(state.deployments) / "v1" / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**GOOD, "kernel": kernel}))
    with pytest.raises(BootError) as error:
        state.read_manifest("v1")
    assert str(error.value).startswith(f"{path}: not a valid deployment manifest (")
    assert problem in str(error.value)
    assert str(error.value).endswith("this deployment cannot be used: deploy its image again")


def test_the_kernel_files_are_next_to_the_image(tmp_path: Path) -> None:
    state = StateLayout(tmp_path)
    manifest = Manifest.from_json(manifest_text(), Path("m"))
    directory = tmp_path / "overlayroot" / "deployments" / "v1"
    assert state.kernel_path(manifest) == str(directory / "vmlinuz")
    assert state.initramfs_path(manifest) == str(directory / "initramfs.img")
    assert state.image_path(manifest) == str(directory / "root.erofs")


def test_the_kernel_files_of_a_deployment_without_one_are_a_boot_error(tmp_path: Path) -> None:
    manifest = Manifest.from_json(json.dumps(GOOD), Path("m"))
    for path in (StateLayout(tmp_path).kernel_path, StateLayout(tmp_path).initramfs_path):
        with pytest.raises(
            BootError,
            match=r"^deployment 'v1' has no kernel of its own: it"
            r" boots under the running kernel$",
        ):
            path(manifest)


@pytest.mark.parametrize(
    "arg",
    [
        "quiet",
        "console=ttyS0,115200n8",
        "systemd.unit=x.target",
        "rootwait",
        "overlayrootx=1",
        "init=/sbin/init",
    ],
)
def test_check_karg_takes_what_a_deployment_may_set(arg: str) -> None:
    assert check_karg(arg) == arg


@pytest.mark.parametrize("arg", ["rootfstype=ext4", "rootflags=ro", "overlayroot.tries=9"])
def test_check_karg_refuses_the_machines_arguments(arg: str) -> None:
    with pytest.raises(
        ValueError,
        match=r"is the machine's, not a deployment's: the boot stage"
        r" sets root=, rootfstype=, rootflags= and overlayroot\.\* itself$",
    ):
        check_karg(arg)
