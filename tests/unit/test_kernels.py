"""Finding a deployment's own kernel in a root, checking it, and its kernel arguments."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from overlayroot.boot import modload
from overlayroot.commands import kernels, staging
from overlayroot.core import layout
from overlayroot.core.errors import BootError
from tests.kernelfakes import add_kernel, bzimage
from tests.unit.test_deploy import make_tree

EPOCH = 1_700_000_000
OLD, NEW = "6.1.0-27-cloud-amd64", "6.12.9+bpo-cloud-amd64"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


@pytest.fixture
def sysroot(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


def test_version_sort_compares_numbers_as_numbers() -> None:
    versions = [
        "6.12.9+bpo-cloud-amd64",
        "6.1.0-9-cloud-amd64",
        "6.1.0-27-cloud-amd64",
        "5.10.0-30-amd64",
        "6.9.1",
    ]
    assert sorted(versions, key=kernels.version_key) == [
        "5.10.0-30-amd64",
        "6.1.0-9-cloud-amd64",
        "6.1.0-27-cloud-amd64",
        "6.9.1",
        "6.12.9+bpo-cloud-amd64",
    ]


def test_find_reads_both_conventions_newest_last(tree: Path) -> None:
    add_kernel(tree, NEW, convention="bootc")
    add_kernel(tree, OLD, convention="debian")
    found = kernels.find(tree)
    assert [(k.version, k.vmlinuz, k.initramfs, k.modules) for k in found] == [
        (
            OLD,
            tree / f"boot/vmlinuz-{OLD}",
            tree / f"boot/initrd.img-{OLD}",
            tree / "usr/lib/modules" / OLD,
        ),
        (
            NEW,
            tree / "usr/lib/modules" / NEW / "vmlinuz",
            tree / "usr/lib/modules" / NEW / "initramfs.img",
            tree / "usr/lib/modules" / NEW,
        ),
    ]
    assert kernels.choose(found, None, tree) is found[1]
    assert kernels.choose(found, OLD, tree) is found[0]


def test_find_prefers_bootcs_files_for_a_kernel_in_both_places(tree: Path) -> None:
    add_kernel(tree, OLD, convention="debian")
    add_kernel(tree, OLD, convention="bootc")
    (found,) = kernels.find(tree)
    assert found.vmlinuz == tree / "usr/lib/modules" / OLD / "vmlinuz"


def test_find_ignores_symlinks_and_what_is_no_kernel(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "vmlinuz").write_bytes(bzimage(OLD))
    (tree / "boot").mkdir()
    (tree / "boot" / f"vmlinuz-{OLD}").symlink_to(outside / "vmlinuz")
    (tree / "boot" / "vmlinuz").write_bytes(bzimage(OLD))  # no version in the name
    (tree / "boot" / "vmlinuz-a b").write_bytes(bzimage(OLD))  # no release
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/modules").symlink_to(outside)
    assert kernels.find(tree) == []
    assert kernels.choose([], None, tree) is None


def test_choose_refuses_a_version_the_root_lacks(tree: Path) -> None:
    add_kernel(tree, OLD)
    with pytest.raises(
        BootError,
        match=rf"^--kernel 7\.0: {tree} has no such kernel \(kernels"
        rf" there: {OLD}; looked for /usr/lib/modules/<version>/vmlinuz and"
        r" /boot/vmlinuz-<version>\)$",
    ):
        kernels.choose(kernels.find(tree), "7.0", tree)


def test_check_image_takes_a_bzimage_of_its_version(tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(bzimage(OLD))
    kernels.check_image(path, OLD, "x86_64")


def test_check_image_refuses_what_is_not_a_kernel_of_this_architecture(tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"\x7fELF" + b"\0" * 2000)
    with pytest.raises(
        BootError,
        match=rf"^{path} is not an x86 bzImage, the kernel format of"
        r" this machine \(x86_64\): deploy a root built for it, or give"
        r" --no-kernel to boot it under the running kernel$",
    ):
        kernels.check_image(path, OLD, "x86_64")
    path.write_bytes(bzimage(OLD))
    with pytest.raises(
        BootError,
        match=r"is not an arm64 Image or EFI zboot image, the kernel"
        r" format of this machine \(aarch64\)",
    ):
        kernels.check_image(path, OLD, "aarch64")
    kernels.check_image(path, OLD, "s390x")  # no magic known: left to the stage


def test_check_image_refuses_a_kernel_named_for_another_version(tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(bzimage(NEW))
    with pytest.raises(
        BootError,
        match=rf"^{path} is kernel {re.escape(NEW)}, not {OLD} as its"
        r" name says: the root's kernel files are mixed up; rebuild the image$",
    ):
        kernels.check_image(path, OLD, "x86_64")


def test_check_image_of_a_real_kernel() -> None:
    cache = Path(__file__).resolve().parents[2] / ".cache/kernels"
    found = sorted(cache.glob("linux-image-*/boot/vmlinuz-*"))
    if not found:
        pytest.skip("no Debian kernel in .cache/kernels (scripts/setup fetches it)")
    kernels.check_image(found[0], found[0].name.removeprefix("vmlinuz-"), "x86_64")


def write_kargs(tree: Path, name: str, text: str) -> Path:
    directory = tree / kernels.KARGS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)
    return directory / name


def test_kargs_d_files_are_read_in_name_order_for_this_architecture(tree: Path) -> None:
    assert kernels.read_kargs_dir(tree, "x86_64") == []
    write_kargs(tree, "20-console.toml", 'kargs = ["console=ttyS0,115200n8"]\n')
    write_kargs(tree, "10-quiet.toml", 'kargs = ["quiet", "loglevel=3"]\n')
    write_kargs(tree, "30-arm.toml", 'kargs = ["arm=1"]\nmatch-architectures = ["aarch64"]\n')
    write_kargs(tree, "40-x86.toml", 'kargs = ["x86=1"]\nmatch-architectures = ["x86_64"]\n')
    write_kargs(tree, "README", "not read")
    assert kernels.read_kargs_dir(tree, "x86_64") == [
        "quiet",
        "loglevel=3",
        "console=ttyS0,115200n8",
        "x86=1",
    ]
    assert kernels.read_kargs_dir(tree, "aarch64")[-1] == "arm=1"


BAD_KARGS_FILES: dict[str, tuple[str | bytes, str]] = {
    "not TOML": ("kargs = [", r" is not TOML \(.*\): write it as kargs = \[\"arg\", \.\.\.\]$"),
    "no kargs": (
        "other = 1",
        r": unknown key\(s\) other: a kargs\.d file holds kargs = \[\.\.\.\]"
        r" and, optionally, match-architectures = \[\.\.\.\]$",
    ),
    "empty": ("", r": kargs is missing or not a list of strings"),
    "kargs a string": (
        'kargs = "quiet"',
        r": kargs is missing or not a list of strings: write"
        r" it as kargs = \[\"arg\", \.\.\.\]$",
    ),
    "arches a string": (
        'kargs = []\nmatch-architectures = "x86_64"',
        r": match-architectures is not a list of strings",
    ),
    "a machine's karg": (
        'kargs = ["root=/dev/sda"]',
        r": kernel argument 'root=/dev/sda' is the"
        r" machine's, not a deployment's",
    ),
    "two words": ('kargs = ["a b"]', r": kernel argument 'a b' is not one word"),
    "not UTF-8": (b"kargs = ['\xff']", r" is not TOML \("),
    "nested 5000 deep": (
        "kargs = " + "[" * 5000 + "]" * 5000,
        r" nests arrays or tables too deep"
        r" for a kargs file: write it as kargs = \[\"arg\", \.\.\.\]$",
    ),
}


@pytest.mark.parametrize("case", BAD_KARGS_FILES)
def test_a_bad_kargs_file_is_refused_naming_it(tree: Path, case: str) -> None:
    text, problem = BAD_KARGS_FILES[case]
    path = write_kargs(tree, "10-bad.toml", "")
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(
        BootError, match=rf"^/usr/lib/bootc/kargs\.d/10-bad\.toml in {tree}" + problem
    ):
        kernels.read_kargs_dir(tree, "x86_64")


def test_a_kargs_file_that_is_a_symlink_is_refused(tree: Path) -> None:
    write_kargs(tree, "10-real.toml", 'kargs = ["quiet"]')
    (tree / kernels.KARGS_DIR / "20-link.toml").symlink_to("10-real.toml")
    with pytest.raises(
        BootError,
        match=r"^cannot read /usr/lib/bootc/kargs\.d/20-link\.toml in"
        rf" {tree}: it is a symlink$",
    ):
        kernels.read_kargs_dir(tree, "x86_64")


# -- deploy -------------------------------------------------------------------------------------


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("convention", ["bootc", "debian"])
def test_deploy_stores_the_newest_kernel_with_the_deployment(
    tree: Path, sysroot: Path, convention: str
) -> None:
    add_kernel(tree, OLD, convention=convention)
    source_kernel = add_kernel(tree, NEW, convention=convention)
    write_kargs(tree, "10-console.toml", 'kargs = ["console=ttyS0"]')
    manifest, final = staging.deploy(
        sysroot,
        tree,
        deployment_id="v1",
        fmt="dir",
        created=EPOCH,
        kernel=staging.KernelChoice(kargs=["quiet"]),
    )
    assert manifest.kernel is not None
    assert manifest.kernel.version == NEW
    assert manifest.kernel.kargs == ["console=ttyS0", "quiet"]
    assert (final / "vmlinuz").read_bytes() == source_kernel.read_bytes()
    assert (final / "initramfs.img").read_bytes() == b"initramfs of " + NEW.encode()
    assert manifest.kernel.vmlinuz_sha256 == sha(final / "vmlinuz")
    assert manifest.kernel.initramfs_sha256 == sha(final / "initramfs.img")
    assert os.stat(final / "vmlinuz").st_mode & 0o777 == 0o644
    state = layout.StateLayout(sysroot)
    assert state.read_manifest("v1") == manifest
    assert state.kernel_path(manifest) == str(final / "vmlinuz")
    on_disk = json.loads((final / "manifest.json").read_text())["kernel"]
    assert on_disk["version"] == NEW and on_disk["vmlinuz"] == "vmlinuz"


def test_deploy_kernel_chooses_the_named_version(tree: Path, sysroot: Path) -> None:
    add_kernel(tree, OLD)
    add_kernel(tree, NEW)
    manifest, final = staging.deploy(
        sysroot,
        tree,
        deployment_id="v1",
        fmt="dir",
        created=EPOCH,
        kernel=staging.KernelChoice(OLD),
    )
    assert manifest.kernel is not None and manifest.kernel.version == OLD
    assert (final / "initramfs.img").read_bytes().endswith(OLD.encode())


def test_deploy_no_kernel_leaves_the_deployment_without_one(tree: Path, sysroot: Path) -> None:
    add_kernel(tree, OLD)
    manifest, final = staging.deploy(
        sysroot,
        tree,
        deployment_id="v1",
        fmt="dir",
        created=EPOCH,
        kernel=staging.KernelChoice(skip=True),
    )
    assert manifest.kernel is None
    assert sorted(os.listdir(final)) == ["manifest.json", "root"]
    assert "kernel" not in json.loads((final / "manifest.json").read_text())


def test_a_root_without_a_kernel_deploys_as_before(tree: Path, sysroot: Path) -> None:
    manifest, final = staging.deploy(sysroot, tree, deployment_id="v1", fmt="dir", created=EPOCH)
    assert manifest.kernel is None
    assert sorted(os.listdir(final)) == ["manifest.json", "root"]


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        (
            lambda: staging.KernelChoice(OLD, skip=True),
            r"^--no-kernel leaves the deployment without a"
            r" kernel of its own: drop --kernel and --karg, or --no-kernel$",
        ),
        (lambda: staging.KernelChoice(skip=True, kargs=["quiet"]), r"^--no-kernel leaves"),
        (
            lambda: staging.KernelChoice("../x"),
            r"^--kernel '\.\./x' is not a kernel release \(what"
            r" `uname -r` prints, e\.g\. 6\.1\.0-27-cloud-amd64\)$",
        ),
        (
            lambda: staging.KernelChoice(kargs=["root=/dev/vda"]),
            r"^--karg 'root=/dev/vda': kernel"
            r" argument 'root=/dev/vda' is the machine's, not a deployment's",
        ),
        (
            lambda: staging.KernelChoice(kargs=["x" * 600, "y" * 600]),
            r"^the deployment's kernel"
            r" arguments are longer than 1024 characters: x",
        ),
    ],
)
def test_kernel_options_that_contradict_are_refused(choice: object, message: str) -> None:
    assert callable(choice)
    with pytest.raises(BootError, match=message):
        choice()


def test_deploy_karg_without_a_kernel_is_refused(tree: Path, sysroot: Path) -> None:
    with pytest.raises(
        BootError,
        match=rf"^--karg: {tree} has no kernel of its own \(no"
        r" /usr/lib/modules/<version>/vmlinuz nor /boot/vmlinuz-<version>\) for"
        r" the arguments to go with; drop --karg$",
    ):
        staging.deploy(
            sysroot,
            tree,
            deployment_id="v1",
            fmt="dir",
            created=EPOCH,
            kernel=staging.KernelChoice(kargs=["quiet"]),
        )
    assert layout.StateLayout(sysroot).deployment_ids() == []
    assert os.listdir(sysroot / "overlayroot/deployments") == []


def test_deploy_refuses_a_kernel_that_is_not_one_and_stages_nothing(
    tree: Path, sysroot: Path
) -> None:
    kernel = add_kernel(tree, OLD)
    kernel.write_bytes(b"garbage" * 300)
    with pytest.raises(BootError, match=rf"^{kernel} is not an x86 bzImage"):
        staging.deploy(sysroot, tree, deployment_id="v1", fmt="dir", created=EPOCH)
    assert os.listdir(sysroot / "overlayroot/deployments") == []


def test_a_kernel_without_initramfs_and_no_builder_is_refused_saying_how_to_add_one(
    tree: Path, sysroot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_kernel(tree, OLD, initramfs=None)
    monkeypatch.setitem(__import__("sys").modules, "initrd.build", None)
    with pytest.raises(BootError) as error:
        staging.deploy(sysroot, tree, deployment_id="v1", fmt="dir", created=EPOCH)
    assert str(error.value).startswith(
        f"{tree} has kernel {OLD} ({tree}/usr/lib/modules/{OLD}/vmlinuz) but no initramfs for it"
        " (/usr/lib/modules/<version>/initramfs.img or /boot/initrd.img-<version>), and the"
        " initramfs builder is not installed ("
    )
    assert str(error.value).endswith(
        f"build one inside the image when it is built (`overlayroot initrd build --modules"
        f" /usr/lib/modules/{OLD} -o /usr/lib/modules/{OLD}/initramfs.img`, or dracut with the"
        " overlayroot module), install the builder where deploy runs (pip install"
        " 'overlayroot[build]') so that deploy builds one, or give --no-kernel to boot the root"
        " under the running kernel"
    )
    assert os.listdir(sysroot / "overlayroot/deployments") == []


def test_a_debian_kernel_without_initramfs_nor_modules_is_refused(
    tree: Path, sysroot: Path
) -> None:
    add_kernel(tree, OLD, convention="debian", initramfs=None, modules=False)
    with pytest.raises(
        BootError,
        match=rf"but no initramfs for it .*, nor its modules"
        rf" \(/usr/lib/modules/{OLD}\) to build one from: build one inside",
    ):
        staging.deploy(sysroot, tree, deployment_id="v1", fmt="dir", created=EPOCH)


# -- the stage's module list for the running kernel ---------------------------------------------


def test_modload_prefers_the_running_kernels_own_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    single = tmp_path / "modules.list"
    own = tmp_path / "modules.d" / "{release}.list"
    monkeypatch.setattr(modload, "MODULES_LIST", str(single))
    monkeypatch.setattr(modload, "RELEASE_LIST", str(own))
    assert modload.listing_for(OLD) == str(single)
    (tmp_path / "modules.d").mkdir()
    (tmp_path / "modules.d" / f"{OLD}.list").write_text("")
    assert modload.listing_for(OLD) == str(tmp_path / "modules.d" / f"{OLD}.list")
    assert modload.listing_for(NEW) == str(single)


def test_an_initramfs_the_builder_cannot_build_is_refused_with_its_reason(
    tree: Path, sysroot: Path
) -> None:
    add_kernel(tree, OLD, initramfs=None)  # a modules directory without modules
    with pytest.raises(
        BootError,
        match=rf"^{tree} has kernel {OLD} \(.*\) but no initramfs for"
        r" it \(.*\); building one failed: kernel module overlay \(requested\) is"
        rf" neither a file in {tree}/usr/lib/modules/{OLD} nor listed in its"
        r" modules\.builtin",
    ):
        staging.deploy(sysroot, tree, deployment_id="v1", fmt="dir", created=EPOCH)
    assert os.listdir(sysroot / "overlayroot/deployments") == []
