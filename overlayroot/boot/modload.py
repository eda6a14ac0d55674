"""Load the kernel modules the builder listed, in its order, with finit_module(2).

Each line of the listing is a module's path, then the needs it is loaded for, if any: a module
without needs is loaded at the start of every boot (:func:`load_listed`); one with needs only
when the boot comes to one of them (:func:`need`): ``fs-<type>`` before the stage mounts a
filesystem of that type, ``watchdog`` before it arms a watchdog on a machine without one. A
module's signature check and relocation cost the boot time in proportion to its size, so a
normal boot of an erofs deployment does not pay for squashfs or softdog. Last come the
``cpu:`` modalias patterns of a module for a CPU feature (crc32c-intel: SSE 4.2): it is skipped
on a CPU whose ``/sys/devices/system/cpu/modalias`` matches none, where it would refuse to load.

Under another generator (dracut, initramfs-tools, mkinitcpio) there is no listing of ours, but
the generator ran ``depmod`` on its image: a need loads its module and that module's
dependencies from ``modules.dep`` (:class:`Depmod`), without a ``modprobe`` process.
"""

from __future__ import annotations

import errno
import os

from overlayroot.boot.cmdline import split
from overlayroot.boot.console import Console, now
from overlayroot.core import syscalls

MODULES_LIST = "/usr/lib/overlayroot/modules.list"
# The same list for one kernel release, named by it: an initramfs that carries the modules of two
# kernels (the boot pair's while it changes kernels, docs/kernels.md) has one list for each.
RELEASE_LIST = "/usr/lib/overlayroot/modules.d/{release}.list"


def listing_for(release: str) -> str:
    """The running kernel's own list when the initramfs has one, else the single list."""
    own = RELEASE_LIST.format(release=release)
    return own if os.path.exists(own) else MODULES_LIST


CPU_MODALIAS = "/sys/devices/system/cpu/modalias"


class Listing:
    """The modules of one listing, and which of them were tried already."""

    __slots__ = ("cpu", "done", "lines")

    def __init__(self, path: str, cpu: str = CPU_MODALIAS) -> None:
        try:
            with open(path) as f:
                self.lines = [line.split() for line in f if line.strip()]
        except FileNotFoundError:
            self.lines = []
        self.done: set[str] = set()
        self.cpu = cpu

    def load(self, wanted: str | None) -> tuple[list[str], list[str]]:
        """Load the modules without needs (``wanted`` None) or those for ``wanted``, each once;
        returns the names loaded and warnings for the ones that failed."""
        loaded: list[str] = []
        warnings: list[str] = []
        for path, *tokens in self.lines:
            needs = [t for t in tokens if not t.startswith("cpu:")]
            if path in self.done or (needs and wanted not in needs) or (wanted and not needs):
                continue
            self.done.add(path)
            cpus = [t for t in tokens if t.startswith("cpu:")]
            if cpus and not self._for_this_cpu(cpus):
                continue
            name = _load(path, warnings, wait=wanted is None)
            if name is not None:
                loaded.append(name)
        return loaded, warnings

    def _for_this_cpu(self, patterns: list[str]) -> bool:
        try:
            with open(self.cpu) as f:
                modalias = f.read().strip()
        except OSError:
            return True  # nothing to tell by: let the module decide
        # A pattern with ? or [ ] (none of the kernel's cpu: aliases) is not judged here either.
        return any("?" in p or "[" in p or glob_match(p, modalias) for p in patterns)


def glob_match(pattern: str, text: str) -> bool:
    """Whether ``text`` matches ``pattern``, in which ``*`` stands for any characters (all a
    modalias pattern of a CPU feature uses; ``fnmatch`` would import ``re``)."""
    first, *middle_and_last = pattern.split("*")
    if not middle_and_last:
        return text == pattern
    *middle, last = middle_and_last
    if not text.startswith(first) or len(text) < len(first) + len(last):
        return False
    at, end = len(first), len(text) - len(last)
    for part in middle:
        found = text.find(part, at, end)
        if found < 0:
            return False
        at = found + len(part)
    return text.endswith(last)


_listings: dict[str, Listing] = {}
# Every module this process loaded, in order (booted.json's "modules").
LOADED: list[str] = []
# Where this module's warnings go; with ``console.debug`` (overlayroot.debug, set by /init and
# the hooks' entry once they have read the command line) each module loaded is timed there too.
# A load is mostly the kernel's check of the module's signature: its time grows with its size.
console = Console()


def _listing(path: str) -> Listing:
    if path not in _listings:
        _listings[path] = Listing(path)
    return _listings[path]


def load_listed(listing: str | None = None) -> tuple[list[str], list[str]]:
    """Load every module of ``listing`` (default: the running kernel's, :func:`listing_for`)
    that has no needs, in order (dependencies first).

    Returns the names loaded and warnings for the ones that failed: a module that does not load
    (say, a driver for hardware this machine lacks) must not stop the boot by itself; the step
    that needs it fails later with a message about what is missing.
    """
    return _listing(listing or listing_for(os.uname().release)).load(None)


# The module a need other than a filesystem's (``fs-<type>``: the module <type>) loads where the
# initramfs has no listing of ours; a module that its modules.dep does not have is asked of the
# generator's modprobe.
MODULE_FOR = {"watchdog": "softdog", "loop": "loop"}
MODPROBE = ("/usr/sbin/modprobe", "/sbin/modprobe", "/usr/bin/modprobe", "/bin/modprobe")
MODULES_DEP = ("/lib/modules/{release}/modules.dep", "/usr/lib/modules/{release}/modules.dep")
COMPRESSED = (".xz", ".zst", ".gz")


def need(what: str, listing: str | None = None) -> None:
    """Load the modules listed for ``what`` (``fs-erofs``, ``loop``, ``watchdog``) that were not
    loaded yet; a warning on the console for each that fails (the step that needed it then fails
    with its own message).

    Under another initramfs generator (dracut, initramfs-tools, mkinitcpio) there is no listing
    of ours: the module comes with its dependencies from the generator's ``modules.dep``
    (:func:`depmod`). One it does not list is, for a filesystem, asked of modprobe by the kernel
    itself when it is mounted; for a loop device or a watchdog (which only a trial boot arms),
    of the generator's ``modprobe``."""
    release = os.uname().release
    found = _listing(listing or listing_for(release))
    if found.lines:
        warnings = found.load(what)[1]
    else:
        module = MODULE_FOR.get(what) or (what[3:] if what.startswith("fs-") else what)
        known, warnings = depmod(release).load(module)
        if not known and what in MODULE_FOR:
            warnings += modprobe(module)
    for warning in warnings:
        console.warn(warning)


class Depmod:
    """The modules of a generator's image, from the ``modules.dep`` that ``depmod`` wrote:
    ``path: dependency-path ...`` a line, paths relative to its directory. Only the lines of
    the modules loaded are split further (a generic image lists hundreds)."""

    __slots__ = ("base", "done", "lines")

    def __init__(self, path: str | None) -> None:
        self.lines: dict[str, tuple[str, str]] = {}  # name -> (its path, its dependencies)
        self.done: set[str] = set()
        self.base = os.path.dirname(path) if path else ""
        if path is None:
            return
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines:
            module, _, deps = line.partition(":")
            module = module.strip()
            if module:
                self.lines[_name(module)] = (module, deps)

    def load(self, name: str) -> tuple[bool, list[str]]:
        """Load ``name`` after its dependencies, each once; whether ``modules.dep`` has it,
        and warnings for the modules that failed."""
        name = name.replace("-", "_")
        if name not in self.lines:
            return False, []
        warnings: list[str] = []
        self._load(self.lines[name][0], warnings)
        return True, warnings

    def _load(self, module: str, warnings: list[str]) -> None:
        name = _name(module)
        if name in self.done:
            return
        self.done.add(name)
        # Each dependency after its own: the order of a modules.dep line is not relied on.
        for dep in self.lines.get(name, (module, ""))[1].split():
            self._load(dep, warnings)
        _load(os.path.join(self.base, module), warnings, wait=False)


_depmods: dict[str, Depmod] = {}


def depmod(release: str) -> Depmod:
    """The image's ``modules.dep`` for kernel ``release`` (empty when it has none: our
    standalone image, a kernel with no modules)."""
    if release not in _depmods:
        paths = [p.format(release=release) for p in MODULES_DEP]
        _depmods[release] = Depmod(next((p for p in paths if os.path.exists(p)), None))
    return _depmods[release]


def modprobe(module: str, candidates: tuple[str, ...] | None = None) -> list[str]:
    """Run the first of ``candidates`` (default :data:`MODPROBE`) that exists as
    ``modprobe -q MODULE`` (and our parameters of :data:`OURS` when the user gives the module
    none); warnings if it could not be run or failed. Without a modprobe
    (our standalone image built without kernel modules) there is nothing to ask: the step
    that needed the module says what is missing."""
    command = next((c for c in candidates or MODPROBE if os.access(c, os.X_OK)), None)
    if command is None:
        return []
    # modprobe puts the parameters it is given after the user's (modprobe.d, the command line),
    # so ours go only to a module the user gives none.
    ours = [] if module_options().of(module) else OURS.get(module, "").split()
    try:
        pid = os.posix_spawn(command, [command, "-q", module, *ours], os.environ)
        status = os.waitpid(pid, 0)[1]
    except OSError as e:
        return [f"cannot run {command} for kernel module {module}: {e.strerror}"]
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        return [f"kernel module {module} did not load: {command} exited with status {code}"]
    LOADED.append(module)
    return []


# Where modprobe reads its configuration, the first of a file name winning (kmod's order).
MODPROBE_D = (
    "/etc/modprobe.d",
    "/run/modprobe.d",
    "/usr/local/lib/modprobe.d",
    "/lib/modprobe.d",
    "/usr/lib/modprobe.d",
)
CMDLINE = "/proc/cmdline"


class ModuleOptions:
    """The parameters of each module, read once: the ``options MODULE PARAM...`` lines of the
    ``*.conf`` files in :data:`MODPROBE_D` (sorted by file name; a name in an earlier directory
    hides the same name in a later one; ``#`` comments, ``\\`` continues a line), then the
    command line's ``MODULE.PARAM[=VALUE]`` words. The kernel applies a module's parameters in
    order, so the command line's win where both set one. Names compare with ``-`` and ``_``
    equal. A file that cannot be read is skipped: the boot goes on without its options."""

    __slots__ = ("options",)

    def __init__(self, dirs: tuple[str, ...] = MODPROBE_D, cmdline: str | None = None) -> None:
        self.options: dict[str, list[str]] = {}
        files: dict[str, str] = {}
        for directory in dirs:
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                if name.endswith(".conf") and name not in files:
                    files[name] = os.path.join(directory, name)
        for name in sorted(files):
            try:
                with open(files[name]) as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            for words in _config_lines(text):
                if len(words) > 2 and words[0] == "options":
                    self._add(words[1], words[2:])
        if cmdline is None:
            try:
                with open(CMDLINE) as f:
                    cmdline = f.read()
            except OSError:
                cmdline = ""
        for key, value in split(cmdline)[0]:
            module, dot, param = key.partition(".")
            if dot and module and param:
                self._add(module, [param if value is None else f"{param}={_quote(value)}"])

    def _add(self, module: str, params: list[str]) -> None:
        self.options.setdefault(module.replace("-", "_"), []).extend(params)

    def of(self, module: str) -> str:
        """``module``'s parameters, as finit_module(2) takes them (``""``: none)."""
        return " ".join(self.options.get(module.replace("-", "_"), ()))


def _config_lines(text: str) -> list[list[str]]:
    """The words of each line of a modprobe.d file, continuations joined, comments dropped."""
    lines: list[list[str]] = []
    pending = ""
    for line in text.splitlines():
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        words = line.split("#", 1)[0].split()
        if words:
            lines.append(words)
    return lines


def _quote(value: str) -> str:
    """A value as the kernel's parameter parser reads it back: quoted when it has a space."""
    return f'"{value}"' if any(c in value for c in " \t\n") else value


_options: list[ModuleOptions] = []  # read at the first module loaded


def module_options() -> ModuleOptions:
    if not _options:
        _options.append(ModuleOptions())
    return _options[0]


def _name(path: str) -> str:
    """A module's name from its file: ``.../fs/erofs/erofs.ko.xz`` -> ``erofs``."""
    return os.path.basename(path).split(".", 1)[0].replace("-", "_")


SYS_MODULE = "/sys/module"


def _live(name: str) -> bool:
    """Whether ``name`` is loaded already (``/sys/module/NAME/initstate`` says ``live``). The
    kernel checks a module's signature before it finds the module loaded, so asking it again
    costs a whole load (5 ms for an 8 KB module on the instruction clock)."""
    try:
        with open(f"{SYS_MODULE}/{name}/initstate") as f:
            return f.read().strip() == "live"
    except OSError:
        return False  # not loaded, built in, or no /sys: let finit_module(2) decide


# The kernel's generic module parameter that lets finit_module(2) return without waiting for
# every asynchronous device probe in the system (do_init_module's async_synchronize_full(): for
# every module in kernels since 2022, 6.1 and 6.12 among them; before, only for one whose own
# init queued async work). A module loaded for a need (a filesystem, loop, softdog) probes no
# devices itself: without the parameter the stage waited for other drivers' probes, e.g. under
# dracut's systemd initrd for ata_piix's ports, which udev was probing meanwhile (erofs 93 ms
# instead of 37 on the instruction clock); a real SATA or SCSI port's reset can take seconds.
# The modules of the start (device drivers: the boot needs their disks) keep the wait. Options
# from modprobe.d or the command line come after it, so ``erofs.async_probe=0`` still wins.
NO_WAIT = "async_probe"

# Parameters the stage gives a module before the user's (which come after them, and so win).
# ``loop``: no devices made ahead (``max_loop=0``; the stage takes its device from
# /dev/loop-control, as losetup and mount do since 2012, and losetup makes a named one that
# does not exist). Without it the module made eight at once, /dev/loop0-7, each an add_disk and
# a uevent for udev: 29 ms of Debian 12's initramfs on the instruction clock instead of 15.
# A kernel without the max_loop fix of 2023 (Debian 12's 6.1.0-57 has it) reads 0 as its
# default, eight. ``loop.max_loop=8`` brings the eight back.
OURS = {"loop": "max_loop=0"}


def _load(path: str, warnings: list[str], wait: bool = True) -> str | None:
    name = _name(path)
    if _live(name):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        warnings.append(f"cannot open kernel module {path}: {e.strerror}")
        return None
    # Debian 13's modules are .ko.xz: the kernel decompresses them (the builder of our
    # standalone image stores them decompressed).
    compressed = path.endswith(COMPRESSED)
    params = module_options().of(name)
    given = " ".join(p for p in (OURS.get(name, ""), params) if p)
    started = now()
    try:
        syscalls.finit_module(
            fd,
            name,
            given if wait else f"{NO_WAIT} {given}".rstrip(),
            flags=syscalls.MODULE_INIT_COMPRESSED_FILE if compressed else 0,
        )
        LOADED.append(name)
        if console.debug:
            console.step(f"loaded kernel module {name} in {(now() - started) * 1000:.0f} ms")
        return name
    except OSError as e:
        if compressed and e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            # A kernel that cannot decompress it (before 5.17: EINVAL, the flag unknown;
            # without MODULE_DECOMPRESS: EOPNOTSUPP): the generator's modprobe can.
            failed = modprobe(name)
            warnings += failed
            return None if failed else name
        # EEXIST: already loaded. ENODEV: a driver or an alternative implementation (e.g.
        # crc32c-intel on a CPU without SSE 4.2) for hardware this machine does not have.
        if e.errno not in (errno.EEXIST, errno.ENODEV):
            given = (
                f" with the parameters {params!r} (modprobe.d and the kernel command line)"
                if params
                else ""
            )
            warnings.append(f"kernel module {name} did not load{given}: {e.strerror}")
        return None
    finally:
        os.close(fd)
