"""Kernel modules at the start of a boot and on demand, from the builder's listing."""

from __future__ import annotations

import errno
import fnmatch
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlayroot.boot import modload
from overlayroot.core import syscalls


class Calls(list[str]):
    """The modules asked of the kernel, in order (with their parameters, if any, on a line of
    their own); ``no_wait``: those asked with ``async_probe`` first (a need's), which is kept
    out of the parameters recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.no_wait: list[str] = []
        self.given: dict[str, str] = {}  # each module's parameters as the kernel got them


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """finit_module(2) stands in: records the names; 'absent' has no device (ENODEV), 'broken'
    a bad signature (EKEYREJECTED), 'twice' is loaded already (EEXIST)."""
    calls = Calls()
    failures = {
        "absent": errno.ENODEV,
        "broken": errno.EKEYREJECTED,
        "twice": errno.EEXIST,
        "old_kernel": errno.EINVAL,  # before 5.17, the compressed flag is unknown
        "no_decompress": errno.EOPNOTSUPP,  # without MODULE_DECOMPRESS
    }

    def finit_module(fd: int, name: str, params: str = "", flags: int = 0) -> None:
        os.fstat(fd)  # an open descriptor
        assert flags in (0, syscalls.MODULE_INIT_COMPRESSED_FILE)
        calls.append(name if not flags else f"{name} (compressed)")
        calls.given[name] = params
        first, _, rest = params.partition(" ")
        if first == modload.NO_WAIT:
            calls.no_wait.append(name)
            params = rest
        if params:
            calls.append(f"{name} params: {params}")
        if name in failures:
            raise OSError(failures[name], os.strerror(failures[name]), name)

    monkeypatch.setattr(syscalls, "finit_module", finit_module)
    monkeypatch.setattr(modload, "_listings", {})
    monkeypatch.setattr(modload, "LOADED", [])
    # Not this host's modprobe.d and command line: a test that wants options sets its own.
    monkeypatch.setattr(modload, "_options", [modload.ModuleOptions((), "")])
    return calls


def listing(tmp_path: Path, *lines: str) -> str:
    """A listing of stand-in modules: ``"name need need"`` a line."""
    written = []
    for line in lines:
        name, *needs = line.split()
        (tmp_path / f"{name}.ko").write_bytes(b"\x7fELF")
        written.append(" ".join((str(tmp_path / f"{name}.ko"), *needs)) + "\n")
    path = tmp_path / "modules.list"
    path.write_text("".join(written))
    return str(path)


def test_the_start_loads_the_modules_without_needs_in_order(
    tmp_path: Path, loaded: list[str]
) -> None:
    path = listing(
        tmp_path,
        "virtio",
        "libcrc32c fs-erofs fs-xfs",
        "erofs fs-erofs",
        "loop",
        "watchdog watchdog",
        "softdog watchdog",
    )
    assert modload.load_listed(path) == (["virtio", "loop"], [])
    assert loaded == ["virtio", "loop", "loop params: max_loop=0"]


def test_a_need_loads_its_modules_once_and_in_order(
    tmp_path: Path, loaded: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    path = listing(
        tmp_path,
        "virtio",
        "libcrc32c fs-erofs fs-xfs",
        "erofs fs-erofs",
        "xfs fs-xfs",
        "watchdog watchdog",
        "softdog watchdog",
    )
    modload.load_listed(path)
    modload.need("fs-erofs", path)
    modload.need("fs-erofs", path)
    modload.need("fs-xfs", path)  # libcrc32c is in already
    modload.need("fs-ext4", path)  # built in, or not listed: nothing to do
    modload.need("watchdog", path)
    assert loaded == ["virtio", "libcrc32c", "erofs", "xfs", "watchdog", "softdog"]
    # Only the device driver of the start waits for the system's asynchronous device probes.
    assert loaded.no_wait == ["libcrc32c", "erofs", "xfs", "watchdog", "softdog"]
    assert capsys.readouterr().out == ""


def test_a_need_without_a_listing_is_nothing_to_do(tmp_path: Path, loaded: list[str]) -> None:
    modload.need("fs-erofs", str(tmp_path / "missing"))
    assert modload.load_listed(str(tmp_path / "missing")) == ([], [])
    assert loaded == []


def fake_modprobe(tmp_path: Path, name: str, status: int) -> str:
    """A modprobe stand-in that records its arguments next to itself and exits ``status``."""
    path = tmp_path / name
    path.write_text(f'#!/bin/sh\necho "$@" >> "{path}.calls"\nexit {status}\n')
    path.chmod(0o755)
    return str(path)


def test_without_a_listing_a_watchdog_is_loaded_by_the_generators_modprobe(
    tmp_path: Path, loaded: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # dracut, initramfs-tools, mkinitcpio: no listing of ours, their modprobe and modules.
    modprobe = fake_modprobe(tmp_path, "modprobe", 0)
    monkeypatch.setattr(modload, "MODPROBE", (str(tmp_path / "missing"), modprobe))
    missing = str(tmp_path / "no-listing")
    modload.need("fs-erofs", missing)  # the kernel asks modprobe for a filesystem by itself
    assert not os.path.exists(modprobe + ".calls")
    modload.need("watchdog", missing)
    assert Path(modprobe + ".calls").read_text() == "-q softdog\n"
    assert loaded == []


def test_with_a_listing_the_watchdog_comes_from_it_not_from_modprobe(
    tmp_path: Path, loaded: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    modprobe = fake_modprobe(tmp_path, "modprobe", 0)
    monkeypatch.setattr(modload, "MODPROBE", (modprobe,))
    modload.need("watchdog", listing(tmp_path, "virtio", "softdog watchdog"))
    assert loaded == ["softdog"]
    assert not os.path.exists(modprobe + ".calls")


def test_a_modprobe_that_fails_or_is_missing_is_a_warning(tmp_path: Path) -> None:
    failing = fake_modprobe(tmp_path, "modprobe", 1)
    assert modload.modprobe("softdog", (failing,)) == [
        f"kernel module softdog did not load: {failing} exited with status 1"
    ]
    # No modprobe (our standalone image without modules): the watchdog step says what is
    # missing ("no watchdog armed").
    assert modload.modprobe("softdog", (str(tmp_path / "a"), str(tmp_path / "b"))) == []
    broken = tmp_path / "broken"
    broken.write_text("no interpreter line\n")
    broken.chmod(0o755)
    assert modload.modprobe("softdog", (str(broken),)) == [
        f"cannot run {broken} for kernel module softdog: Exec format error"
    ]


def test_a_watchdog_modprobe_that_fails_says_so_on_the_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(modload, "MODPROBE", (fake_modprobe(tmp_path, "modprobe", 1),))
    modload.need("watchdog", str(tmp_path / "no-listing"))
    assert capsys.readouterr().out == (
        f"overlayroot: warning: kernel module softdog did not load: {tmp_path}/modprobe exited"
        " with status 1\n"
    )


def test_modules_that_fail_are_warnings_and_the_boot_goes_on(
    tmp_path: Path, loaded: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = listing(
        tmp_path,
        "absent",
        "broken",
        "twice",
        "virtio",
        "gone fs-erofs",
        "softdog watchdog",
        "broken2 watchdog",
    )
    os.unlink(tmp_path / "gone.ko")
    (tmp_path / "broken2.ko").rename(tmp_path / "broken2.ko.x")
    assert modload.load_listed(path) == (
        ["virtio"],
        ["kernel module broken did not load: Key was rejected by service"],
    )
    modload.need("fs-erofs", path)
    modload.need("watchdog", path)
    assert loaded == ["absent", "broken", "twice", "virtio", "softdog"]
    assert capsys.readouterr().out == (
        f"overlayroot: warning: cannot open kernel module {tmp_path}/gone.ko: No such file or"
        " directory\n"
        f"overlayroot: warning: cannot open kernel module {tmp_path}/broken2.ko: No such file or"
        " directory\n"
    )


SSE42 = "cpu:type:x86,ven*fam*mod*:feature:*0094*"


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        (",0000,0001,0094,00E7", ["virtio", "crc32c_intel", "erofs"]),
        (",0000,0001,0095,00E7", ["virtio", "erofs"]),  # no SSE 4.2: it would refuse (ENODEV)
        (None, ["virtio", "crc32c_intel", "erofs"]),  # no modalias to tell by: try it
    ],
)
def test_a_module_for_a_cpu_feature_is_skipped_on_a_cpu_without_it(
    tmp_path: Path, loaded: list[str], features: str | None, expected: list[str]
) -> None:
    path = listing(tmp_path, "virtio", f"crc32c_intel fs-erofs {SSE42}", "erofs fs-erofs")
    cpu = tmp_path / "modalias"
    if features is not None:
        cpu.write_text(f"cpu:type:x86,ven0000fam0006mod0006:feature:{features}\n")
    modload._listings[path] = modload.Listing(path, str(cpu))
    modload.load_listed(path)
    modload.need("fs-erofs", path)
    assert loaded == expected


@given(st.text(alphabet="ab*", max_size=8), st.text(alphabet="ab", max_size=8))
def test_glob_match_is_fnmatch_for_stars(pattern: str, text: str) -> None:
    assert modload.glob_match(pattern, text) == fnmatch.fnmatchcase(text, pattern)


RELEASE = os.uname().release


@pytest.fixture
def modules_dep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A generator's image: no listing of ours, its depmod's modules.dep for the running
    release (the lines in an order a dependency-first loader must not rely on)."""
    base = tmp_path / "lib/modules" / RELEASE
    lines = {
        "kernel/fs/overlayfs/overlay.ko": "",
        "kernel/fs/erofs/erofs.ko.xz": "kernel/lib/libcrc32c.ko kernel/lib/crc32c-generic.ko",
        "kernel/lib/libcrc32c.ko": "kernel/lib/crc32c-generic.ko",
        "kernel/lib/crc32c-generic.ko": "",
        "kernel/drivers/watchdog/softdog.ko": "kernel/drivers/watchdog/watchdog.ko",
        "kernel/drivers/watchdog/watchdog.ko": "",
        "kernel/fs/old_kernel.ko.xz": "",
        "kernel/fs/no_decompress.ko.zst": "",
        "kernel/fs/broken.ko": "",
        "kernel/fs/gone.ko": "",
    }
    for module in lines:
        if "gone" not in module:
            (base / module).parent.mkdir(parents=True, exist_ok=True)
            (base / module).write_bytes(b"\x7fELF")
    (base / "modules.dep").write_text("".join(f"{m}: {d}\n" for m, d in lines.items()) + "\n")
    monkeypatch.setattr(
        modload,
        "MODULES_DEP",
        (
            str(tmp_path / "nope/{release}/modules.dep"),
            str(tmp_path / "lib/modules/{release}/modules.dep"),
        ),
    )
    monkeypatch.setattr(modload, "MODPROBE", (fake_modprobe(tmp_path, "modprobe", 0),))
    return base


def test_without_a_listing_a_need_loads_its_module_after_its_dependencies_from_modules_dep(
    tmp_path: Path, loaded: Calls, modules_dep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "no-listing")
    modload.need("fs-erofs", missing)
    modload.need("fs-erofs", missing)
    modload.need("fs-overlay", missing)
    modload.need("watchdog", missing)
    modload.need("fs-ext4", missing)  # built in, or asked of modprobe by the kernel itself
    assert loaded == [
        "crc32c_generic",
        "libcrc32c",
        "erofs (compressed)",
        "overlay",
        "watchdog",
        "softdog",
    ]
    assert not (tmp_path / "modprobe.calls").exists()  # no process for any of them
    assert capsys.readouterr().out == ""
    names = [name.split()[0] for name in loaded]
    assert names == modload.LOADED  # booted.json's "modules"
    assert loaded.no_wait == names  # none of them waits for other drivers' device probes


def test_without_a_listing_a_loop_device_or_watchdog_not_in_modules_dep_is_modprobes(
    tmp_path: Path, loaded: list[str], modules_dep: Path
) -> None:
    modload.need("loop", str(tmp_path / "no-listing"))  # loop is built in, or not in the image
    assert (tmp_path / "modprobe.calls").read_text() == "-q loop max_loop=0\n"
    (modules_dep / "modules.dep").write_text("kernel/drivers/block/loop.ko:\n")
    (modules_dep / "kernel/drivers/block").mkdir(parents=True)
    (modules_dep / "kernel/drivers/block/loop.ko").write_bytes(b"\x7fELF")
    modload._depmods.clear()  # another image
    modload.need("loop", str(tmp_path / "no-listing"))
    assert loaded == ["loop", "loop params: max_loop=0"]
    assert (tmp_path / "modprobe.calls").read_text() == "-q loop max_loop=0\n"


def test_modprobe_gives_loop_no_parameter_of_ours_when_the_user_gives_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loaded: list[str], modules_dep: Path
) -> None:
    """modprobe puts what it is given after modprobe.d and the command line: ours would win."""
    monkeypatch.setattr(modload, "_options", [modload.ModuleOptions((), "loop.max_loop=4")])
    modload.need("loop", str(tmp_path / "no-listing"))
    modload.need("watchdog", str(tmp_path / "no-listing"))
    assert (tmp_path / "modprobe.calls").read_text() == "-q loop\n"


def test_a_compressed_module_the_kernel_cannot_decompress_is_modprobes(
    tmp_path: Path, loaded: list[str], modules_dep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "no-listing")
    modload.need("fs-old-kernel", missing)
    modload.need("fs-no_decompress", missing)
    assert loaded == ["old_kernel (compressed)", "no_decompress (compressed)"]
    assert (tmp_path / "modprobe.calls").read_text() == "-q old_kernel\n-q no_decompress\n"
    assert modload.LOADED == ["old_kernel", "no_decompress"]  # by modprobe
    assert capsys.readouterr().out == ""


def test_a_module_of_modules_dep_that_fails_is_a_warning(
    tmp_path: Path,
    loaded: list[str],
    modules_dep: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    missing = str(tmp_path / "no-listing")
    modload.need("fs-broken", missing)
    modload.need("fs-gone", missing)
    monkeypatch.setattr(modload, "MODPROBE", (fake_modprobe(tmp_path, "failing", 3),))
    modload.need("fs-no_decompress", missing)
    assert loaded == ["broken", "no_decompress (compressed)"]
    assert capsys.readouterr().out == (
        "overlayroot: warning: kernel module broken did not load: Key was rejected by service\n"
        f"overlayroot: warning: cannot open kernel module {modules_dep}/kernel/fs/gone.ko: No"
        " such file or directory\n"
        "overlayroot: warning: kernel module no_decompress did not load:"
        f" {tmp_path}/failing exited with status 3\n"
    )


def test_a_modules_dep_that_is_unreadable_or_odd_is_no_modules(tmp_path: Path) -> None:
    assert modload.Depmod(None).load("erofs") == (False, [])
    assert modload.Depmod(str(tmp_path)).load("erofs") == (False, [])  # a directory
    odd = tmp_path / "modules.dep"
    odd.write_text("\n  \nno-colon.ko\n: orphan.ko\n")
    depmod = modload.Depmod(str(odd))
    assert sorted(depmod.lines) == ["no_colon"]


def write_conf(directory: Path, name: str, text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)


def test_module_options_come_from_modprobe_d_then_the_command_line(tmp_path: Path) -> None:
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    write_conf(
        etc,
        "loop.conf",
        "# a comment\noptions loop max_loop=8 # the rest of the line too\n"
        "options softdog \\\n  soft_margin=30\n",
    )
    write_conf(etc, "b.conf", "options erofs-x a=1\nblacklist loop\nalias foo loop\n")
    write_conf(lib, "loop.conf", "options loop max_loop=99\n")  # hidden by /etc's loop.conf
    write_conf(lib, "a.conf", "options loop part_shift=1\noptions\noptions loop\n")
    write_conf(lib, "skipped.txt", "options loop max_loop=7\n")  # not a .conf file
    (lib / "dir.conf").mkdir()  # cannot be read: skipped
    (lib / "binary.conf").write_bytes(b"options loop \xff\n")  # not UTF-8: skipped
    cmdline = (
        'root=/dev/vda loop.max_loop=16 rd.break erofs_x.b="two words" overlayroot.debug -- x.y=1'
    )
    options = modload.ModuleOptions((str(etc), str(tmp_path / "missing"), str(lib)), cmdline)
    # Files in name order (a.conf, b.conf, loop.conf), then the command line: the kernel applies
    # them in order, so loop.max_loop=16 wins over the file's 8.
    assert options.of("loop") == "part_shift=1 max_loop=8 max_loop=16"
    assert options.of("softdog") == "soft_margin=30"
    assert options.of("erofs_x") == options.of("erofs-x") == 'a=1 b="two words"'
    assert options.of("rd") == "break"  # a bare word is a flag: harmless for a module not named so
    assert options.of("x") == ""  # after --: init's arguments, not the kernel's
    assert options.of("overlay") == ""


def test_module_options_without_modprobe_d_read_the_running_kernels_command_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 overlay.redirect_dir=off\n")
    monkeypatch.setattr(modload, "CMDLINE", str(cmdline))
    assert modload.ModuleOptions((str(tmp_path / "none"),)).of("overlay") == "redirect_dir=off"
    monkeypatch.setattr(modload, "CMDLINE", str(tmp_path / "unreadable"))
    assert modload.ModuleOptions((str(tmp_path / "none"),)).of("overlay") == ""


def test_a_loaded_module_gets_its_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loaded: list[str]
) -> None:
    path = listing(tmp_path, "virtio", "loop loop", "erofs fs-erofs")
    monkeypatch.setattr(modload, "_options", [modload.ModuleOptions((), "loop.max_loop=4")])
    modload.load_listed(path)
    modload.need("loop", path)
    modload.need("fs-erofs", path)
    assert loaded == ["virtio", "loop", "loop params: max_loop=0 max_loop=4", "erofs"]


def test_a_module_its_parameters_do_not_suit_says_which_it_was_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loaded: list[str]
) -> None:
    path = listing(tmp_path, "broken")
    monkeypatch.setattr(modload, "_options", [modload.ModuleOptions((), "broken.size=huge")])
    assert modload.load_listed(path) == (
        [],
        [
            "kernel module broken did not load with the parameters 'size=huge' (modprobe.d"
            " and the kernel command line): Key was rejected by service"
        ],
    )


def test_overlayroot_debug_times_each_module_loaded(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    loaded: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = listing(tmp_path, "virtio", "absent", "loop loop")
    modload.load_listed(path)
    assert capsys.readouterr().out == ""  # not asked for
    monkeypatch.setattr(modload.console, "debug", True)
    modload.need("loop", path)
    modload._listings.clear()
    modload.load_listed(path)  # absent: ENODEV, not loaded, not timed
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "loaded kernel module loop in 0 ms",
        "loaded kernel module virtio in 0 ms",
    ]
    assert all(line.startswith("overlayroot: [") for line in lines)


def test_a_module_loaded_already_is_not_asked_of_the_kernel_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loaded: list[str]
) -> None:
    """Its signature would be checked again before the kernel says EEXIST."""
    sys_module = tmp_path / "sys"
    for name, state in (("libcrc32c", "live\n"), ("coming", "coming\n")):
        (sys_module / name).mkdir(parents=True)
        (sys_module / name / "initstate").write_text(state)
    (sys_module / "builtin").mkdir()  # a built-in module with parameters: no initstate
    monkeypatch.setattr(modload, "SYS_MODULE", str(sys_module))
    path = listing(tmp_path, "libcrc32c", "coming", "builtin", "erofs")
    assert modload.load_listed(path) == (["coming", "builtin", "erofs"], [])
    assert loaded == ["coming", "builtin", "erofs"]


def test_a_needs_module_does_not_wait_for_device_probes_unless_its_options_say_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loaded: Calls
) -> None:
    """``async_probe`` comes first: the kernel applies a module's parameters in order, so an
    ``erofs.async_probe=0`` of the command line (or modprobe.d) wins."""
    path = listing(tmp_path, "virtio", "erofs fs-erofs", "loop loop")
    options = "virtio.x=1 erofs.async_probe=0 loop.max_loop=4"
    monkeypatch.setattr(modload, "_options", [modload.ModuleOptions((), options)])
    modload.load_listed(path)
    modload.need("fs-erofs", path)
    modload.need("loop", path)
    assert loaded.given == {
        "virtio": "x=1",
        "erofs": "async_probe async_probe=0",
        "loop": "async_probe max_loop=0 max_loop=4",
    }


def test_loop_makes_no_devices_ahead_unless_the_user_says(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loaded: Calls
) -> None:
    """``max_loop=0`` first: a ``loop.max_loop=`` of the command line or modprobe.d comes
    after it and wins; other modules get nothing of ours beyond ``async_probe``."""
    path = listing(tmp_path, "erofs fs-erofs", "loop loop")
    modload.need("fs-erofs", path)
    modload.need("loop", path)
    assert loaded.given == {"erofs": "async_probe", "loop": "async_probe max_loop=0"}


def test_a_needs_module_that_refuses_its_parameters_names_the_users_not_async_probe(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    loaded: Calls,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = listing(tmp_path, "broken fs-broken", "absent fs-absent")
    monkeypatch.setattr(modload, "_options", [modload.ModuleOptions((), "broken.size=huge")])
    modload.need("fs-broken", path)
    modload.need("fs-absent", path)  # ENODEV: not this machine's, nothing to say
    assert loaded.no_wait == ["broken", "absent"]
    assert capsys.readouterr().out.splitlines() == [
        "overlayroot: warning: kernel module broken did not load with the parameters"
        " 'size=huge' (modprobe.d and the kernel command line): Key was rejected by service"
    ]
