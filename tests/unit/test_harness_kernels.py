"""The harness's second kernel: which package apt's answer names, and the environment's."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu import kernel


def test_the_second_kernel_is_the_6_12_package_apt_names() -> None:
    answer = (
        "linux-image-6.12-cloud-amd64\n"
        "  Depends: linux-image-6.12.117+deb12-cloud-amd64\n"
        "  Depends: linux-image-6.1.0-57-cloud-amd64\n"
        "  Depends: linux-image-6.12.90+deb12.1-cloud-amd64\n"
    )
    assert kernel._depends(answer) == [
        "linux-image-6.12.117+deb12-cloud-amd64",
        "linux-image-6.12.90+deb12.1-cloud-amd64",
    ]
    assert kernel._depends("") == []


def test_a_second_kernel_from_the_environment_needs_its_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(b"x")
    monkeypatch.setenv("OVERLAYROOT_KERNEL_B", str(vmlinuz))
    monkeypatch.delenv("OVERLAYROOT_KERNEL_B_MODULES", raising=False)
    with pytest.raises(
        kernel.KernelUnavailable,
        match="OVERLAYROOT_KERNEL_B is set but OVERLAYROOT_KERNEL_B_MODULES is not",
    ):
        kernel.second_kernel_from_env()
    monkeypatch.setenv("OVERLAYROOT_KERNEL_B_MODULES", str(tmp_path / "6.9.9-test"))
    with pytest.raises(
        kernel.KernelUnavailable,
        match=r"6\.9\.9-test \(from the environment\)"
        " does not exist",
    ):
        kernel.second_kernel_from_env()
    (tmp_path / "6.9.9-test").mkdir()
    found = kernel.second_kernel_from_env()
    assert found is not None and (found.vmlinuz, found.version) == (vmlinuz, "6.9.9-test")
    monkeypatch.delenv("OVERLAYROOT_KERNEL_B")
    assert kernel.second_kernel_from_env() is None
