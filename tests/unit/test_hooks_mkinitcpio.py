"""The mkinitcpio hooks, driven through mkinitcpio's documented hook functions.

mkinitcpio is not packaged for Debian, so its functions (add_file, add_symlink, add_module,
add_binary, add_runscript, add_systemd_unit, map, error; at boot mount_handler, err,
run_hookfunctions, launch_interactive_shell) are small stand-ins that record their calls. The
build hook runs the real payload builder. tests/qemu/test_integrations.py builds and boots
images with the real mkinitcpio.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HOOKS = Path(__file__).resolve().parents[2] / "hooks" / "mkinitcpio"
BUILDER = Path(sys.executable).parent / "overlayroot"
PREPARE = "/usr/lib/overlayroot/prepare"
BUSYBOX = Path("/bin/busybox")

# mkinitcpio's functions as stand-ins: each records "name args" in $LOG; files land in
# $BUILDROOT as mkinitcpio would put them.
BUILD_STANDINS = r"""
record() { printf '%s\n' "$*" >> "$LOG"; }
map() { local f=$1; shift; for arg in "$@"; do "$f" "$arg"; done; }
error() { local format=$1; shift; record error "$(printf "$format" "$@")"; return 1; }
add_module() { record add_module "$@"; }
add_binary() { record add_binary "$@"; }
add_runscript() { record add_runscript "${BASH_SOURCE[1]##*/}"; }
add_symlink() {
    record add_symlink "$@"
    mkdir -p "$BUILDROOT${1%/*}" && ln -sfn "$2" "$BUILDROOT$1"
}
add_file() {
    record add_file "$@"
    mkdir -p "$BUILDROOT$(dirname "$2")"
    if [[ $1 == - ]]; then
        cat > "$BUILDROOT$2" && chmod "$3" "$BUILDROOT$2"
    else  # like mkinitcpio: the source's mode unless one is given
        cp --preserve=mode "$1" "$BUILDROOT$2" && { [[ -z $3 ]] || chmod "$3" "$BUILDROOT$2"; }
    fi
}
"""
# mkinitcpio's own accounting: a failing add_* function is a build error.
ERROR_ACCOUNTING = """set -o functrace
trap '(( $? )) && [[ $FUNCNAME == add_* ]] && record builderror "$FUNCNAME"' RETURN"""


# mkinitcpio's own environment: it exports this PATH before it runs any hook.
MKINITCPIO_PATH = "/usr/bin:/bin"


def build(
    tmp_path: Path,
    *,
    systemd: bool,
    builder: str | None = str(BUILDER),
    local_bin: Path | None = None,
) -> tuple[subprocess.CompletedProcess[str], list[str], Path]:
    """Run the build hook. ``builder`` is $OVERLAYROOT_COMMAND (None: unset, and PATH is
    mkinitcpio's); ``local_bin`` is mounted on /usr/local/bin in a private mount namespace."""
    log, root = tmp_path / "log", tmp_path / "buildroot"
    root.mkdir()
    standins = BUILD_STANDINS
    if systemd:
        standins += 'add_systemd_unit() { record add_systemd_unit "$@"; }\n'
    script = (
        f"{standins}\n{ERROR_ACCOUNTING}\n. {HOOKS}/install/overlayroot\nbuild\necho build=$?\n"
    )
    env = dict(os.environ, LOG=str(log), BUILDROOT=str(root), TMPDIR=str(tmp_path))
    if builder is None:
        env.pop("OVERLAYROOT_COMMAND", None)
        env["PATH"] = MKINITCPIO_PATH
    else:
        env["OVERLAYROOT_COMMAND"] = builder
    command = ["bash", "-c", script]
    if local_bin is not None:
        command = [
            "unshare",
            "--mount",
            "sh",
            "-c",
            'mount --make-rprivate / && mount --bind "$0" /usr/local/bin && exec "$@"',
            str(local_bin),
            *command,
        ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls, root


@pytest.fixture(autouse=True)
def needs_builder() -> None:
    if not os.access(BUILDER, os.X_OK):
        pytest.skip(f"{BUILDER} is not installed (pip install -e .)")


def test_build_for_the_busybox_init_adds_the_stage_modules_and_the_runtime_hook(
    tmp_path: Path,
) -> None:
    proc, calls, root = build(tmp_path, systemd=False)
    assert "build=0" in proc.stdout, proc.stderr
    assert not any(c.startswith("builderror") for c in calls)
    assert "add_runscript overlayroot" in calls
    for module in ("overlay", "loop", "erofs", "squashfs", "softdog"):
        assert f"add_module {module}" in calls
    assert "add_binary modprobe" in calls
    assert not any("overlayroot-prepare.service" in c for c in calls)
    prepare = root / PREPARE.lstrip("/")
    assert prepare.read_text().startswith("#!/usr/bin/python3")
    assert os.access(prepare, os.X_OK)
    assert (root / "usr/lib/python311.zip").is_file()
    # The stage's /init and /dev are mkinitcpio's business, not the payload's.
    assert not (root / "init").exists()
    assert not (root / "dev").exists()
    assert not list(tmp_path.glob("overlayroot-payload.*")), "payload left behind"


def test_build_for_the_systemd_hook_adds_a_unit_before_initrd_root_fs(tmp_path: Path) -> None:
    proc, calls, root = build(tmp_path, systemd=True)
    assert "build=0" in proc.stdout, proc.stderr
    assert not any(c.startswith("add_runscript") for c in calls)
    unit = (root / "usr/lib/systemd/system/overlayroot-prepare.service").read_text()
    assert "After=sysroot.mount" in unit
    assert "Before=initrd-root-fs.target" in unit
    assert f"ExecStart={PREPARE} /sysroot" in unit
    assert "Environment=PYTHONHASHSEED=0" in unit  # initrd/build.py, prepare_script
    wants = root / "usr/lib/systemd/system/initrd-root-fs.target.wants/overlayroot-prepare.service"
    assert os.readlink(wants) == "../overlayroot-prepare.service"


def test_the_systemd_unit_is_the_dracut_one(tmp_path: Path) -> None:
    _, _, root = build(tmp_path, systemd=True)
    ours = (root / "usr/lib/systemd/system/overlayroot-prepare.service").read_text()
    dracut = (HOOKS.parent / "dracut/90overlayroot/overlayroot-prepare.service").read_text()

    def settings(text: str) -> list[str]:
        return [line for line in text.splitlines() if line and not line.startswith("#")]

    # But for the modprobe of overlay and erofs: mkinitcpio's image has no modules.dep for the
    # stage to load them from.
    modprobe = "ExecStartPre=-modprobe -a -q overlay erofs"
    assert settings(ours) == [
        line
        for line in settings(dracut)
        for line in ([modprobe, line] if line.startswith("Environment=") else [line])
    ]


def test_no_unit_of_the_systemd_image_needs_a_shell(tmp_path: Path) -> None:
    # Without mkinitcpio's base hook a systemd image has no /bin/sh: a unit that needs one
    # fails (silently, with "-"). The stage asks modprobe for softdog itself.
    proc, _, root = build(tmp_path, systemd=True)
    assert "build=0" in proc.stdout, proc.stderr
    units = root / "usr/lib/systemd/system"
    assert [u.name for u in units.glob("*.service")] == ["overlayroot-prepare.service"]
    for unit in units.glob("*.service"):
        for line in unit.read_text().splitlines():
            if line.startswith("Exec"):
                program = line.partition("=")[2].lstrip("-@!:+").split()[0]
                assert program in ("modprobe", PREPARE), f"{unit.name}: {line}"


def test_build_fails_through_an_add_function_when_the_builder_fails(tmp_path: Path) -> None:
    _, calls, root = build(tmp_path, systemd=False, builder="/bin/false")
    assert "builderror add_overlayroot_stage" in calls
    assert "error overlayroot: '/bin/false initrd build' failed; the error is above" in calls
    assert not (root / PREPARE.lstrip("/")).exists()
    assert not list(tmp_path.glob("overlayroot-payload.*"))


def test_build_names_the_missing_builder(tmp_path: Path) -> None:
    _, calls, _ = build(tmp_path, systemd=False, builder="no-such-overlayroot")
    # mkinitcpio's error takes one format string: the message must read whole.
    assert (
        "error overlayroot: 'no-such-overlayroot' is not installed (pip install"
        " 'overlayroot[build]'), or set OVERLAYROOT_COMMAND"
    ) in calls
    assert "builderror add_overlayroot_stage" in calls


def needs_mount_namespace() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare, to put a private /usr/local/bin in place")


def test_build_finds_a_pip_installed_builder_outside_mkinitcpios_path(tmp_path: Path) -> None:
    # pip puts the command in /usr/local/bin, which mkinitcpio's PATH leaves out.
    needs_mount_namespace()
    local_bin = tmp_path / "local-bin"
    local_bin.mkdir()
    (local_bin / "overlayroot").symlink_to(BUILDER)
    proc, calls, root = build(tmp_path, systemd=False, builder=None, local_bin=local_bin)
    assert "build=0" in proc.stdout, proc.stderr
    assert not any(c.startswith(("error", "builderror")) for c in calls)
    assert os.access(root / PREPARE.lstrip("/"), os.X_OK)


def test_build_without_any_builder_names_where_pip_puts_it(tmp_path: Path) -> None:
    needs_mount_namespace()
    local_bin = tmp_path / "local-bin"
    local_bin.mkdir()
    _, calls, root = build(tmp_path, systemd=False, builder=None, local_bin=local_bin)
    assert any(
        c.startswith("error overlayroot: '/usr/local/bin/overlayroot' is not installed")
        for c in calls
    )
    assert "builderror add_overlayroot_stage" in calls
    assert not (root / PREPARE.lstrip("/")).exists()


def test_help_says_where_the_hook_goes() -> None:
    proc = subprocess.run(
        ["bash", "-c", f". {HOOKS}/install/overlayroot; help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "after 'filesystems'" in proc.stdout
    assert "'systemd'" in proc.stdout


def boot(tmp_path: Path, prepare_status: int) -> list[str]:
    """The runtime hook under busybox ash, as mkinitcpio's /init runs it."""
    if not BUSYBOX.exists():
        pytest.skip("busybox is not installed")
    log = tmp_path / "log"
    stub = tmp_path / "prepare"
    stub.write_text(
        '#!/bin/sh\necho "prepare $*" >> "$LOG"\n'
        'echo "hash seed ${PYTHONHASHSEED-unset}" >> "$LOG"\n'
        f"exit {prepare_status}\n"
    )
    stub.chmod(0o755)
    hook = (HOOKS / "hooks/overlayroot").read_text()
    assert hook.count(PREPARE) == 1
    (tmp_path / "hook").write_text(hook.replace(PREPARE, str(stub)))
    script = f"""
record() {{ echo "$*" >> "$LOG"; }}
default_mount_handler() {{ record mount "$1"; }}
modprobe() {{ record modprobe "$@"; }}
err() {{ record err "$@"; }}
launch_interactive_shell() {{ record shell; }}
run_hookfunctions() {{ record run_hookfunctions "$@"; }}
EMERGENCYHOOKS="keymap overlayroot-test"
mount_handler=default_mount_handler
. {tmp_path}/hook
run_hook
"$mount_handler" /new_root
record init goes on
"""
    subprocess.run(
        [str(BUSYBOX), "sh", "-c", script], env=dict(os.environ, LOG=str(log)), check=True
    )
    return log.read_text().splitlines()


def test_runtime_hook_prepares_the_root_the_mount_handler_mounted(tmp_path: Path) -> None:
    calls = boot(tmp_path, 0)
    assert calls[0] == "mount /new_root"
    # One modprobe for both (the image has no modules.dep for the stage to read); loop and
    # softdog the stage asks for when the boot needs them.
    assert calls[1:3] == ["modprobe -qa overlay erofs", "prepare /new_root"]
    # No wait for the kernel's random pool (initrd/build.py, prepare_script).
    assert calls[calls.index("prepare /new_root") + 1] == "hash seed 0"
    assert not any(c.startswith(("err", "shell", "run_hookfunctions")) for c in calls)
    assert calls[-1] == "init goes on"


def test_runtime_hook_drops_to_a_shell_when_prepare_fails(tmp_path: Path) -> None:
    calls = boot(tmp_path, 1)
    assert "err overlayroot could not assemble the root; the reason is above" in calls
    assert calls.index("prepare /new_root") < calls.index("shell")


def test_runtime_hook_runs_the_emergency_hooks_before_the_shell(tmp_path: Path) -> None:
    # Every failure path of mkinitcpio's /init does, so that e.g. the keymap hook works.
    calls = boot(tmp_path, 1)
    emergency = "run_hookfunctions run_emergencyhook emergency hook keymap overlayroot-test"
    assert emergency in calls
    assert calls.index("prepare /new_root") < calls.index(emergency) < calls.index("shell")


def test_hooks_need_no_mkinitcpio_code_in_the_repository() -> None:
    # The stand-ins above are all there is: nothing of mkinitcpio is vendored.
    assert sorted(p.relative_to(HOOKS).as_posix() for p in HOOKS.rglob("*") if p.is_file()) == [
        "hooks/overlayroot",
        "install/overlayroot",
    ]
    assert shutil.which("bash")
