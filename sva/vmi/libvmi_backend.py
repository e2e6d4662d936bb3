"""LibVMI as a VMI backend: Xen domains (`libvmi:DOMAIN`) and raw images (`libvmi+file:PATH`).

LibVMI runs in a child process (`sva.vmi.libvmi_worker`), never in the appliance: some
of its error paths crash the caller (`vmi_init` on a missing file frees its driver twice
and segfaults), so a crash must cost a worker, not the appliance. A dead worker becomes a
TargetError naming the target and the signal; later calls report the same error. The
parent validates what it can before LibVMI sees it (a directory is "a memory file" to
LibVMI's File driver, an ELF core would be read as raw bytes).

What each driver can do (`LibvmiBackend.traits`), reported as it is:
- File: a raw image from GPA 0. No pause (LibVMI's File driver "pauses" with a no-op, we
  do not pretend), no vCPU state (its only "register" is CR3, and only after Linux init,
  where it is the kernel page-table base LibVMI found), no events.
- Xen: live, pause/resume with `vmi_pause_vm`/`vmi_resume_vm`, vCPU registers. LibVMI
  does not report RAM holes: the map is [0, max physical address) and a read in a hole
  is a MemoryAccessError. `memory_size` is the domain's allocated RAM. `frozen()` pairs
  each pause with one resume; LibVMI cannot tell whether someone else had paused the
  domain. If the worker dies while the domain is paused, the error says so (`xl unpause`).
  Nothing here can run Xen: that path is exercised against a named stand-in only.

Bytes travel over a pipe, so `view()` and `region_views()` return copies, not zero-copy
views of guest memory as the QEMU and snapshot backends do.

Linux (optional, `init_linux`): LibVMI's Linux support needs the offsets of
task_struct.tasks/mm/pid/comm and mm_struct.pgd, and the kernel's symbols. `LinuxOsConfig`
carries both, from an explicit list or from an ISF (volatility3 symbol table, e.g. the one
`sva.symbols` builds from the guest's BTF and kallsyms). It reaches LibVMI as a config
*string*; symbols go in a private System.map (LibVMI's own JSON-profile reader takes
addresses through json-c's signed 64-bit getter, which clamps every kernel address to
INT64_MAX, so the ISF file itself is not handed to it). For a file, LibVMI then finds the kernel page tables and the
KASLR shift itself unless `kpgd` is given; `processes()` walks init_task's task list.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import json
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sva.errors import MemoryAccessError, SymbolsError, TargetError
from sva.vmi import libvmi_worker as proto
from sva.vmi.base import MAX_READ, Capabilities, MemoryMap, MemoryRegion, PauseRecord, Registers

WORKER_PATH = str(Path(proto.__file__).resolve())
DEFAULT_TIMEOUT = 30.0  # seconds for one request to the worker
INIT_TIMEOUT = 120.0  # Linux init on a file may search all of RAM for the page tables
START_TIMEOUT = 30.0  # a fresh interpreter importing cffi and LibVMI
READ_CHUNK = 8 << 20  # bytes per read request
MAX_PATH = 500  # LibVMI keeps strndup(name, 500) of the file name: longer would be another file
START_KERNEL_MAP = 0xFFFFFFFF80000000  # x86-64: where the kernel image mapping starts


def install_hint(why: str) -> str:
    py = ".".join(map(str, sys.version_info[:3]))
    return (
        f"the LibVMI backend needs the libvmi Python package ({why}): install the libvmi extra, "
        f"pip install 'sva[libvmi]' - PyPI has libvmi wheels for CPython <= 3.11 only, this is CPython {py}"
    )


def require_binding(target: str) -> None:
    """Raise a TargetError with the install hint when `import libvmi` cannot work."""
    try:
        found = importlib.util.find_spec("libvmi") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise TargetError(target, install_hint("No module named 'libvmi'"))


# -- drivers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriverTraits:
    """What a LibVMI driver offers, beyond the `Capabilities` every backend reports."""

    capabilities: Capabilities
    registers: str  # what vCPU state there is
    libvmi_events: bool  # whether LibVMI has events for this driver (sva does not subscribe)


class LibvmiDriver(enum.Enum):
    FILE = "file"
    XEN = "xen"

    @property
    def scheme(self) -> str:
        return "libvmi+file" if self is LibvmiDriver.FILE else "libvmi"

    @property
    def traits(self) -> DriverTraits:
        if self is LibvmiDriver.FILE:
            return DriverTraits(
                Capabilities(live=False, pause=False, registers=False),
                registers="none; LibVMI's CR3 is the kernel page-table base it found, only after init_linux",
                libvmi_events=False,
            )
        return DriverTraits(Capabilities(live=True, pause=True, registers=True), "all vCPUs", libvmi_events=True)


# -- Linux configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class LinuxOffsets:
    """Byte offsets LibVMI's Linux support needs (its linux_* config keys)."""

    tasks: int  # task_struct.tasks
    mm: int  # task_struct.mm
    pid: int  # task_struct.pid
    comm: int  # task_struct.comm (LibVMI: linux_name)
    pgd: int  # mm_struct.pgd

    def __post_init__(self) -> None:
        for name in ("tasks", "mm", "pid", "comm", "pgd"):
            value = getattr(self, name)
            # LibVMI treats 0 as "not given" and would look in a JSON profile it has not got.
            if not isinstance(value, int) or not 0 < value < 1 << 16:
                raise SymbolsError("linux offsets", f"{name} offset {value!r} is not a plausible struct offset")

    @classmethod
    def from_isf(cls, isf: Mapping[str, Any]) -> LinuxOffsets:
        return cls(
            tasks=isf_member_offset(isf, "task_struct", "tasks"),
            mm=isf_member_offset(isf, "task_struct", "mm"),
            pid=isf_member_offset(isf, "task_struct", "pid"),
            comm=isf_member_offset(isf, "task_struct", "comm"),
            pgd=isf_member_offset(isf, "mm_struct", "pgd"),
        )


def isf_member_offset(isf: Mapping[str, Any], struct: str, member: str) -> int:
    """Offset of `member` in ISF user type `struct`, looking inside anonymous members
    (6.1's mm_struct keeps pgd in an anonymous struct)."""
    types = isf.get("user_types")
    if not isinstance(types, Mapping):
        raise SymbolsError("ISF", "no user_types")

    def find(name: str, depth: int) -> int | None:
        fields = (types.get(name) or {}).get("fields")
        if not isinstance(fields, Mapping) or depth > 8:
            return None
        entry = fields.get(member)
        if isinstance(entry, Mapping) and isinstance(entry.get("offset"), int):
            return int(entry["offset"])
        for entry in fields.values():
            if not (isinstance(entry, Mapping) and entry.get("anonymous")):
                continue
            inner_type = entry.get("type") or {}
            if inner_type.get("kind") in ("struct", "union") and isinstance(entry.get("offset"), int):
                inner = find(str(inner_type.get("name")), depth + 1)
                if inner is not None:
                    return int(entry["offset"]) + inner
        return None

    if struct not in types:
        raise SymbolsError("ISF", f"no user type {struct}")
    found = find(struct, 0)
    if found is None:
        raise SymbolsError("ISF", f"{struct} has no member {member}")
    return found


@dataclass(frozen=True)
class LinuxOsConfig:
    """What LibVMI needs to initialise its Linux support, as a LibVMI config string.

    `symbols` (name -> link-time address) are written to a private System.map; or
    `sysmap` names an existing one. `kpgd` (physical address of the kernel's top page
    table) and `kaslr` (virtual shift) are optional: LibVMI finds them when not given.
    """

    offsets: LinuxOffsets
    symbols: Mapping[str, int] | None = None
    sysmap: str | None = None
    kpgd: int | None = None
    kaslr: int | None = None

    def __post_init__(self) -> None:
        if (self.symbols is None) == (self.sysmap is None):
            raise SymbolsError("linux config", "give exactly one of symbols and sysmap")

    @classmethod
    def from_isf(cls, isf: Mapping[str, Any], *, kpgd: int | None = None, kaslr: int | None = None) -> LinuxOsConfig:
        """Offsets from the ISF's user_types, symbols from its symbols.

        LibVMI's file-mode search for the kernel page tables starts from the kernel's
        virtual/physical boundary, which it takes from `phys_startup_64`; kernels stopped
        having that symbol long ago, so it is derived from the x86-64 link layout
        (startup_64's link address minus __START_KERNEL_map) when the ISF lacks it.
        """
        raw = isf.get("symbols")
        if not isinstance(raw, Mapping):
            raise SymbolsError("ISF", "no symbols")
        symbols: dict[str, int] = {}
        for name, entry in raw.items():
            address = entry.get("address") if isinstance(entry, Mapping) else None
            if isinstance(address, int) and 0 <= address < 1 << 64 and _sysmap_name(name):
                symbols[name] = address
        for needed in ("init_task", "init_top_pgt"):
            if needed not in symbols:
                raise SymbolsError("ISF", f"no symbol {needed}; LibVMI's Linux support needs it")
        start = symbols.get("startup_64") or symbols.get("_text")
        if "phys_startup_64" not in symbols and start is not None and start > START_KERNEL_MAP:
            symbols["phys_startup_64"] = start - START_KERNEL_MAP
            symbols.setdefault("startup_64", start)
        return cls(LinuxOffsets.from_isf(isf), symbols=symbols, kpgd=kpgd, kaslr=kaslr)

    def config_string(self, sysmap_path: str, driver: LibvmiDriver) -> str:
        if any(c in sysmap_path for c in '"\n;{}'):
            raise TargetError(sysmap_path, "System.map path unusable in a LibVMI config string")
        o = self.offsets
        items = [
            'ostype = "Linux"',
            f'sysmap = "{sysmap_path}"',
            f"linux_tasks = {o.tasks:#x}",
            f"linux_mm = {o.mm:#x}",
            f"linux_pid = {o.pid:#x}",
            f"linux_name = {o.comm:#x}",
            f"linux_pgd = {o.pgd:#x}",
        ]
        if self.kpgd is not None:
            items.append(f"kpgd = {self.kpgd:#x}")
            if driver is LibvmiDriver.FILE:
                # With kpgd given LibVMI skips its file-mode search, the only place it
                # would set the paging mode for a file: say it.
                items.append('pagemode = "VMI_PM_IA32E"')
        if self.kaslr:
            items.append(f"linux_kaslr = {self.kaslr:#x}")
        return "{" + "; ".join(items) + ";}"


def _sysmap_name(name: object) -> bool:
    # The names come from guest memory: keep only what a System.map line can carry.
    return isinstance(name, str) and 0 < len(name) <= 200 and name.isascii() and name.isprintable() and " " not in name


def write_sysmap(symbols: Mapping[str, int], path: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        for name, address in sorted(symbols.items(), key=lambda kv: (kv[1], kv[0])):
            f.write(f"{address:016x} T {name}\n")


@dataclass(frozen=True)
class LinuxOsInfo:
    """What LibVMI settled on when it initialised Linux."""

    kpgd: int  # physical address of the kernel's top-level page table
    kaslr_offset: int  # virtual KASLR shift
    init_task: int  # run-time address of init_task
    page_mode: str


@dataclass(frozen=True)
class LibvmiProcess:
    """One entry of the guest's task list, as LibVMI's Linux support reads it."""

    pid: int
    comm: str
    task: int  # task_struct address
    mm: int  # 0 for kernel threads
    dtb: int | None  # LibVMI's pid -> page-table base; None without an mm


# -- the worker ----------------------------------------------------------------------------


class _Worker:
    """The LibVMI child process and the request/answer exchange with it."""

    def __init__(self, target: str, command: Sequence[str], start_timeout: float) -> None:
        self.target = target
        self.dead: str | None = None
        self._lock = threading.Lock()
        self._log: IO[bytes] = tempfile.TemporaryFile(prefix="sva-libvmi-")
        try:
            self.proc = subprocess.Popen(
                list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, close_fds=True
            )
        except OSError as e:
            self._log.close()
            raise TargetError(target, f"cannot start the LibVMI worker: {e.strerror}") from None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._req, self._ans = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        self._finalizer = weakref.finalize(self, _reap, self.proc, self._log)
        self._mark = 0
        self._unsynced = False  # an exchange was cut short: resynchronise before the next
        try:
            hello = self._receive("start", time.monotonic() + start_timeout, None)
        except BaseException:
            self.close()
            raise
        if not isinstance(hello, dict) or hello.get("protocol") != proto.PROTOCOL:
            self.close()
            raise TargetError(target, f"the LibVMI worker speaks another protocol: {hello!r}")

    # -- exchange ----------------------------------------------------------------------

    def call(self, op: str, timeout: float, into: memoryview | None = None, **args: Any) -> Any:
        """Send one request; returns the JSON result, the bytes, or fills `into`."""
        with self._lock:
            if self.dead is not None:
                raise TargetError(self.target, self.dead)
            deadline = time.monotonic() + timeout
            if self._unsynced:
                self._resync(deadline)
            self._mark = self._log_size()
            self._unsynced = True  # until the whole answer has been read
            self._send(op, proto.encode_request(op, **args))
            return self._receive(op, deadline, into)

    def _send(self, op: str, request: bytes) -> None:
        try:
            proto._write_all(self._req, request)
        except (BrokenPipeError, ConnectionResetError):
            raise self._died(op) from None

    def _receive(self, op: str, deadline: float, into: memoryview | None) -> Any:
        head = self._recv(op, proto.HEADER.size + 1, deadline)
        (length,) = proto.HEADER.unpack(head[: proto.HEADER.size])
        kind, n = head[-1:], length - 1
        if into is not None and kind == proto.KIND_JSON:
            raise self._broken(op, "answered a read with JSON")
        if kind == proto.KIND_BYTES and into is not None:
            if n != len(into):
                raise self._broken(op, f"sent {n} bytes for a {len(into)}-byte read")
            self._recv(op, n, deadline, into)
            self._unsynced = False
            return None
        if n > MAX_READ:
            raise self._broken(op, f"announced a {n}-byte answer")
        body = self._recv(op, n, deadline)
        self._unsynced = False
        if kind == proto.KIND_BYTES:
            return body
        try:
            data = json.loads(body)
        except ValueError:
            raise self._broken(op, "sent an answer that is not JSON") from None
        if kind == proto.KIND_JSON:
            return data
        if kind == proto.KIND_ERROR and isinstance(data, dict):
            raise _WorkerFailure(str(data.get("kind")), str(data.get("message")), data, self.said())
        raise self._broken(op, f"sent an answer of unknown kind {kind!r}")

    def _resync(self, deadline: float) -> None:
        """Find the frame boundary again after an exchange was cut short (Ctrl-C in the
        middle of an answer): ask the worker to echo a random token and drop everything
        up to and including that answer. Guest memory in the dropped answers cannot
        contain the token, which did not exist when they were sent."""
        token = secrets.token_hex(16)
        expected = proto.encode_answer(proto.KIND_JSON, json.dumps({"sync": token}).encode())
        self._send("sync", proto.encode_request("sync", token=token))
        window, dropped = b"", 0
        while True:
            window += self._recv_some("sync", deadline)
            if window.endswith(expected):
                self._unsynced = False
                return
            keep = window[-(len(expected) - 1) :]
            dropped += len(window) - len(keep)
            window = keep
            if dropped > 2 * READ_CHUNK + (1 << 20):
                raise self._broken("sync", f"had {dropped} bytes queued after an interrupted request")

    def _wait_readable(self, op: str, deadline: float) -> None:
        poller = select.poll()
        poller.register(self._ans, select.POLLIN | select.POLLHUP | select.POLLERR)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(op)
            if poller.poll(max(1, int(left * 1000))):
                return

    def _recv_some(self, op: str, deadline: float) -> bytes:
        self._wait_readable(op, deadline)
        got = os.read(self._ans, 1 << 20)
        if not got:
            raise self._died(op)
        return got

    def _recv(self, op: str, n: int, deadline: float, into: memoryview | None = None) -> bytes:
        out = into if into is not None else memoryview(bytearray(n))
        pos = 0
        while pos < n:
            self._wait_readable(op, deadline)
            got = os.readv(self._ans, [out[pos:n]])
            if got == 0:
                raise self._died(op)
            pos += got
        return b"" if into is not None else bytes(out)

    # -- failure ------------------------------------------------------------------------

    def _log_size(self) -> int:
        try:
            return os.fstat(self._log.fileno()).st_size
        except (OSError, ValueError):
            return 0

    def said(self, since: int | None = None) -> str:
        """LibVMI's own output since the current request started (last lines, one line)."""
        start = self._mark if since is None else since
        try:
            end = self._log_size()
            start = max(start, end - 4096)
            text = os.pread(self._log.fileno(), end - start, start) if end > start else b""
        except (OSError, ValueError):
            return ""
        lines = [ln.strip() for ln in text.replace(b"\0", b"").decode("utf-8", "replace").splitlines()]
        return " | ".join([ln for ln in lines if ln][-4:])

    def _died(self, op: str) -> TargetError:
        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if rc < 0:
            try:
                how = f"died from signal {signal.Signals(-rc).name}"
            except ValueError:
                how = f"died from signal {-rc}"
        else:
            how = f"exited with status {rc}"
        said = self.said()
        self.dead = f"LibVMI worker (pid {self.proc.pid}) {how} during {op}"
        if said:
            self.dead += f"; LibVMI said: {said}"
        return TargetError(self.target, self.dead)

    def _timed_out(self, op: str) -> TargetError:
        self.proc.kill()
        self.proc.wait()
        self.dead = f"LibVMI worker (pid {self.proc.pid}) did not answer {op} in time and was stopped"
        return TargetError(self.target, self.dead)

    def _broken(self, op: str, what: str) -> TargetError:
        self.proc.kill()
        self.proc.wait()
        self.dead = f"LibVMI worker (pid {self.proc.pid}) broke the protocol: during {op} it {what}"
        return TargetError(self.target, self.dead)

    def close(self) -> None:
        with self._lock:
            if self.proc.poll() is None and self.dead is None:
                try:
                    proto._write_all(self._req, proto.encode_request("close"))
                    self.proc.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if self.dead is None:
                self.dead = "backend is closed"
            self._finalizer()


def _reap(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
    log.close()


class _WorkerFailure(Exception):
    """An E answer: the worker is fine, the operation failed."""

    def __init__(self, kind: str, message: str, data: dict[str, Any], said: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.data = data
        self.said = said

    def describe(self) -> str:
        return f"{self} (LibVMI said: {self.said})" if self.said else str(self)


# -- the backend ---------------------------------------------------------------------------


def check_raw_image(path: str, target: str) -> str:
    """The absolute path of a raw memory image LibVMI's File driver may be given.

    LibVMI would segfault on a missing file and accept a directory; an ELF core or a
    LiME file would be read as raw bytes. Those are refused here, with the reason.
    """
    from sva.vmi.snapshot import detect_format

    try:
        path = os.path.abspath(path)
        st = os.stat(path)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise TargetError(target, f"cannot open {path}: {why}") from None
    if stat.S_ISDIR(st.st_mode):
        raise TargetError(target, f"{path} is a directory, not a raw memory image")
    if not stat.S_ISREG(st.st_mode):
        raise TargetError(target, f"{path} is not a regular file; LibVMI's File driver reads raw memory images")
    if len(path.encode()) > MAX_PATH:
        raise TargetError(target, f"path longer than {MAX_PATH} bytes, which LibVMI would cut short")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise TargetError(target, f"cannot open {path}: {e.strerror}") from None
    fmt = detect_format(path, target)  # refuses empty and non-page-multiple files
    if fmt != "raw":
        raise TargetError(
            target, f"{path} is a{'n' if fmt == 'elf' else ''} {fmt.upper()} snapshot; LibVMI's File driver reads "
            f"raw images only: open it as file:{path}"
        )
    return path


class LibvmiBackend:
    """A guest's memory (and, on Xen, vCPUs and execution) through LibVMI in a child process."""

    def __init__(
        self,
        driver: LibvmiDriver,
        name: str,
        *,
        target: str | None = None,
        linux: LinuxOsConfig | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        init_timeout: float = INIT_TIMEOUT,
        worker_command: Sequence[str] | None = None,
    ) -> None:
        """`worker_command` replaces `python libvmi_worker.py` (test stand-ins only)."""
        self.driver = driver
        self.target = target or f"{driver.scheme}:{name}"
        self.traits = driver.traits
        self.capabilities = self.traits.capabilities
        self.timeout = timeout
        self.init_timeout = init_timeout
        self.linux: LinuxOsInfo | None = None
        self._tmpdir: str | None = None
        self._closed = False
        if driver is LibvmiDriver.FILE:
            name = check_raw_image(name, self.target)
            self.path: str | None = name
        else:
            if not name or len(name) > 256 or not name.isprintable():
                raise TargetError(self.target, "a Xen domain name is 1-256 printable characters")
            self.path = None
        self.name = name
        if worker_command is None:
            require_binding(self.target)
            worker_command = [sys.executable, WORKER_PATH]
        try:
            self._worker = _Worker(self.target, worker_command, max(START_TIMEOUT, timeout))
        except _WorkerFailure as e:
            self._closed = True
            why = install_hint(e.args[0]) if e.kind == "import" else e.describe()
            raise TargetError(self.target, why) from None
        try:
            info = self._call("open", driver=driver.value, name=name)
            self._memsize = int(info["memsize"])
            end = int(info["max_physical_address"])
            self._vcpus = int(info["vcpus"]) if driver is LibvmiDriver.XEN else 0
            if driver is LibvmiDriver.FILE:
                size = os.stat(name).st_size
                if end != size:
                    raise TargetError(self.target, f"LibVMI sees {end} bytes in {name}, which holds {size}")
            if end <= 0:
                raise TargetError(self.target, "LibVMI reports no guest memory")
            self.memory_map = MemoryMap([MemoryRegion(gpa=0, size=end, offset=0, name="ram")])
            if linux is not None:
                self.init_linux(linux)
        except BaseException:
            self.close()
            raise

    # -- plumbing ------------------------------------------------------------------------

    def _call(self, op: str, timeout: float | None = None, into: memoryview | None = None, **args: Any) -> Any:
        try:
            return self._worker.call(op, self.timeout if timeout is None else timeout, into, **args)
        except _WorkerFailure as e:
            if e.kind == "import":
                raise TargetError(self.target, install_hint(e.args[0])) from None
            raise TargetError(self.target, e.describe()) from None

    def _check_open(self) -> None:
        if self._closed:
            raise TargetError(self.target, "backend is closed")

    # -- memory --------------------------------------------------------------------------

    @property
    def memory_size(self) -> int:
        return self._memsize

    def read(self, gpa: int, size: int) -> bytes:
        """Copy `size` bytes at guest-physical `gpa`."""
        if size > MAX_READ:
            raise MemoryAccessError(gpa, size, f"read larger than {MAX_READ} bytes refused")
        buf = bytearray(size)
        self.readinto(gpa, buf)
        return bytes(buf)

    def readinto(self, gpa: int, buf: bytearray | memoryview) -> int:
        """Fill `buf` from guest-physical `gpa`; returns len(buf) or raises."""
        self._check_open()
        out = memoryview(buf).cast("B")
        self.memory_map.translate(gpa, len(out))  # raises for anything outside the map
        pos = 0
        while pos < len(out):
            n = min(READ_CHUNK, len(out) - pos)
            try:
                self._worker.call("read_pa", self.timeout, out[pos : pos + n], addr=gpa + pos, size=n)
            except _WorkerFailure as e:
                if e.kind == "memory":
                    raise MemoryAccessError(gpa, len(out), e.describe()) from None
                raise TargetError(self.target, e.describe()) from None
            pos += n
        return pos

    def view(self, gpa: int, size: int) -> memoryview:
        """A read-only view of [gpa, gpa+size): a copy, since LibVMI's pages live in the worker."""
        return memoryview(self.read(gpa, size))

    def region_views(self) -> Iterator[tuple[MemoryRegion, memoryview]]:
        """Each region with a (copied) view of its bytes."""
        for region in self.memory_map:
            yield region, self.view(region.gpa, region.size)

    # -- vCPU and execution control ---------------------------------------------------------

    @property
    def vcpu_count(self) -> int:
        return self._vcpus

    def regs(self, vcpu: int = 0) -> Registers:
        self._check_open()
        if not self.capabilities.registers:
            raise TargetError(
                self.target,
                "LibVMI's File driver has no vCPU state (a raw image holds none); "
                "after init_linux the kernel page-table base LibVMI found is in .linux.kpgd",
            )
        if not 0 <= vcpu < self._vcpus:
            raise TargetError(self.target, f"no vCPU {vcpu}; the guest has {self._vcpus}")
        r = self._call("regs", vcpu=vcpu)
        main = ("rip", "rsp", "rflags", "cr0", "cr2", "cr3", "cr4", "msr_efer", "idtr_base", "idtr_limit",
                "gdtr_base", "gdtr_limit")  # fmt: skip
        return Registers(
            vcpu=vcpu,
            rip=r["rip"],
            rsp=r["rsp"],
            rflags=r["rflags"],
            cr0=r["cr0"],
            cr2=r["cr2"],
            cr3=r["cr3"],
            cr4=r["cr4"],
            efer=r["msr_efer"],
            idtr_base=r["idtr_base"],
            idtr_limit=r["idtr_limit"],
            gdtr_base=r["gdtr_base"],
            gdtr_limit=r["gdtr_limit"],
            extra={k: v for k, v in r.items() if k not in main},
        )

    def pause(self) -> None:
        self._check_open()
        if not self.capabilities.pause:
            raise TargetError(self.target, "a memory image cannot be paused (LibVMI's File driver)")
        self._call("pause")

    def resume(self) -> None:
        self._check_open()
        if not self.capabilities.pause:
            raise TargetError(self.target, "a memory image cannot be resumed (LibVMI's File driver)")
        try:
            self._call("resume")
        except TargetError as e:
            hint = f"the domain may still be paused: check with `xl list`, `xl unpause {self.name}`"
            raise TargetError(self.target, f"{e.reason}; {hint}") from None

    @contextlib.contextmanager
    def frozen(self) -> Iterator[PauseRecord]:
        """Pause for the block and always resume after, also on error or Ctrl-C.

        A file does not run: the block just runs, with a zero pause.
        """
        rec = PauseRecord(started=time.monotonic())
        if not self.capabilities.pause:
            rec.seconds = 0.0
            yield rec
            return
        self.pause()
        t0 = time.perf_counter()
        try:
            yield rec
        finally:
            self.resume()
            rec.seconds = time.perf_counter() - t0

    # -- Linux -------------------------------------------------------------------------------

    def init_linux(self, config: LinuxOsConfig) -> LinuxOsInfo:
        """Initialise LibVMI's Linux support (once); returns what LibVMI found."""
        self._check_open()
        if self.linux is not None:
            raise TargetError(self.target, "LibVMI's Linux support is already initialised")
        sysmap = config.sysmap
        if sysmap is None:
            assert config.symbols is not None
            self._tmpdir = self._tmpdir or tempfile.mkdtemp(prefix="sva-libvmi-")
            sysmap = os.path.join(self._tmpdir, "System.map")
            write_sysmap(config.symbols, sysmap)
        info = self._call("init_linux", timeout=self.init_timeout, config=config.config_string(sysmap, self.driver))
        self.linux = LinuxOsInfo(
            kpgd=info["kpgd"], kaslr_offset=info["linux_kaslr"], init_task=info["linux_init_task"],
            page_mode=info["page_mode"],
        )  # fmt: skip
        return self.linux

    def _need_linux(self) -> None:
        self._check_open()
        if self.linux is None:
            raise TargetError(self.target, "call init_linux first: LibVMI's Linux support is not initialised")

    def processes(self, limit: int = proto.MAX_TASKS) -> list[LibvmiProcess]:
        """The guest's task list from init_task, as LibVMI's Linux support walks it."""
        self._need_linux()
        answer = self._call("processes", limit=limit, seconds=proto.WALK_SECONDS)
        return [LibvmiProcess(**p) for p in answer["processes"]]

    def read_kernel(self, address: int, size: int) -> bytes:
        """Bytes at a kernel virtual address, translated through LibVMI's kernel page tables."""
        self._need_linux()
        return bytes(self._call("read_kernel", addr=address, size=size))

    def read_ksym(self, symbol: str, size: int) -> bytes:
        """`size` bytes at a kernel symbol, NUL bytes included (unlike the binding's read_ksym)."""
        self._need_linux()
        return bytes(self._call("read_ksym", name=symbol, size=size))

    # -- lifetime ----------------------------------------------------------------------------

    def _debug_crash_worker(self) -> None:
        """Make the worker abort, as a LibVMI crash would (tests of the isolation only)."""
        self._call("_debug_abort")

    @property
    def worker_pid(self) -> int:
        return self._worker.proc.pid

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> LibvmiBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_libvmi_target(scheme: str, rest: str, target: str, timeout: float = DEFAULT_TIMEOUT) -> LibvmiBackend:
    """`libvmi:DOMAIN` (Xen) or `libvmi+file:PATH` (a raw image) as a backend."""
    driver = LibvmiDriver.FILE if scheme == "libvmi+file" else LibvmiDriver.XEN
    return LibvmiBackend(driver, rest, target=target, timeout=max(timeout, DEFAULT_TIMEOUT))
