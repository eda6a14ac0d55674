"""The rescue shell of the standalone ``/init``: where ``overlayroot.break=`` stops and where
``overlayroot.onfail=shell`` ends a failed boot.

busybox's ``sh`` when the builder put busybox in the image (``--busybox``), with its applets
(``ls``, ``mount``, ``cat``, ``vi``, …) linked into a directory of their own at first use; else
a Python prompt on the frozen interpreter. Either way its first lines say why it was opened and
what leaving it does.
"""

from __future__ import annotations

import os

from overlayroot.boot import priority
from overlayroot.boot.console import Console
from overlayroot.core import syscalls

BUSYBOX = "/usr/lib/overlayroot/busybox"
APPLETS = "/usr/lib/overlayroot/bin"
SHELL_ENV = {
    "PATH": f"{APPLETS}:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/",
    "TERM": "linux",
    "PS1": "overlayroot# ",
}


def rescue_shell(console: Console, why: str, leaving: str) -> None:
    """Say ``why`` and ``leaving`` (what exiting does), then run a shell on the console until
    it exits."""
    console.say(why)
    if os.access(BUSYBOX, os.X_OK):
        console.say(f"rescue shell (busybox sh); {leaving}: exit or Ctrl-D")
        if busybox_shell():
            return
        console.warn("busybox sh could not be started; falling back to a Python prompt")
    else:
        console.say(f"rescue Python prompt (this image has no busybox); {leaving}: exit or Ctrl-D")
    python_shell(console)


def busybox_shell() -> bool:
    """busybox ``sh -i`` on the console, as the leader of a session whose controlling
    terminal is the console's tty (so Ctrl-C reaches what runs in it); False when it did not
    start."""
    if not os.path.isdir(APPLETS):
        os.makedirs(APPLETS, exist_ok=True)
        run([BUSYBOX, "--install", "-s", APPLETS])
    return run([BUSYBOX, "sh", "-i"], session=True) != 127


def run(argv: list[str], session: bool = False) -> int:
    """Run ``argv`` and wait for it (no ``subprocess`` in the stage); its exit status, 127 when
    it could not be run."""
    pid = os.fork()
    if pid == 0:
        try:
            priority.relax()  # the shell and its commands run at the usual priority
            if session:
                _take_console()
            os.execve(argv[0], argv, SHELL_ENV)
        finally:
            os._exit(127)
    while True:
        done, status = os.waitpid(-1, 0)  # reaps orphans the shell leaves to PID 1 too
        if done == pid:
            return os.waitstatus_to_exitcode(status)


def _take_console() -> None:
    """In the child: a new session, and the console's real tty (``/dev/console`` cannot be a
    controlling terminal) on fds 0 to 2, which opening it makes the controlling one."""
    os.setsid()
    try:
        with open("/sys/class/tty/console/active") as f:
            tty = f.read().split()[-1]
        fd = os.open(f"/dev/{tty}", os.O_RDWR)
    except (OSError, IndexError):
        return  # the inherited console, without job control
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def python_shell(console: Console) -> None:
    """A Python prompt on the console. ``exit`` or end of input leaves it."""
    namespace: dict[str, object] = {"os": os, "syscalls": syscalls}
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            return
        if line.strip() in ("exit", "exit()"):
            return
        try:
            exec(compile(line, "<console>", "single"), namespace)
        except SystemExit:
            return
        except BaseException as e:
            print(f"{type(e).__name__}: {e}", flush=True)
