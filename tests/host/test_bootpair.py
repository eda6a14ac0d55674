"""The boot pair (overlayroot.commands.bootpair): promotion cut by a power cut after every write,
on a real vfat filesystem, leaves a pair the bootloader can boot; the next promotion finishes it.

A cut is simulated at the level of the calls a promotion makes (``bootpair.Disk``): after the
first ``k`` calls the rest never happen, and either everything done so far is on the disk
("kept"), or what was not made durable is lost ("lost"): bytes written to a file since its last
fsync are dropped, and renames since the directory's last fsync are undone. "torn" keeps half of
the unsynced bytes of the file being written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from initrd.cpio import Member, write_cpio
from overlayroot.commands import bootpair, cli
from overlayroot.core import digest
from overlayroot.core.errors import BootError
from overlayroot.core.layout import Kernel, Manifest, StateLayout
from tests.host.conftest import require_tools
from tests.kernelfakes import LIST_DIR, archives, assert_bootable, bzimage

FAKE_MODULE = b"module for {release}"
A, B, C = "6.1.0-27-cloud-amd64", "6.12.9+bpo-cloud-amd64", "6.1.0-28-cloud-amd64"


def initramfs(release: str, stage: str) -> bytes:
    """An uncompressed newc image laid out as our builder's: /init, the single module list and
    the one named by release, the modules."""
    import io

    modules = [f"lib/modules/{release}/kernel/{name}.ko" for name in ("virtio_blk", "erofs")]
    listing = "".join(f"/{m}\n" for m in modules).encode()
    members = [
        Member.file("init", f"#!/bin/sh\n# stage {stage}\n".encode(), 0o755),
        Member.file("usr/lib/overlayroot/modules.list", listing),
        Member.file(f"{LIST_DIR}/{release}.list", listing),
    ]
    members += [
        Member.file(m, FAKE_MODULE.replace(b"{release}", release.encode())) for m in modules
    ]
    out = io.BytesIO()
    write_cpio(out, members)
    return out.getvalue()


def deployment(state: StateLayout, deployment_id: str, release: str, created: str) -> Manifest:
    directory = Path(state.deployment_dir(deployment_id))
    (directory / "root").mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(bzimage(release, os.urandom(5000)))
    (directory / "initramfs.img").write_bytes(initramfs(release, deployment_id))
    manifest = Manifest(
        id=deployment_id,
        created=created,
        format="dir",
        image="root",
        sha256="0" * 64,
        size=0,
        origin="",
        kernel=Kernel(
            version=release,
            vmlinuz_sha256=digest.file_sha256(directory / "vmlinuz"),
            initramfs_sha256=digest.file_sha256(directory / "initramfs.img"),
            kargs=["quiet"],
        ),
    )
    (directory / "manifest.json").write_text(manifest.to_json())
    return manifest


# -- cutting the power --------------------------------------------------------------------------


class PowerCut(Exception):
    pass


class Counting(bootpair.Disk):
    def __init__(self) -> None:
        self.calls = 0

    def step(self) -> None:
        self.calls += 1


class Cutting(bootpair.Disk):
    """Calls through to the disk until ``after`` calls were made, then cuts the power."""

    def __init__(self, after: int, mode: str) -> None:
        self.after = after
        self.mode = mode
        self.calls = 0
        self.fds: dict[int, tuple[Path, int, int]] = {}  # fd: path, bytes written, bytes synced
        self.files: dict[Path, tuple[int, int]] = {}  # written, synced, of closed files
        self.renames: list[tuple[Path, Path, bytes | None, bytes]] = []

    def step(self) -> None:
        if self.calls == self.after:
            raise PowerCut
        self.calls += 1

    def create(self, path: Path) -> int:
        self.step()
        fd = super().create(path)
        self.fds[fd] = (path, 0, 0)
        return fd

    def write(self, fd: int, data: bytes) -> None:
        self.step()
        super().write(fd, data)
        path, written, synced = self.fds[fd]
        self.fds[fd] = (path, written + len(data), synced)

    def fsync(self, fd: int) -> None:
        self.step()
        super().fsync(fd)
        path, written, _ = self.fds[fd]
        self.fds[fd] = (path, written, written)

    def close(self, fd: int) -> None:
        path, written, synced = self.fds.pop(fd)
        self.files[path] = (written, synced)
        super().close(fd)  # closing writes nothing: not a step, and it must not leak the fd

    def replace(self, source: Path, destination: Path) -> None:
        self.step()
        old = destination.read_bytes() if destination.exists() else None
        new = source.read_bytes()
        super().replace(source, destination)
        self.renames.append((source, destination, old, new))

    def fsync_dir(self, path: Path) -> None:
        self.step()
        super().fsync_dir(path)
        self.renames = [r for r in self.renames if r[1].parent != path]

    def unlink(self, path: Path) -> None:
        self.step()
        super().unlink(path)

    def lose(self) -> None:
        """What a power cut takes back: the unsynced tail of every file written (half of it
        when torn), and the renames no directory fsync made durable."""
        for fd in list(self.fds):
            self.close(fd)
        if self.mode == "kept":
            return
        for source, destination, old, new in reversed(self.renames):
            if old is None:
                destination.unlink()
            else:
                destination.write_bytes(old)
            source.write_bytes(new)
        for path, (written, synced) in self.files.items():
            if path.exists() and written > synced:
                keep = synced + (written - synced) // 2 if self.mode == "torn" else synced
                os.truncate(path, keep)


@pytest.fixture(params=["vfat", "ext4"])
def esp(request: pytest.FixtureRequest, mount_ns: Path) -> Path:
    """A filesystem for the pair: vfat (an ESP) or ext4 (the state filesystem's kind)."""
    fs = request.param
    if (
        fs not in Path("/proc/filesystems").read_text().split()
        and subprocess.run(["modprobe", fs], capture_output=True).returncode != 0
    ):
        pytest.skip(f"the running kernel has no {fs} filesystem")
    require_tools(f"mkfs.{fs}")
    image = mount_ns / "esp.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    options = ["-n", "ESP"] if fs == "vfat" else ["-q", "-F"]
    subprocess.run([f"mkfs.{fs}", *options, str(image)], check=True, capture_output=True)
    esp = mount_ns / "esp"
    esp.mkdir()
    subprocess.run(["mount", "-t", fs, "-o", "loop", str(image), str(esp)], check=True)
    return esp


@pytest.fixture
def state(tmp_path: Path) -> StateLayout:
    return StateLayout(tmp_path / "state")


def test_a_promotion_cut_after_any_write_leaves_a_bootable_pair(
    esp: Path, state: StateLayout
) -> None:
    v1 = deployment(state, "v1", A, "2024-01-01T00:00:00Z")
    v2 = deployment(state, "v2", B, "2024-01-02T00:00:00Z")
    kernels = {k: Path(state.kernel_path(m)).read_bytes() for k, m in (("v1", v1), ("v2", v2))}
    pair = esp / "overlayroot"
    assert bootpair.promote(pair, state, v1)
    assert assert_bootable(pair, kernels, module=FAKE_MODULE) == A
    saved = esp.parent / "saved"
    shutil.copytree(pair, saved)

    counting = Cutting(after=-1, mode="kept")
    assert bootpair.promote(pair, state, v2, counting)
    total = counting.calls
    assert total > 10  # the writes of three files and a record, each fsynced and renamed
    releases = set()
    for mode in ("kept", "lost", "torn"):
        for after in range(total + 1):
            shutil.rmtree(pair)
            shutil.copytree(saved, pair)
            disk = Cutting(after, mode)
            try:
                bootpair.promote(pair, state, v2, disk)
            except PowerCut:
                disk.lose()
            where = f"cut after {after} of {total} writes, {mode}"
            try:
                releases.add(assert_bootable(pair, kernels, module=FAKE_MODULE))
            except AssertionError as e:
                raise AssertionError(f"{where}: not bootable: {e}") from None
            # The next bless finishes the promotion.
            bootpair.promote(pair, state, v2)
            assert assert_bootable(pair, kernels, module=FAKE_MODULE) == B, where
            assert (pair / "initrd.img").read_bytes() == Path(state.initramfs_path(v2)).read_bytes()
            assert sorted(os.listdir(pair)) == ["initrd.img", "pair.json", "vmlinuz"], where
            assert json.loads((pair / "pair.json").read_text())["deployment"] == "v2", where
    assert releases == {A, B}  # the cuts fell on both sides of the kernel's rename


def test_the_bridge_boots_both_kernels(tmp_path: Path, state: StateLayout) -> None:
    v1 = deployment(state, "v1", A, "2024-01-01T00:00:00Z")
    v2 = deployment(state, "v2", B, "2024-01-02T00:00:00Z")
    pair = tmp_path / "pair"
    bootpair.promote(pair, state, v1)
    # Stop at the first cut that has the bridge in place: the old kernel, the bridge.
    bridge_done = None
    for after in range(1, 40):
        shutil.rmtree(tmp_path / "try", ignore_errors=True)
        shutil.copytree(pair, tmp_path / "try")
        with contextlib.suppress(PowerCut):
            bootpair.promote(tmp_path / "try", state, v2, Cutting(after, "kept"))
        image = archives((tmp_path / "try" / "initrd.img").read_bytes())
        if f"{LIST_DIR}/{B}.list" in image:
            bridge_done = tmp_path / "try"
            break
    assert bridge_done is not None
    assert (bridge_done / "vmlinuz").read_bytes() == Path(state.kernel_path(v1)).read_bytes()
    assert f"{LIST_DIR}/{A}.list" in image  # A's list and modules are still there
    assert image["init"] == b"#!/bin/sh\n# stage v2\n"  # the new stage runs
    for release in (A, B):
        (bridge_done / "vmlinuz").write_bytes(
            Path(state.kernel_path(v1 if release == A else v2)).read_bytes()
        )
        assert (
            assert_bootable(
                bridge_done,
                {
                    "a": Path(state.kernel_path(v1)).read_bytes(),
                    "b": Path(state.kernel_path(v2)).read_bytes(),
                },
                module=FAKE_MODULE,
            )
            == release
        )


def test_promote_refuses_a_damaged_kernel_and_keeps_the_pair(
    tmp_path: Path, state: StateLayout
) -> None:
    v1 = deployment(state, "v1", A, "2024-01-01T00:00:00Z")
    v2 = deployment(state, "v2", B, "2024-01-02T00:00:00Z")
    pair = tmp_path / "pair"
    bootpair.promote(pair, state, v1)
    before = {n: (pair / n).read_bytes() for n in os.listdir(pair)}
    with open(state.kernel_path(v2), "r+b") as f:
        f.seek(3000)
        f.write(b"damage")
    with pytest.raises(
        BootError,
        match=rf"^{state.kernel_path(v2)} does not match the digest in"
        r" its deployment's manifest: it is damaged; the boot pair was left as it"
        r" was$",
    ):
        bootpair.promote(pair, state, v2)
    assert (
        assert_bootable(pair, {"a": Path(state.kernel_path(v1)).read_bytes()}, module=FAKE_MODULE)
        == A
    )
    # The bridge was written before the kernel was found damaged: still a bootable pair, A's.
    assert (pair / "vmlinuz").read_bytes() == before["vmlinuz"]
    assert sorted(os.listdir(pair)) == ["initrd.img", "pair.json", "vmlinuz"]


def test_a_second_promotion_of_the_same_kernel_writes_nothing(
    tmp_path: Path, state: StateLayout
) -> None:
    v1 = deployment(state, "v1", A, "2024-01-01T00:00:00Z")
    pair = tmp_path / "pair"
    assert bootpair.promote(pair, state, v1)
    counting = Cutting(after=-1, mode="kept")
    assert not bootpair.promote(pair, state, v1, counting)
    assert counting.calls == 0


def test_promoting_a_deployment_without_a_kernel_is_refused(
    tmp_path: Path, state: StateLayout
) -> None:
    manifest = Manifest(
        id="v1",
        created="2024-01-01T00:00:00Z",
        format="dir",
        image="root",
        sha256="0" * 64,
        size=0,
        origin="",
    )
    with pytest.raises(
        BootError,
        match=r"^deployment 'v1' has no kernel of its own to"
        r" promote$",
    ):
        bootpair.promote(tmp_path / "pair", state, manifest)


def test_describe_names_the_deployment_and_a_cut_short_promotion(
    tmp_path: Path, state: StateLayout
) -> None:
    v1 = deployment(state, "v1", A, "2024-01-01T00:00:00Z")
    v2 = deployment(state, "v2", B, "2024-01-02T00:00:00Z")
    v3 = deployment(state, "v3", C, "2024-01-03T00:00:00Z")
    manifests = {"v1": v1, "v2": v2, "v3": v3}
    pair = tmp_path / "pair"
    assert bootpair.describe(pair, manifests) is None
    assert bootpair.summary(None, pair) == (
        f"boot pair: none yet in {pair} (bless or `overlayroot promote` a deployment with a"
        " kernel of its own)"
    )
    bootpair.promote(pair, state, v1)
    held = bootpair.describe(pair, manifests)
    assert held == {
        "dir": str(pair),
        "deployment": "v1",
        "version": A,
        "complete": True,
        "recorded": "v1",
    }
    assert bootpair.summary(held, pair) == f"boot pair in {pair}: the kernel {A} of v1"
    # Cut after the kernel's rename: B's kernel with the bridge.
    for after in range(1, 60):
        shutil.rmtree(tmp_path / "cut", ignore_errors=True)
        shutil.copytree(pair, tmp_path / "cut")
        with contextlib.suppress(PowerCut):
            bootpair.promote(tmp_path / "cut", state, v2, Cutting(after, "kept"))
        if (tmp_path / "cut" / "vmlinuz").read_bytes() == Path(state.kernel_path(v2)).read_bytes():
            break
    cut = bootpair.describe(tmp_path / "cut", manifests)
    assert cut is not None and (cut["deployment"], cut["complete"]) == ("v2", False)
    assert bootpair.summary(cut, pair).endswith(
        f"the kernel {B} of v2 (a promotion was cut short: its initramfs is the bridge; the next"
        " bless finishes it)"
    )
    # gc removed v1: the pair still holds its kernel, and says so.
    gone = bootpair.describe(pair, {"v2": v2})
    assert gone is not None and (gone["deployment"], gone["version"]) == (None, A)
    assert bootpair.summary(gone, pair) == (
        f"boot pair in {pair}: the kernel {A} of v1, a deployment no longer on the state filesystem"
    )


def test_choose_prefers_the_blessed_then_the_newest_good_with_a_kernel(
    state: StateLayout,
) -> None:
    from overlayroot.core.bootstate import BootState, Entry

    v1 = deployment(state, "v1", A, "2024-01-01T00:00:00Z")
    v2 = deployment(state, "v2", B, "2024-01-02T00:00:00Z")
    v3 = Manifest(
        id="v3",
        created="2024-01-03T00:00:00Z",
        format="dir",
        image="root",
        sha256="0" * 64,
        size=0,
        origin="",
    )
    v4 = deployment(state, "v4", C, "2024-01-04T00:00:00Z")
    manifests = {"v1": v1, "v2": v2, "v3": v3, "v4": v4}
    good = BootState(
        {
            "v1": Entry(priority=1, successful=True),
            "v2": Entry(priority=2, successful=True),
            "v3": Entry(priority=3, successful=True),
            "v4": Entry(priority=4),
        }
    )  # on trial: never promoted
    assert bootpair.choose(good, manifests, "v3") is v2  # v3 has no kernel: the newest good one
    assert bootpair.choose(good, manifests, "v1") is v1
    assert bootpair.choose(good, manifests, "v4") is v2
    assert bootpair.choose(good, {"v3": v3}, "v3") is None


def test_promote_command_offline(
    tmp_path: Path, state: StateLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    from overlayroot.core import statefile
    from overlayroot.core.bootstate import BootState, Entry

    deployment(state, "v1", A, "2024-01-01T00:00:00Z")
    deployment(state, "v2", B, "2024-01-02T00:00:00Z")
    statefile.save(
        state, BootState({"v1": Entry(priority=1, successful=True), "v2": Entry(priority=2)})
    )
    sysroot = str(state.root)
    assert cli.main(["promote", "--sysroot", sysroot]) == 0
    pair = Path(state.top) / "boot"
    assert (
        capsys.readouterr().out == f"promoted: the boot pair in {pair} holds the kernel {A} of v1\n"
    )
    assert (
        cli.main(["promote", "v2", "--sysroot", sysroot, "--boot-dir", str(tmp_path / "esp")]) == 0
    )
    assert (tmp_path / "esp" / "vmlinuz").read_bytes() == (
        Path(state.deployment_dir("v2")) / "vmlinuz"
    ).read_bytes()
    capsys.readouterr()
    assert cli.main(["promote", "v9", "--sysroot", sysroot]) == 1
    assert "overlayroot: error: no deployment 'v9' on" in capsys.readouterr().err
    assert cli.main(["status", "--sysroot", sysroot]) == 0
    out = capsys.readouterr().out
    assert f"boot pair in {pair}: the kernel {A} of v1" in out
    assert cli.main(["status", "--json", "--sysroot", sysroot]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["kernel"] for d in data["deployments"]] == [A, B][::-1] or {
        d["id"]: d["kernel"] for d in data["deployments"]
    } == {"v1": A, "v2": B}
    assert data["boot_pair"]["deployment"] == "v1"
