"""The guest's processes and kernel modules, read from outside the guest.

Two walks of the kernel's task list give the same (pid, ppid, comm, start_time, task
address, uid): `list_processes(gc, details=False)` reads raw bytes through the kernel
layer at task_struct offsets taken once from the ISF (the per-cycle path, a few ms), and
`details=True` (or `fast=False`) uses volatility3 objects, which also give argv and exe and
are the reference the raw walk is tested against.

Guest structures are hostile: the task list walk is bounded in count, strings in length,
every pointer is checked before it is followed, a list that loops back on itself ends the
walk, and a task whose fields cannot be read yields what could be read (and `None` for the
rest) instead of stopping the walk.
"""

from __future__ import annotations

import itertools
import struct
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sva.engine.facts import ProcessInfo
from sva.errors import SvaError, SymbolsError
from sva.guest.context import KERNEL_LAYER, GuestContext

MAX_TASKS = 65536
MAX_ARGV_BYTES = 4096
MAX_MODULES = 4096
ADDRESS_MASK = (1 << 48) - 1  # what volatility3's Intel layer and its pointers use
KERNEL_HALF = 0xFFFF800000000000 & ADDRESS_MASK
COMM_LEN = 16
RAW_WALK_SECONDS = 10.0  # a walk that takes longer is being led in circles: what it has is returned


def canonical(address: int) -> int:
    """volatility3 keeps 48-bit addresses; show kernel ones as the CPU does (sign-extended)."""
    return address | 0xFFFF000000000000 if address & (1 << 47) else address


def _string(obj: object, length: int) -> str:
    return str(obj.cast("string", max_length=length, errors="replace"))  # type: ignore[attr-defined]


def _argv(gc: GuestContext, task: object) -> tuple[str, ...]:
    """argv from the process's own memory (mm->arg_start..arg_end), bounded."""
    try:
        mm = task.mm  # type: ignore[attr-defined]
        if not mm:
            return ()
        start, end = int(mm.arg_start), int(mm.arg_end)
        if not 0 < end - start:
            return ()
        layer_name = task.add_process_layer()  # type: ignore[attr-defined]
        if layer_name is None:
            return ()
        size = min(end - start, MAX_ARGV_BYTES)
        data = gc.context.layers[layer_name].read(start, size, pad=True)
    except Exception:  # noqa: BLE001 - any unreadable field of a hostile task
        return ()
    parts = data.rstrip(b"\0").split(b"\0")
    return tuple(p.decode("utf-8", "replace") for p in parts)


def _exe(gc: GuestContext, task: object) -> tuple[str | None, bool]:
    """The mapped executable's path and whether it was deleted."""
    from volatility3.framework.symbols.linux import LinuxUtilities

    try:
        mm = task.mm  # type: ignore[attr-defined]
        if not mm or not mm.exe_file:
            return None, False
        exe_file = mm.exe_file.dereference()
        path = LinuxUtilities.path_for_file(gc.context, task, exe_file)
        dentry = exe_file.f_path.dentry.dereference()
        # An unlinked file's dentry is unhashed (d_hash.pprev is NULL).
        deleted = not int(dentry.d_hash.pprev) and path not in ("/", "")
    except Exception:  # noqa: BLE001
        return None, False
    return (path or None), bool(deleted)


def _uid(task: object) -> int | None:
    try:
        uid = task.cred.dereference().uid  # type: ignore[attr-defined]
        # volatility3's cred extension already unwraps kuid_t on some versions.
        return int(uid if isinstance(uid, int) else uid.val)
    except Exception:  # noqa: BLE001
        return None


# -- raw task walk ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskLayout:
    """Where the raw walk finds things: task_struct member offsets and the sizes volatility3's
    task validity check reads, from the ISF, plus init_task's address for this boot."""

    init_task: int  # 48-bit virtual address, KASLR slide applied
    task_size: int
    tasks: int
    pid: int
    tgid: int
    exit_state: int
    comm: int
    real_parent: int
    start_time: int
    cred: int
    signal: int
    nsproxy: int
    mm: int
    active_mm: int
    cred_uid: int  # cred.uid.val
    signal_size: int
    nsproxy_size: int
    mm_size: int

    @classmethod
    def from_isf(cls, isf: dict[str, Any], slide: int, source: str = "symbol table") -> TaskLayout:
        types = isf.get("user_types", {})

        def size(type_name: str) -> int:
            try:
                return int(types[type_name]["size"])
            except (KeyError, TypeError, ValueError):
                raise SymbolsError(source, f"symbol table has no size for struct {type_name}") from None

        def member(type_name: str, name: str) -> int:
            found = _member_offset(types, type_name, name, 0)
            if found is None:
                raise SymbolsError(source, f"symbol table has no {type_name}.{name}")
            return found

        try:
            init_task = int(isf["symbols"]["init_task"]["address"])
        except (KeyError, TypeError, ValueError):
            raise SymbolsError(source, "symbol table has no address for init_task") from None
        ts = "task_struct"
        return cls(
            init_task=(init_task + slide) & ADDRESS_MASK,
            task_size=size(ts),
            tasks=member(ts, "tasks"),
            pid=member(ts, "pid"),
            tgid=member(ts, "tgid"),
            exit_state=member(ts, "exit_state"),
            comm=member(ts, "comm"),
            real_parent=member(ts, "real_parent"),
            start_time=member(ts, "start_time"),
            cred=member(ts, "cred"),
            signal=member(ts, "signal"),
            nsproxy=member(ts, "nsproxy"),
            mm=member(ts, "mm"),
            active_mm=member(ts, "active_mm"),
            cred_uid=member("cred", "uid") + member("kuid_t", "val"),
            signal_size=size("signal_struct"),
            nsproxy_size=size("nsproxy"),
            mm_size=size("mm_struct"),
        )


def _member_offset(types: dict[str, Any], type_name: str, name: str, depth: int) -> int | None:
    """A member's offset, looking into anonymous struct/union members as C does."""
    if depth > 8:
        return None
    fields = types.get(type_name, {}).get("fields", {})
    if name in fields:
        return int(fields[name]["offset"])
    for f in fields.values():
        if f.get("anonymous") and f.get("type", {}).get("kind") in ("struct", "union"):
            inner = _member_offset(types, f["type"]["name"], name, depth + 1)
            if inner is not None:
                return int(f["offset"]) + inner
    return None


# One layout per context (a context is one boot of one kernel), dropped with the context.
_LAYOUTS: weakref.WeakKeyDictionary[GuestContext, TaskLayout] = weakref.WeakKeyDictionary()


def task_layout(gc: GuestContext) -> TaskLayout:
    """The context's TaskLayout, computed on first use (offsets don't change within a boot)."""
    layout = _LAYOUTS.get(gc)
    if layout is None:
        source = str(gc.symbol_table.path) if gc.symbol_table else "symbol table"
        layout = _LAYOUTS[gc] = TaskLayout.from_isf(gc.isf, gc.placement.virtual_slide, source)
    return layout


class RawTask:
    """Fields of one task_struct, read in a single span."""

    __slots__ = ("address", "base", "data")

    def __init__(self, address: int, data: bytes, base: int) -> None:
        self.address, self.data, self.base = address, data, base

    def i32(self, off: int) -> int:
        return struct.unpack_from("<i", self.data, off - self.base)[0]

    def u64(self, off: int) -> int:
        return struct.unpack_from("<Q", self.data, off - self.base)[0]

    def comm(self, lay: TaskLayout) -> str:
        at = lay.comm - self.base
        return self.data[at : at + COMM_LEN].split(b"\0", 1)[0].decode("utf-8", "replace")


def raw_task_list(gc: GuestContext) -> list[RawTask]:
    """The tasks on the kernel's task list, raw (the fields TaskLayout names), in list order;
    the tasks volatility3's pslist would give, a few times faster."""
    from volatility3.framework import exceptions

    lay = task_layout(gc)
    layer = gc.context.layers[KERNEL_LAYER]
    invalid = exceptions.InvalidAddressException

    def pointer(address: int) -> int | None:
        """A kernel pointer read at `address`, masked as volatility3 does, or None."""
        try:
            value = struct.unpack("<Q", layer.read(address, 8))[0] & ADDRESS_MASK
        except invalid:
            return None
        return value if value >= KERNEL_HALF else None

    def readable(ptr: int, size: int) -> bool:
        return ptr >= KERNEL_HALF and layer.is_valid(ptr, size)

    # One read covers every task_struct member we use.
    lo, hi = raw_span(lay)

    def read_task(task: int) -> RawTask | None:
        """The task's fields, if volatility3 would count it as a valid task too."""
        if not layer.is_valid(task, lay.task_size):
            return None
        try:
            raw = RawTask(task, layer.read(task + lo, hi - lo), lo)
        except invalid:
            return None
        return raw if _valid_task(raw, lay, readable) else None

    head = (lay.init_task + lay.tasks) & ADDRESS_MASK
    tasks: list[RawTask] = []
    yielded: set[int] = set()
    # Like volatility3's pslist: the `next` chain, then the `prev` chain for anything a
    # broken or tampered `next` chain hid; each stops at a node it has already visited.
    deadline = time.monotonic() + RAW_WALK_SECONDS
    for link_off in (0, 8):
        seen = {head}
        link = pointer(head + link_off)
        for _ in range(MAX_TASKS):
            if link is None or link in seen or time.monotonic() > deadline:
                break
            seen.add(link)
            task = (link - lay.tasks) & ADDRESS_MASK
            if not layer.is_valid(task):
                break  # as volatility3's list_head.to_list: an unmapped task ends this direction
            if task not in yielded:
                yielded.add(task)
                raw = read_task(task)
                if raw is not None:
                    tasks.append(raw)
            link = pointer(link + link_off)
    return tasks


def raw_span(lay: TaskLayout) -> tuple[int, int]:
    """The span of task_struct that RawTask reads: (first offset, end offset)."""
    offsets = (lay.pid, lay.tgid, lay.exit_state, lay.comm, lay.real_parent, lay.start_time, lay.cred,
               lay.signal, lay.nsproxy, lay.mm, lay.active_mm)  # fmt: skip
    return min(offsets), max(offsets) + COMM_LEN


def _walk_raw(gc: GuestContext) -> list[ProcessInfo]:
    from volatility3.framework import exceptions

    lay = task_layout(gc)
    layer = gc.context.layers[KERNEL_LAYER]
    invalid = exceptions.InvalidAddressException
    tasks = raw_task_list(gc)
    by_address = {t.address: t for t in tasks}
    out: list[ProcessInfo] = []
    for t in tasks:
        pid = t.i32(lay.pid)
        comm = t.comm(lay)
        parent = t.u64(lay.real_parent) & ADDRESS_MASK
        ppid: int = -1
        if parent in by_address:
            ppid = by_address[parent].i32(lay.tgid)
        else:
            try:
                ppid = struct.unpack("<i", layer.read(parent + lay.tgid, 4))[0]
            except invalid:
                pass
        uid: int | None = None
        cred = t.u64(lay.cred) & ADDRESS_MASK
        if cred >= KERNEL_HALF:
            try:
                uid = struct.unpack("<I", layer.read(cred + lay.cred_uid, 4))[0]
            except invalid:
                pass
        out.append(ProcessInfo(pid=pid, ppid=ppid, comm=comm, uid=uid, start_time=t.u64(lay.start_time),
                               task_address=canonical(t.address)))  # fmt: skip
    return out


def _valid_task(t: RawTask, lay: TaskLayout, readable: Any) -> bool:
    """volatility3's task_struct.is_valid, on the raw bytes (so both walks keep the same tasks)."""
    if t.i32(lay.pid) < 0 or t.i32(lay.tgid) < 0:
        return False
    for off, size in ((lay.signal, lay.signal_size), (lay.nsproxy, lay.nsproxy_size),
                      (lay.real_parent, lay.task_size)):  # fmt: skip
        ptr = t.u64(off) & ADDRESS_MASK
        if not ptr or not readable(ptr, size):
            return False
    mm, active_mm = t.u64(lay.mm) & ADDRESS_MASK, t.u64(lay.active_mm) & ADDRESS_MASK
    if active_mm and not readable(active_mm, lay.mm_size):
        return False
    return not mm or (readable(mm, lay.mm_size) and mm == active_mm)


# -- volatility3 objects ---------------------------------------------------------------------


def list_processes(gc: GuestContext, details: bool = True, fast: bool = True) -> tuple[ProcessInfo, ...]:
    """Every task on the kernel's task list (thread-group leaders), sorted by pid.

    The raw walk answers, and with `details` volatility3 objects add argv and exe (path
    walks that are not worth redoing raw); with `fast` False volatility3 objects answer
    everything (the reference the raw walk is tested against).
    """
    if fast and not details:
        return tuple(sorted(_walk_raw(gc), key=lambda p: p.pid))
    if fast:
        return tuple(sorted(_with_details(gc, _walk_raw(gc)), key=lambda p: p.pid))
    from volatility3.plugins.linux import pslist

    out: list[ProcessInfo] = []
    tasks = pslist.PsList.list_tasks(gc.context, gc.module.name)
    for task in itertools.islice(tasks, MAX_TASKS):
        try:
            pid = int(task.pid)
            comm = _string(task.comm, 16)
        except Exception:  # noqa: BLE001 - a task we cannot even name is skipped
            continue
        try:
            ppid = int(task.real_parent.tgid) if task.real_parent else 0
        except Exception:  # noqa: BLE001
            ppid = -1
        try:
            start = int(task.start_time)
        except Exception:  # noqa: BLE001
            start = None
        argv: tuple[str, ...] = ()
        exe, deleted = None, False
        if details:
            argv = _argv(gc, task)
            exe, deleted = _exe(gc, task)
        out.append(
            ProcessInfo(
                pid=pid,
                ppid=ppid,
                comm=comm,
                argv=argv,
                uid=_uid(task),
                exe=exe,
                exe_deleted=deleted,
                start_time=start,
                task_address=canonical(int(task.vol.offset)),
            )
        )
    return tuple(sorted(out, key=lambda p: p.pid))


def _with_details(gc: GuestContext, procs: Iterable[ProcessInfo]) -> Iterable[ProcessInfo]:
    """`procs` with argv and exe read through volatility3 objects."""
    import dataclasses

    for p in procs:
        if p.task_address is None:
            yield p
            continue
        task = gc.module.object("task_struct", offset=p.task_address & ADDRESS_MASK, absolute=True)
        exe, deleted = _exe(gc, task)
        yield dataclasses.replace(p, argv=_argv(gc, task), exe=exe, exe_deleted=deleted)


@dataclass(frozen=True)
class KernelModule:
    name: str
    address: int
    size: int | None


def list_modules(gc: GuestContext) -> tuple[KernelModule, ...]:
    """Modules on the kernel's module list."""
    from volatility3.framework.symbols.linux.utilities.modules import Modules

    out: list[KernelModule] = []
    for mod in itertools.islice(Modules.list_modules(gc.context, gc.module.name), MAX_MODULES):
        try:
            name = mod.get_name() or "?"
        except Exception:  # noqa: BLE001
            name = "?"
        try:
            size: int | None = int(mod.get_core_size())
        except Exception:  # noqa: BLE001
            size = None
        out.append(KernelModule(str(name), canonical(int(mod.vol.offset)), size))
    return tuple(out)


def unavailable_reason(e: BaseException) -> str:
    return str(e) if isinstance(e, SvaError) else f"{type(e).__name__}: {e}"
