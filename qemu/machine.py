"""One QEMU guest: boot a kernel, read its serial console, wait for patterns, cut the power."""

from __future__ import annotations

import codecs
import os
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from qemu.kernel import Kernel

Pattern = str | re.Pattern[str]

DEFAULT_FAILURES: tuple[Pattern, ...] = (
    "Kernel panic - not syncing",
    "Attempted to kill init",
)
MARKER = re.compile(r"OVERLAYROOT-TEST (\w[\w.-]*)(?:=(.*))?$", re.MULTILINE)
_TAIL_LINES = 40


class BootFailure(AssertionError):
    """The guest did not reach what a test waited for: names the console log and shows its tail."""

    def __init__(self, reason: str, log_path: Path, console: str) -> None:
        tail = "\n".join(console.splitlines()[-_TAIL_LINES:])
        super().__init__(f"{reason}\nconsole log: {log_path}\n--- console tail ---\n{tail}")
        self.reason = reason
        self.log_path = log_path


@dataclass(frozen=True)
class LoggedDisk:
    """A raw disk behind QEMU's ``blklogwrites`` driver: the guest's writes reach ``path`` as
    usual, and every write, flush and discard is also recorded in ``log`` (dm-log-writes'
    format, see qemu/logwrites.py), which is created or emptied at start."""

    path: Path
    log: Path


class Machine:
    """A guest with a kernel, an initrd and raw disks as /dev/vda, /dev/vdb, … in order.

    Booting again on the same disks is a new Machine with the same disk paths.

    ``icount`` runs the guest on QEMU's instruction clock (``-icount shift=0``): its clocks
    advance one nanosecond per guest instruction while it runs and at host real time while it
    idles (waiting for a disk, a timer). Guest time then no longer depends on how fast the host
    translates and runs code, nor on how busy it is: boot figures repeat to the millisecond.
    What it does not model: caches, instructions per cycle, the cost of the emulator's own
    translation (which under TCG is most of a cold program's start). TCG only.
    """

    def __init__(
        self,
        kernel: Kernel,
        initrd: Path,
        *,
        log_path: Path,
        disks: Sequence[Path | LoggedDisk] = (),
        cmdline: str = "",
        accel: str = "tcg",
        memory_mb: int = 1024,
        icount: bool = False,
    ) -> None:
        if icount and accel != "tcg":
            raise ValueError(f"the instruction clock (icount) needs TCG, not {accel}")
        self.kernel = kernel
        self.initrd = initrd
        self.disks = list(disks)
        self.cmdline = cmdline
        self.accel = accel
        self.memory_mb = memory_mb
        self.icount = icount
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._chunks: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._cursor = 0

    def command(self) -> list[str]:
        # panic=-1 turns a panic into a reboot; -no-reboot turns every reboot into QEMU's exit.
        append = f"console=ttyS0 panic=-1 {self.cmdline}".strip()
        command = [
            "qemu-system-x86_64",
            "-accel", self.accel,
            "-m", str(self.memory_mb),
            "-smp", "1",
            "-nodefaults",
            "-display", "none",
            "-no-reboot",
            "-monitor", "none",
            "-serial", "stdio",
            "-kernel", str(self.kernel.vmlinuz),
            "-initrd", str(self.initrd),
            "-append", append,
        ]  # fmt: skip
        if self.accel == "kvm":
            command += ["-cpu", "host"]
        if self.icount:
            command += ["-icount", "shift=0"]
        for number, disk in enumerate(self.disks):
            if isinstance(disk, LoggedDisk):
                node = f"logged{number}"
                command += [
                    "-blockdev",
                    f"driver=blklogwrites,node-name={node},file.driver=file,"
                    f"file.filename={_escape(disk.path)},log.driver=file,"
                    f"log.filename={_escape(disk.log)},log-append=off",
                    "-device", f"virtio-blk-pci,drive={node}",
                ]  # fmt: skip
            else:
                command += ["-drive", f"file={_escape(disk)},if=virtio,format=raw"]
        return command

    def start(self) -> Machine:
        if self._process is not None:
            raise RuntimeError("a Machine boots once: make a new one to boot again")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for disk in self.disks:
            if isinstance(disk, LoggedDisk):
                disk.log.write_bytes(b"")  # QEMU's file driver opens, never creates
        self._process = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE,  # the serial console's input: see send()
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read_console, daemon=True)
        self._reader.start()
        return self

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def console(self) -> str:
        """Everything the guest and QEMU printed so far, with \\r\\n made \\n."""
        with self._changed:
            return "".join(self._chunks)

    def wait_for(
        self,
        pattern: Pattern,
        timeout: float,
        failure: Sequence[Pattern] = DEFAULT_FAILURES,
    ) -> re.Match[str]:
        """Wait for `pattern` in complete console lines not consumed by an earlier wait_for.

        A str is matched literally, an re.Pattern as a regular expression; the match's positions
        index into `console`.

        Raises BootFailure when a failure pattern shows up first, on timeout, or when QEMU exits.
        """
        wanted = _compile(pattern)
        failures = [_compile(f) for f in failure]
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                console = "".join(self._chunks)
                end = len(console) if self._eof else console.rfind("\n") + 1
                found = wanted.search(console, self._cursor, end)
                for bad in failures:
                    hit = bad.search(console, self._cursor, end)
                    if hit and (found is None or hit.start() < found.start()):
                        raise self._failure(
                            f"failure pattern {bad.pattern!r} before "
                            f"{wanted.pattern!r}: {hit.group(0)!r}",
                            console,
                        )
                if found is not None:
                    self._cursor = found.end()
                    return found
                if self._eof:
                    raise self._failure(
                        f"QEMU exited ({self._returncode()}) before {wanted.pattern!r}", console
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._failure(
                        f"timed out after {timeout:g} s waiting for {wanted.pattern!r}", console
                    )
                self._changed.wait(remaining)

    def send(self, text: str) -> None:
        """Send ``text`` to the guest's serial console, as keys typed there (a command needs
        its ``\n``)."""
        process = self._started()
        assert process.stdin is not None
        process.stdin.write(text.encode())
        process.stdin.flush()

    def wait_exit(self, timeout: float) -> int:
        """QEMU's exit status once the guest powers off, reboots or panics."""
        process = self._started()
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._failure(f"QEMU still running after {timeout:g} s", self.console) from None
        if process.stdin is not None:
            process.stdin.close()
        self._join_reader()
        return returncode

    def kill(self) -> None:
        """Cut the power: SIGKILL QEMU, so nothing the guest had not written reaches the disks."""
        process = self._started()
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdin is not None:
            process.stdin.close()
        self._join_reader()

    def markers(self) -> dict[str, str]:
        """The console's test markers: see parse_markers."""
        return parse_markers(self.console)

    def __enter__(self) -> Machine:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self.kill()

    def _read_console(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        stream = self._process.stdout
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending_cr = False
        with self.log_path.open("w", encoding="utf-8") as log:
            while chunk := os.read(stream.fileno(), 65536):
                text = decoder.decode(chunk)
                if pending_cr:
                    text = "\r" + text
                pending_cr = text.endswith("\r")
                text = text.removesuffix("\r").replace("\r\n", "\n").replace("\r", "")
                log.write(text)
                log.flush()
                with self._changed:
                    self._chunks.append(text)
                    self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join()

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("the Machine was not started")
        return self._process

    def _returncode(self) -> str:
        try:
            return f"status {self._started().wait(5)}"
        except subprocess.TimeoutExpired:
            return "stdout closed, still running"

    def _failure(self, reason: str, console: str) -> BootFailure:
        return BootFailure(reason, self.log_path, console)


def parse_markers(console: str) -> dict[str, str]:
    """`OVERLAYROOT-TEST key=value` lines as a dict; `OVERLAYROOT-TEST done` gives done="".

    A marker may follow kernel output on the same line: printk and userspace share the console.
    """
    return {m.group(1): (m.group(2) or "").strip() for m in MARKER.finditer(console)}


def _escape(path: Path) -> str:
    """A path as a QEMU option value: a comma would end it, so it is doubled."""
    return str(path).replace(",", ",,")


def _compile(pattern: Pattern) -> re.Pattern[str]:
    return pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
