"""The promise — never bricked, nothing lost, nobody in — one test per way a review broke it,
each feeding the boot or the command the damage it was broken with."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from overlayroot.boot import assemble, prepare
from overlayroot.commands import target
from overlayroot.commands.staging import deploy
from overlayroot.core import digest, files, statefile, treecopy
from qemu.mounts import mounts_under
from tests.host.conftest import System, add_check

NOBODY = 65534


def v1_good_v2_trial(system: System) -> None:
    """v1 booted and blessed; v2 deployed from the booted system: the default, on trial."""
    system.env.deploy("v1")
    system.boot()
    system.ok("bless")
    system.ok("deploy", "--id", "v2", str(system.tree("v2")))
    system.shutdown()


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, text=True
    )


def open_to_nobody(path: Path) -> None:
    """Let user nobody walk down to ``path`` (pytest's directories are root's, 0700)."""
    for parent in [path, *path.parents]:
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o755)


# -- 1. whatever goes wrong with a candidate, the next one boots -------------------------------


def _manifest_bad_utf8(system: System) -> str:
    path = Path(system.state.deployments) / "v2/manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"origin": "', b'"origin": "\xff'))
    return "not UTF-8"


def _manifest_huge_size(system: System) -> str:
    path = Path(system.state.deployments) / "v2/manifest.json"
    data = json.loads(path.read_text())
    path.write_text(path.read_text().replace(f'"size": {data["size"]}', '"size": 1e999'))
    return "not a valid deployment manifest"


def _image_a_symlink(system: System) -> str:
    image = Path(system.state.deployments) / "v2/root.erofs"
    image.unlink()
    image.symlink_to("/dev/zero")
    return "it is a symlink"


DAMAGED_CANDIDATE = {
    "manifest with invalid UTF-8": _manifest_bad_utf8,
    'manifest with "size": 1e999': _manifest_huge_size,
    "image that is a symlink": _image_a_symlink,
}


@pytest.mark.parametrize("damage", DAMAGED_CANDIDATE)
def test_a_damaged_candidate_falls_back_in_the_same_boot(system: System, damage: str) -> None:
    v1_good_v2_trial(system)
    said = DAMAGED_CANDIDATE[damage](system)
    booted = system.boot()
    assert booted["deployment"] == "v1"
    assert said in str(system.entries()["v2"].bad)
    assert said in system.console and "falling back to deployment v1" in system.console


def test_a_bug_in_a_candidate_falls_back_and_is_named_a_bug(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1_good_v2_trial(system)
    real = assemble.assemble

    def buggy(
        sysroot: str, run_dir: str, opts: object, manifest: object, **kwargs: object
    ) -> assemble.Booted:
        if getattr(manifest, "id", None) == "v2":
            raise TypeError("unsupported operand")
        return real(sysroot, run_dir, opts, manifest, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("overlayroot.boot.prepare.assemble", buggy)
    booted = system.boot()
    assert booted["deployment"] == "v1"
    assert system.entries()["v2"].bad == (
        "internal error (a bug in overlayroot) while booting v2: TypeError: unsupported operand"
    )
    assert "internal error (a bug in overlayroot): TypeError" in system.console


def _upper_a_file(system: System) -> Path:
    upper = Path(system.state.top) / "etc/v2/upper"
    shutil.rmtree(upper)
    upper.write_text("not a directory\n")
    return upper


def _upper_dangling(system: System) -> Path:
    upper = Path(system.state.top) / "etc/v2/upper"
    shutil.rmtree(upper)
    upper.symlink_to("/nonexistent")
    return upper


def _var_a_file(system: System) -> Path:
    var = Path(system.state.var)
    shutil.rmtree(var)
    var.write_text("not a directory\n")
    return var


def _home_a_symlink(system: System) -> Path:
    home = Path(system.state.home)
    shutil.rmtree(home)
    home.symlink_to("/")
    return home


DAMAGED_SHARED = {
    "/etc upper that is a file": _upper_a_file,
    "/etc upper that is a dangling symlink": _upper_dangling,
    "var that is a file": _var_a_file,
    "home that is a symlink to /": _home_a_symlink,
}


@pytest.mark.parametrize("damage", DAMAGED_SHARED)
def test_damaged_state_is_set_aside_not_blamed_on_the_deployment(
    system: System, damage: str
) -> None:
    v1_good_v2_trial(system)
    path = DAMAGED_SHARED[damage](system)
    booted = system.boot()
    assert booted["deployment"] == "v2" and not booted["failed"]
    repairs = [str(r) for r in booted["repairs"]]  # type: ignore[attr-defined]
    assert repairs == [
        f"{system.env.state / path.relative_to(system.env.sysroot)} was not a"
        " directory: set it aside as"
        f" {system.env.state / path.relative_to(system.env.sysroot)}.damaged-1"
        " and made a new one"
    ]
    assert "was not a directory: set it aside" in system.console
    assert any(
        note.startswith("this boot repaired the state filesystem")
        for note in system.status()["notes"]
    )
    assert system.state  # the history says so too
    assert statefile.read_history(system.state)[-2]["event"] == "repaired"
    system.shutdown()
    assert os.path.lexists(f"{path}.damaged-1")  # kept for a person to look at
    assert path.is_dir() and not path.is_symlink()


def test_a_boot_json_nested_too_deep_is_recovered_from_its_backup(system: System) -> None:
    v1_good_v2_trial(system)
    system.boot()
    system.shutdown()
    (Path(system.state.top) / "boot.json").write_text("[" * 100_000)
    booted = system.boot()
    assert booted["deployment"] == "v2"
    assert "nested more than 16 levels" in system.console
    assert "recovered the boot state from" in system.console


def test_the_framework_entry_reports_a_bug_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def broken(*args: object) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(prepare, "prepare_root", broken)
    monkeypatch.setattr("overlayroot.core.syscalls.mount", lambda *args: None)
    assert prepare.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "overlayroot: error: internal error (a bug in overlayroot): ValueError: boom" in out
    assert "Traceback" not in out


def test_the_framework_entry_stamps_its_steps_with_overlayroot_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A hook's share of the boot, on the console with the kernel's clock (bench.integrations
    --append overlayroot.debug), as the standalone /init stamps its steps."""
    booted = SimpleNamespace(deployment=SimpleNamespace(id="v1"))
    monkeypatch.setattr(prepare, "prepare_root", lambda *args: booted)
    monkeypatch.setattr(prepare, "read_cmdline", lambda: "root=LABEL=s overlayroot.debug\n")
    monkeypatch.setattr("overlayroot.core.syscalls.mount", lambda *args: None)
    assert prepare.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    stamped = [line.split("] ", 1)[1] for line in lines if line.startswith("overlayroot: [")]
    nice = os.getpriority(os.PRIO_PROCESS, 0)  # this process's: only the script hurries
    assert stamped == [
        f"the interpreter started and imported the stage (nice {nice})",
        f"re-mounted {tmp_path} read-write",
        "assembled deployment v1",
    ]
    assert lines[-1] == f"overlayroot: prepared deployment v1 on {tmp_path}"
    # Without the option: no stamps.
    monkeypatch.setattr(prepare, "read_cmdline", lambda: "root=LABEL=s\n")
    assert prepare.main([str(tmp_path)]) == 0
    assert "overlayroot: [" not in capsys.readouterr().out


# -- 2. nothing bootable: a degraded last resort, and factory images known good ----------------


def test_a_factory_image_whose_bless_never_runs_keeps_booting(system: System) -> None:
    system.env.deploy("v1")
    for _ in range(4):  # tries=2: the trial is used up after two boots
        booted = system.reboot("overlayroot.tries=2 overlayroot.watchdog=0")
    assert booted["deployment"] == "v1"
    assert booted["degraded"] and booted["trial"] is False
    status = system.status()
    assert any(
        note.startswith("DEGRADED BOOT: v1 was booted as a last resort") for note in status["notes"]
    )
    assert "DEGRADED, a last resort" in system.ok("history")
    system.ok("bless")  # a person fixed it: blessed, it is known good again
    assert system.entries()["v1"].successful
    assert not system.reboot()["degraded"]


def test_deploy_known_good_registers_a_blessed_first_deployment(system: System) -> None:
    out = system.ok(
        "deploy",
        "--sysroot",
        str(system.env.sysroot),
        "--id",
        "factory",
        "--known-good",
        str(system.tree("factory")),
    )
    assert "factory is the default now, known good" in out
    entry = system.entries()["factory"]
    assert entry.successful and entry.verified
    assert system.boot()["trial"] is False


# -- 3. /var and /home seeded all or nothing ---------------------------------------------------


def _failing_copy(monkeypatch: pytest.MonkeyPatch, error: BaseException, at: int = 2) -> None:
    """The ``at``-th file copied fails with ``error``."""
    real = treecopy.copy_file
    calls = 0

    def copy_file(
        src: str, dst: str, done: int = 0, report: Callable[[int], None] | None = None
    ) -> int:
        nonlocal calls
        calls += 1
        if calls == at:
            raise error
        return real(src, dst, done, report)

    monkeypatch.setattr(treecopy, "copy_file", copy_file)


def test_a_power_cut_while_seeding_var_leaves_it_empty_and_the_next_boot_seeds_it(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = system.tree("v1")
    for n in range(5):
        (tree / f"var/file{n}").write_text(f"content {n}\n")
    deploy(system.env.sysroot, tree, deployment_id="v1", created=1)
    _failing_copy(monkeypatch, KeyboardInterrupt())  # the power goes mid-copy
    with pytest.raises(KeyboardInterrupt):
        system.boot()
    assert os.listdir(system.state.var) == []  # never a half-seeded /var
    assert os.path.isdir(Path(system.state.top) / ".var.seeding")
    monkeypatch.undo()
    system.boot()
    var = system.env.state / "overlayroot/var"
    assert (var / "lib/testdata/seed").read_text() == "from the image\n"
    for n in range(5):
        assert (var / f"file{n}").read_text() == f"content {n}\n"
    assert not os.path.lexists(system.env.state / "overlayroot/.var.seeding")


def test_a_full_disk_while_seeding_boots_with_an_empty_var_and_says_so(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    system.env.deploy("v1")
    _failing_copy(monkeypatch, OSError(28, os.strerror(28)), at=1)
    booted = system.boot()
    assert booted["deployment"] == "v1"
    var = system.env.state / "overlayroot/var"
    assert os.listdir(var) == []
    assert "cannot seed the empty" in system.console and "the next boot tries again" in (
        system.console
    )
    assert not os.path.lexists(system.env.state / "overlayroot/.var.seeding")
    monkeypatch.undo()
    system.reboot()
    assert (var / "lib/testdata/seed").read_text() == "from the image\n"


def test_seeding_keeps_xattrs_and_hardlinks(system: System) -> None:
    tree = system.tree("v1")
    (tree / "var/lib/a").write_text("linked\n")
    os.link(tree / "var/lib/a", tree / "var/lib/b")
    os.setxattr(tree / "var/lib/a", "user.kept", b"yes")
    deploy(system.env.sysroot, tree, deployment_id="v1", fmt="dir", created=1)
    system.boot()
    var = system.env.state / "overlayroot/var"
    assert os.stat(var / "lib/a").st_ino == os.stat(var / "lib/b").st_ino
    assert os.getxattr(var / "lib/a", "user.kept") == b"yes"


# -- 4. a damaged boot.json never becomes the backup -------------------------------------------


def test_the_repair_write_keeps_the_good_backup(system: System) -> None:
    v1_good_v2_trial(system)
    state_path = Path(system.state.top) / "boot.json"
    state_path.write_bytes(b"\0" * 512)  # zeroed by a crash
    system.boot()
    system.shutdown()
    assert statefile.parses((Path(system.state.top) / "boot.json.prev").read_bytes())
    state_path.write_bytes(b"\0" * 512)  # and again
    system.boot()
    assert "recovered the boot state from" in system.console
    assert "rebuilt" not in system.console
    assert system.entries()["v1"].successful


# -- 5. a power cut while hashing does not switch verification off ------------------------------


def test_a_power_cut_while_hashing_an_image_does_not_skip_its_check(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1_good_v2_trial(system)
    with open(Path(system.state.deployments) / "v2/root.erofs", "ab") as f:
        f.write(b"bit rot")  # still mounts, no longer matches its digest

    def cut(path: str) -> str:
        raise KeyboardInterrupt  # the power goes while the image is hashed

    monkeypatch.setattr(digest, "file_blake2b", cut)  # the manifest has a BLAKE2b-256
    with pytest.raises(KeyboardInterrupt):
        system.boot()
    assert system.entries()["v2"].tries_left == 2 and not system.entries()["v2"].verified
    monkeypatch.undo()
    booted = system.boot()
    assert booted["deployment"] == "v1"
    assert "fails its digest check" in str(system.entries()["v2"].bad)


def test_a_passed_check_is_recorded_and_not_repeated(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1_good_v2_trial(system)
    system.boot()
    assert system.entries()["v2"].verified
    system.shutdown()
    for name in ("file_sha256", "file_blake2b"):
        monkeypatch.setattr(digest, name, lambda path: pytest.fail("hashed again"))
    assert system.boot()["deployment"] == "v2"


# -- 6. history written under the lock; gc keeps what a pipeline placed -------------------------


def _lock_held(layout_top: Path) -> bool:
    fd = os.open(layout_top / target.LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.mark.parametrize("command", [["mark-bad", "v2"], ["bless"]])
def test_commands_write_the_history_holding_the_lock(
    system: System, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    v1_good_v2_trial(system)
    system.boot("overlayroot.deployment=v1 overlayroot.watchdog=0")
    held: list[bool] = []
    real = statefile.append_history

    def append(layout: object, event: str, deployment: str | None, **fields: object) -> None:
        held.append(_lock_held(Path(system.state.top)))
        real(layout, event, deployment, **fields)  # type: ignore[arg-type]

    monkeypatch.setattr(statefile, "append_history", append)
    system.ok(*command)
    assert held == [True]


def test_concurrent_history_writers_lose_no_line(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    system.env.deploy("v1")
    layout = system.state
    # Trim often, keeping everything: a trim that raced an append would drop the append.
    monkeypatch.setattr(statefile, "HISTORY_TRIM_AT", 1)
    monkeypatch.setattr(statefile, "HISTORY_KEEP", 100_000)
    monkeypatch.setattr(target, "LOCK_WAIT", 30.0)
    children = []
    for writer in ("a", "b"):
        pid = os.fork()
        if pid == 0:
            try:
                where = target.Target(layout, None)
                for n in range(150):
                    with target.locked(layout):
                        where.record("note", None, writer=writer, n=n)
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    lines = statefile.read_history(layout)
    assert sorted((str(e["writer"]), int(str(e["n"]))) for e in lines) == sorted(
        (w, n) for w in "ab" for n in range(150)
    )


# -- 7, 8, 9. nobody in -------------------------------------------------------------------------


def test_images_are_root_only_and_an_old_one_is_tightened_at_boot(system: System) -> None:
    system.env.deploy("v1")
    image = Path(system.state.deployments) / "v1/root.erofs"
    assert image.stat().st_mode & 0o777 == 0o600
    image.chmod(0o644)  # as deployed before the rule
    system.boot()
    assert (system.env.state / "overlayroot/deployments/v1/root.erofs").stat().st_mode & (
        0o777
    ) == 0o600
    open_to_nobody(system.env.state / "overlayroot/deployments/v1")
    refused = as_nobody("cat", str(system.env.state / "overlayroot/deployments/v1/root.erofs"))
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    # Reading the state needs no root: manifests stay readable.
    shown = as_nobody("cat", str(system.env.state / "overlayroot/deployments/v1/manifest.json"))
    assert shown.returncode == 0, shown.stderr


def _mount_options(path: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                return set(fields[5].split(","))
    raise AssertionError(f"{path} is not a mount point")


def test_setuid_programs_of_a_kept_deployment_do_not_work_for_others(system: System) -> None:
    tree = system.tree("old")
    (tree / "usr/bin").mkdir(parents=True)
    shutil.copy2("/usr/bin/id", tree / "usr/bin/id")
    os.chmod(tree / "usr/bin/id", 0o4755)  # set-uid root
    deploy(system.env.sysroot, tree, deployment_id="old", fmt="dir", created=1)
    system.env.deploy("new", "dir")
    assert system.boot()["deployment"] == "new"
    state = system.env.state
    assert {"nosuid", "nodev"} <= _mount_options(state)
    for mounted in (system.env.sysroot, system.env.sysroot / "var", system.env.sysroot / "home"):
        assert not {"nosuid", "nodev"} & _mount_options(mounted)
    old_id = state / "overlayroot/deployments/old/root/usr/bin/id"
    open_to_nobody(old_id.parent)
    ran = as_nobody(str(old_id), "-u")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == str(NOBODY)


def test_nobody_can_hold_the_state_lock(system: System) -> None:
    v1_good_v2_trial(system)
    lock = Path(system.state.top) / target.LOCK
    lock.chmod(0o644)  # as made before the rule
    with target.locked(system.state):
        pass
    assert lock.stat().st_mode & 0o777 == 0o600
    open_to_nobody(Path(system.state.top))
    held = as_nobody("flock", "--nonblock", str(lock), "true")
    assert held.returncode != 0 and "Permission denied" in held.stderr


def test_a_released_lock_names_nobody_and_a_dead_holder_is_not_blamed(system: System) -> None:
    v1_good_v2_trial(system)
    layout = system.state
    with target.locked(layout):
        pass
    assert (Path(layout.top) / target.LOCK).read_text() == ""
    fd = os.open(Path(layout.top) / target.LOCK, os.O_RDWR)
    try:
        os.write(fd, b"pid 999999999: overlayroot deploy x\n")
        fcntl.flock(fd, fcntl.LOCK_EX)  # held by something that does not say who it is
        err = system.fails("mark-bad", "v2", "--sysroot", str(system.env.sysroot))
    finally:
        os.close(fd)
    assert "the file still names pid 999999999, gone" in err


# -- 10. health checks root may trust, with a time limit --------------------------------------


@pytest.mark.parametrize(
    "attack", ["owned by nobody", "world-writable", "group-writable directory"]
)
def test_a_check_others_could_change_is_refused_and_fails(
    system: System, tmp_path: Path, attack: str
) -> None:
    system.env.deploy("v1")
    system.boot()
    add_check(tmp_path, "required", "10-net", "exit 0")
    check = tmp_path / "check.d/required/10-net"
    if attack == "owned by nobody":
        os.chown(check, NOBODY, NOBODY)
        why = "is owned by uid 65534, not root"
    elif attack == "world-writable":
        check.chmod(0o777)
        why = "is writable by its group or others (mode 0777)"
    else:
        check.parent.chmod(0o775)
        why = "is writable by its group or others (mode 0775)"
    err = system.fails("bless", "--no-reboot")
    assert f"health check required/10-net failed (refused, not run: {tmp_path}" in err
    assert why in err
    assert not system.entries()["v1"].successful


def test_a_hung_check_is_killed_at_its_time_limit(system: System, tmp_path: Path) -> None:
    system.env.deploy("v1")
    system.boot()
    marker = tmp_path / "child-alive"
    add_check(
        tmp_path,
        "required",
        "10-hang",
        f"# overlayroot-timeout=1\n(sleep 3; touch {marker}) &\nsleep 100",
    )
    start = time.monotonic()
    err = system.fails("bless", "--no-reboot")
    assert time.monotonic() - start < 10
    assert "health check required/10-hang failed (timed out after 1 s: killed)" in err
    time.sleep(3.5)
    assert not marker.exists()  # the check's children went with it


def test_the_default_check_time_limit_is_an_option(system: System, tmp_path: Path) -> None:
    system.env.deploy("v1")
    system.boot()
    add_check(tmp_path, "wanted", "10-slow", "sleep 100")
    code, out, err = system.run("bless", "--check-timeout", "0.5")
    assert code == 0 and "blessed v1" in out
    assert "health check wanted/10-slow failed (timed out after 0.5 s: killed)" in err
    code, _, err = system.run("bless", "--check-timeout", "0")
    assert code == 2 and "--check-timeout: '0' is not a number of seconds (0 to 86400]" in err


def test_a_bad_time_limit_in_a_check_is_named(system: System, tmp_path: Path) -> None:
    system.env.deploy("v1")
    system.boot()
    add_check(tmp_path, "required", "10-x", "# overlayroot-timeout=soon\nexit 0")
    err = system.fails("bless")
    assert "10-x: overlayroot-timeout='soon' is not a number of seconds" in err


# -- the state files are never read through something that is not a file ----------------------


@pytest.mark.parametrize("name", ["boot.json", "history.jsonl"])
def test_a_fifo_in_a_state_file_s_place_neither_blocks_nor_stops_the_boot(
    system: System, name: str
) -> None:
    v1_good_v2_trial(system)
    system.boot()
    system.shutdown()
    path = Path(system.state.top) / name
    path.unlink()
    os.mkfifo(path)
    booted = system.boot()
    assert booted["deployment"] == "v2"
    system.shutdown()
    assert os.path.lexists(f"{path}.damaged-1")
    assert files.regular_or_missing(path)
    assert mounts_under(system.env.sysroot) == [str(system.env.sysroot)]


def test_an_image_being_deployed_is_never_open_to_others(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = digest.image_digests

    def hashing(
        path: Path, progress: Callable[[int], None] | None = None
    ) -> tuple[str, str | None]:
        seen.append(path.parent.stat().st_mode & 0o777)
        return real(path, progress)

    monkeypatch.setattr(digest, "image_digests", hashing)
    system.env.deploy("v1")
    assert seen == [0o700]  # the staging directory, while mkfs wrote the image in it
    assert (Path(system.state.deployments) / "v1").stat().st_mode & 0o777 == 0o755
