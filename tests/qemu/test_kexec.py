"""Issue 9, the stage side: deployments that carry a kernel of their own, under QEMU.

The machine always starts kernel A (Debian bookworm's cloud kernel, the harness's ``-kernel``
and ``-initrd``, as a bootloader with one static entry would). A deployment that carries kernel
B (bookworm-backports' 6.12, another version and module ABI) is reached by the stage itself:
it takes the try, loads B and B's initramfs with ``kexec_file_load`` and starts B, whose stage
boots that deployment without a second try. QEMU does not see a kexec (no reset): one QEMU run
is one power-on, whatever kernels it went through.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from initrd.build import BuildConfig, Compression, build_initramfs
from overlayroot.commands.bootpair import BOOT_DIR, INITRD, KERNEL, promote
from overlayroot.commands.staging import KernelChoice, deploy
from qemu.kernel import Kernel
from qemu.machine import Machine
from qemu.plugin import MachineFactory
from qemu.rootfs import add_kernel, make_test_root
from tests.qemu.stage import (
    BOOT_TIMEOUT,
    BROKEN,
    CMDLINE,
    CREATED,
    FS_LABEL,
    SCRIPTS,
    Disk,
    booted,
    history,
    rows,
)

MODULE = "dummy"  # in both kernels as a module, with no dependencies
KEXEC_REPORT = f"""\
echo "OVERLAYROOT-TEST uname=$(uname -r)"
insmod /lib/modules/$(uname -r)/kernel/drivers/net/{MODULE}.ko
echo "OVERLAYROOT-TEST insmod=$?"
grep -q '^{MODULE} ' /proc/modules && echo "OVERLAYROOT-TEST module={MODULE}"
""" + SCRIPTS["report"]
KEXEC_SCRIPTS = {
    **SCRIPTS,
    "kexec-report": KEXEC_REPORT,
    "rollback": KEXEC_REPORT
    + """\
overlayroot rollback
echo "OVERLAYROOT-TEST rollback=$?"
""",
}


@pytest.fixture(scope="session")
def second_initramfs(second_kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our standalone initramfs for kernel B: what a deployment built with
    ``overlayroot initrd build`` carries."""
    out = tmp_path_factory.mktemp("initramfs-b") / "initramfs.img"
    build_initramfs(
        BuildConfig(modules_dir=second_kernel.modules, output=out, compress=Compression.ZSTD)
    )
    return out


class KernelDisk(Disk):
    """A state disk whose deployments may carry a kernel of their own."""

    def root(self, name: str, fail: str | None = None) -> Path:
        return make_test_root(
            self.base / f"root-{name}",
            image=name,
            fail=fail,
            command=self.payload,
            scripts=KEXEC_SCRIPTS,
        )

    def kernel_root(
        self,
        name: str,
        kernel: Kernel,
        initrd: Path,
        fail: str | None = None,
    ) -> Path:
        root = self.root(name, fail)
        add_kernel(root, kernel.vmlinuz, initrd, kernel.version, kernel.modules, (MODULE,))
        return root

    def deploy_with_kernel(
        self,
        name: str,
        kernel: Kernel,
        initrd: Path,
        fail: str | None = None,
        kargs: tuple[str, ...] = (),
    ) -> None:
        """Deploy a root that carries ``kernel`` and ``initrd`` the bootc way: deploy finds
        them and records them in the manifest."""
        deploy(
            self.content,
            self.kernel_root(name, kernel, initrd, fail),
            deployment_id=name,
            created=CREATED + self.count,
            kernel=KernelChoice(kargs=list(kargs)),
        )
        self.count += 1
        manifest = self.layout.read_manifest(name)
        assert manifest.kernel is not None and manifest.kernel.version == kernel.version


def boot(machine: MachineFactory, initrd: Path, disk: Path, name: str, extra: str = "") -> Machine:
    m = machine(initrd=initrd, disks=[disk], cmdline=f"{CMDLINE} {extra}", name=name)
    m.start()
    m.wait_for(
        "OVERLAYROOT-TEST done",
        BOOT_TIMEOUT * 2,
        failure=(
            "Kernel panic - not syncing",
            "Attempted to kill init",
            "overlayroot: error: no",
            "OVERLAYROOT-TEST failing=",
            *BROKEN,
        ),
    )
    m.wait_exit(60)
    return m


def booted_json(m: Machine) -> dict[str, object]:
    data = json.loads(m.markers()["booted_json"])
    assert isinstance(data, dict)
    return data


def test_a_deployment_with_its_own_kernel_runs_under_it_and_keeps_etc_var_home(
    machine: MachineFactory,
    initramfs: Path,
    second_initramfs: Path,
    command_payload: Path,
    kernel: Kernel,
    second_kernel: Kernel,
    tmp_path: Path,
) -> None:
    disk = KernelDisk(tmp_path, command_payload)
    disk.deploy("v1")
    disk.bless("v1")
    disk.deploy_with_kernel("v2", second_kernel, second_initramfs, kargs=("loglevel=6",))
    path = disk.make()

    first = boot(
        machine,
        initramfs,
        path,
        "1-kexec",
        "test.write=kexec-token test.bless=1 test.run=kexec-report",
    )
    m = first.markers()
    assert f"switching to deployment v2's kernel {second_kernel.version}" in first.console
    assert booted(first) == "v2"
    assert m["uname"] == second_kernel.version != kernel.version
    assert (m["insmod"], m["module"]) == ("0", MODULE)
    assert "trial boot of v2: 1 tries left after this one" in first.console
    info = booted_json(first)
    assert (info["kernel"], info["kexec"], info["counted"]) == (second_kernel.version, "v2", True)
    assert (m["write_etc"], m["write_var"], m["write_home"], m["bless"]) == ("ok",) * 3 + ("0",)
    assert rows(first)["v2"]["tries_left"] == 1  # one try, taken before the kexec
    events = [(e["event"], e["deployment"]) for e in history(first)]
    assert events[-3:] == [("kexec", "v2"), ("boot", "v2"), ("blessed", "v2")]

    second = boot(machine, initramfs, path, "2-known-good", "test.read=1 test.run=kexec-report")
    m = second.markers()
    assert booted(second) == "v2" and m["uname"] == second_kernel.version
    assert "trial boot" not in second.console  # known good: no try, no watchdog
    assert (m["etc_token"], m["var_token"], m["home_token"]) == ("kexec-token",) * 3
    assert m["module"] == MODULE
    assert "Traceback" not in first.console + second.console


def test_a_kernel_that_is_damaged_or_not_a_kernel_falls_back_in_the_same_boot(
    machine: MachineFactory,
    initramfs: Path,
    second_initramfs: Path,
    command_payload: Path,
    second_kernel: Kernel,
    tmp_path: Path,
) -> None:
    disk = KernelDisk(tmp_path, command_payload)
    disk.deploy("v1")
    disk.bless("v1")
    disk.deploy_with_kernel("v2-damaged", second_kernel, second_initramfs)
    disk.deploy_with_kernel("v3-notakernel", second_kernel, second_initramfs)
    damaged = Path(disk.layout.deployment_dir("v2-damaged")) / "vmlinuz"
    with open(damaged, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xff" * 16)
    # A file the digest check passes, and that kexec_file_load refuses: not an x86 bzImage.
    notakernel = Path(disk.layout.deployment_dir("v3-notakernel")) / "vmlinuz"
    notakernel.write_bytes(Path("/bin/busybox").read_bytes())
    manifest = disk.layout.read_manifest("v3-notakernel")
    assert manifest.kernel is not None
    manifest.kernel.vmlinuz_sha256 = hashlib.sha256(notakernel.read_bytes()).hexdigest()
    (notakernel.parent / "manifest.json").write_text(manifest.to_json())
    path = disk.make()

    m = boot(machine, initramfs, path, "fallback", "test.run=kexec-report")
    assert booted(m) == "v1"
    assert "kexec_core: Starting new kernel" not in m.console
    notakernel_reason = (
        f"deployment 'v3-notakernel': its kernel {second_kernel.version}"
        " (/sysroot/overlayroot/deployments/v3-notakernel/vmlinuz) cannot be"
        " loaded: it is not a kernel this machine can start (another"
        " architecture, or not a kernel image at all) [kexec_file_load: Exec"
        " format error]"
    )
    assert f"overlayroot: error: {notakernel_reason}" in m.console
    assert (
        "overlayroot: error: deployment 'v2-damaged': its kernel"
        " /sysroot/overlayroot/deployments/v2-damaged/vmlinuz fails its digest check" in m.console
    )
    records = rows(m)
    assert records["v3-notakernel"]["bad"] == notakernel_reason
    assert "fails its digest check" in records["v2-damaged"]["bad"]
    failed = [(e["deployment"], e["reason"]) for e in history(m) if e["event"] == "failed"]
    assert [d for d, _ in failed] == ["v3-notakernel", "v2-damaged"]
    assert failed[0][1] == notakernel_reason
    assert m.markers()["uname"] != second_kernel.version


def test_a_kernel_that_starts_and_then_fails_is_given_up_after_its_tries(
    machine: MachineFactory,
    initramfs: Path,
    command_payload: Path,
    kernel: Kernel,
    second_kernel: Kernel,
    tmp_path: Path,
) -> None:
    """v2's kernel loads and starts, but its initramfs has no virtio_blk (built without
    modules): it cannot find the state device, and its stage powers off (here; a reboot on a
    real machine, ``overlayroot.onfail=``). Each such boot used a try, taken before the kexec,
    so the bootloader's kernel falls back to v1 by itself."""
    no_modules = tmp_path / "initramfs-b-no-modules.img"
    build_initramfs(BuildConfig(modules_dir=None, output=no_modules, compress=Compression.ZSTD))
    disk = KernelDisk(tmp_path, command_payload)
    disk.deploy("v1")
    disk.bless("v1")
    disk.deploy_with_kernel("v2", second_kernel, no_modules)
    path = disk.make()

    for attempt in (1, 2):
        m = machine(initrd=initramfs, disks=[path], cmdline=CMDLINE, name=f"v2-{attempt}")
        m.start()
        m.wait_for(
            f"the state device LABEL={FS_LABEL} did not appear",
            BOOT_TIMEOUT * 2,
            failure=("OVERLAYROOT-TEST done", *BROKEN),
        )
        m.wait_exit(60)
        assert f"switching to deployment v2's kernel {second_kernel.version}" in m.console
        assert f"Linux version {second_kernel.version}" in m.console
        assert disk.state().entries["v2"].tries_left == 2 - attempt
    last = boot(machine, initramfs, path, "back-on-v1", "test.run=kexec-report")
    assert booted(last) == "v1" and last.markers()["uname"] == kernel.version
    assert "kexec_core: Starting new kernel" not in last.console
    assert rows(last)["v2"]["bad"] == (
        "used up its tries without being blessed (it crashed, hung or was reset)"
    )
    events = [(e["event"], e["deployment"]) for e in history(last)]
    assert events == [
        ("blessed", "v1"),
        ("kexec", "v2"),
        ("kexec", "v2"),
        ("failed", "v2"),
        ("boot", "v1"),
    ]


def pair_on(disk: KernelDisk, where: Path) -> tuple[Kernel, Path]:
    """The boot pair on the state disk, copied out as a bootloader with one static entry
    (``/overlayroot/boot/vmlinuz`` and ``initrd.img``) would load it."""
    where.mkdir(parents=True, exist_ok=True)
    vmlinuz, initrd = where / "vmlinuz", where / "initrd.img"
    vmlinuz.write_bytes(disk.read(f"/overlayroot/{BOOT_DIR}/{KERNEL}"))
    initrd.write_bytes(disk.read(f"/overlayroot/{BOOT_DIR}/{INITRD}"))
    return Kernel(vmlinuz=vmlinuz, modules=where, version="(the boot pair)"), initrd


def boot_pair(
    machine: MachineFactory, disk: KernelDisk, path: Path, name: str, extra: str
) -> Machine:
    pair, initrd = pair_on(disk, disk.base / f"pair-{name}")
    m = machine(initrd=initrd, disks=[path], cmdline=f"{CMDLINE} {extra}", name=name, kernel=pair)
    m.start()
    m.wait_for(
        "OVERLAYROOT-TEST done",
        BOOT_TIMEOUT * 2,
        failure=(
            "Kernel panic - not syncing",
            "Attempted to kill init",
            "overlayroot: error: no",
            *BROKEN,
        ),
    )
    m.wait_exit(60)
    return m


def test_bless_promotes_the_pair_so_the_next_boot_needs_no_kexec_and_rollback_boots_a_again(
    machine: MachineFactory,
    initramfs: Path,
    second_initramfs: Path,
    command_payload: Path,
    kernel: Kernel,
    second_kernel: Kernel,
    tmp_path: Path,
) -> None:
    disk = KernelDisk(tmp_path, command_payload)
    disk.deploy_with_kernel("v1", kernel, initramfs)
    disk.bless("v1")
    layout = disk.layout
    promote(Path(layout.top) / BOOT_DIR, layout, layout.read_manifest("v1"))  # the factory's pair
    disk.deploy_with_kernel("v2", second_kernel, second_initramfs)
    path = disk.make()

    first = boot_pair(machine, disk, path, "1-trial-by-kexec", "test.bless=1 test.run=kexec-report")
    assert f"Linux version {kernel.version} " in first.console
    assert "kexec_core: Starting new kernel" in first.console
    assert booted(first) == "v2" and first.markers()["uname"] == second_kernel.version
    assert first.markers()["bless"] == "0"
    assert disk.read(f"/overlayroot/{BOOT_DIR}/{KERNEL}") == second_kernel.vmlinuz.read_bytes()

    second = boot_pair(machine, disk, path, "2-promoted", "test.run=rollback")
    m = second.markers()
    assert "kexec_core: Starting new kernel" not in second.console
    assert f"Linux version {second_kernel.version} " in second.console
    assert booted(second) == "v2" and m["uname"] == second_kernel.version
    assert booted_json(second)["kexec"] is None
    assert m["module"] == MODULE and m["rollback"] == "0"

    third = boot_pair(machine, disk, path, "3-rolled-back", "test.run=kexec-report")
    m = third.markers()
    assert booted(third) == "v1" and m["uname"] == kernel.version
    assert f"switching to deployment v1's kernel {kernel.version}" in third.console
    assert "trial boot" not in third.console  # known good: the kexec took no try
    assert m["module"] == MODULE
    boots = [e for e in history(third) if e["event"] in ("boot", "kexec")]
    assert [(e["event"], e["deployment"], e.get("kernel")) for e in boots] == [
        ("kexec", "v2", second_kernel.version),
        ("boot", "v2", second_kernel.version),
        ("boot", "v2", second_kernel.version),
        ("kexec", "v1", kernel.version),
        ("boot", "v1", kernel.version),
    ]


@pytest.mark.slow
def test_debian_with_systemd_boots_under_a_kernel_of_its_own(
    machine: MachineFactory,
    initramfs: Path,
    second_initramfs: Path,
    kernel: Kernel,
    second_kernel: Kernel,
    tmp_path: Path,
) -> None:
    """The Debian image (qemu.debian) carrying kernel B, its modules and our initramfs for B:
    the machine starts kernel A, the stage switches to B, Debian reaches multi-user.target
    read-only under B, blesses the trial, and the next boot (A again: no promotion here)
    switches to B again, known good, with /etc /var /home kept."""
    from qemu import debian
    from qemu.rootfs import build_command_payload
    from tests.qemu.debianboot import (
        BASE,
        DEPLOYMENT,
        ON_FAILURE,
        boot_debian,
        check_blessed,
        check_read_only_system,
        debian_disk,
    )

    command = build_command_payload(tmp_path / "overlayroot-command")
    try:
        root = debian.debian_image(second_kernel, tmp_path / "debian", command)
    except debian.DebianUnavailable as e:
        pytest.skip(str(e))
    add_kernel(root, second_kernel.vmlinuz, second_initramfs, second_kernel.version)
    disk = debian_disk(tmp_path, root)
    cmdline = f"{BASE} {ON_FAILURE['standalone']}"

    first = boot_debian(machine, initramfs, disk, f"{cmdline} test.write=token-1", "write")
    check_read_only_system(first, DEPLOYMENT)
    check_blessed(first, DEPLOYMENT)
    info = json.loads(first["booted_json"])
    assert (info["kernel"], info["kexec"], info["trial"]) == (
        second_kernel.version,
        "bookworm",
        True,
    )
    assert (first["write_etc"], first["write_var"], first["write_home"]) == ("ok", "ok", "ok")

    second = boot_debian(machine, initramfs, disk, f"{cmdline} test.read=1", "read")
    check_read_only_system(second, DEPLOYMENT)
    info = json.loads(second["booted_json"])
    assert (info["kernel"], info["kexec"], info["trial"]) == (
        second_kernel.version,
        "bookworm",
        False,
    )
    assert (second["etc_token"], second["var_token"], second["home_token"]) == (
        "token-1",
        "token-1",
        "token-1",
    )
    assert kernel.version != second_kernel.version
