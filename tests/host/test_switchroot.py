"""switch_root for real, in a forked child with a mount namespace of its own: the real init
starts at the usual priority although the stage ran hurried."""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import pytest

from initrd.elf import read_elf
from overlayroot.boot import priority
from overlayroot.boot.switchroot import MOVED_MOUNTS, switch_root
from overlayroot.core import syscalls
from tests.host.conftest import CLONE_NEWNS

BUSYBOX = shutil.which("busybox")
STATIC = BUSYBOX is not None and read_elf(Path(os.path.realpath(BUSYBOX))).interpreter is None
# The nice value of the process, field 19 of its stat (its name, field 2, has no spaces here).
PRINT_NICE = "read -r s < /proc/self/stat; set -- $s; echo ${19}"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a mount namespace and chroot"),
    pytest.mark.skipif(not STATIC, reason="no static busybox to stand in for the real init"),
    # switch_root frees the initramfs when / has an /init (a host like WSL's would lose files).
    pytest.mark.skipif(os.path.exists("/init"), reason="this host's / has an /init"),
]


def test_the_real_init_starts_at_the_usual_priority(tmp_path: Path) -> None:
    assert BUSYBOX is not None
    new_root = tmp_path / "new-root"
    new_root.mkdir()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.dup2(write, 1)
            if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNS) != 0:
                os._exit(3)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            for path in MOVED_MOUNTS:  # mounted, as in an initramfs (switch_root moves them)
                if not os.path.ismount(path):
                    syscalls.mount("tmpfs", path, "tmpfs", 0, None)
            syscalls.mount("tmpfs", str(new_root), "tmpfs", 0, "mode=0755")
            os.mkdir(new_root / "bin")
            os.mkdir(new_root / "proc")  # switch_root moves /proc there
            shutil.copy(BUSYBOX, new_root / "bin/busybox")  # static: runs in the new root
            if not priority.hurry():
                os._exit(4)
            switch_root(str(new_root), "/bin/busybox", ["sh", "-c", PRINT_NICE])
        except BaseException as e:
            os.write(2, f"{e!r}\n".encode())
        finally:
            os._exit(5)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert (os.waitstatus_to_exitcode(status), out) == (0, "0\n")
