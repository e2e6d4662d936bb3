"""Independent views of the guest's tasks, for cross-view (hidden process) detection.

A rootkit that hides a process unlinks it from one kernel structure, rarely from all:

- `task_list`:   the `init_task.tasks` list (what `ps` and volatility3's pslist walk);
- `pid_idr`:     the PID allocator of the initial namespace (`init_pid_ns.idr`, as
                 volatility3's linux.pidhashtable walks it on kernels >= 4.15);
- `memory_scan`: task_structs carved from physical RAM by their `sched_class` pointer
                 (volatility3's linux.psscan logic, with a faster needle search).

All three are taken inside the same freeze, so a task that exits meanwhile cannot make
the views disagree. Only thread-group leaders (pid == tgid) with pid > 0 are kept: the
task list links leaders only, the other views see threads too. Tasks are identified by
the guest-physical address of their task_struct (the scan only knows that one).

Guest memory is hostile: each walk is bounded in count (MAX_VIEW_TASKS) and watches the
cycle deadline; a view cut short says so (`truncated`) rather than pretend to be whole.
"""

from __future__ import annotations

import itertools
import struct
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sva.engine.facts import FactContext, FactProvider, Unavailable
from sva.guest.vollayer import clear_translation_caches
from sva.guest.context import GuestContext
from sva.guest.processes import canonical

MAX_VIEW_TASKS = 32768  # per view
SCAN_CHUNK = 16 << 20  # bytes of guest RAM searched at a time
MIN_SCAN_SECONDS = 2.0  # the scan is skipped (Unavailable) with less cycle time left
ADDR48 = (1 << 48) - 1

VIEW_NAMES = ("task_list", "pid_idr", "memory_scan")


@dataclass(frozen=True, slots=True)
class TaskSighting:
    """One task as one view saw it."""

    pid: int
    comm: str
    task_address: int  # kernel virtual address (canonical); 0 when unknown
    phys_address: int  # guest-physical address of the task_struct: the identity across views
    exit_state: int


@dataclass(frozen=True, slots=True)
class TaskView:
    """What one view saw; `truncated` says it stopped early (bound or deadline), with why."""

    name: str
    tasks: tuple[TaskSighting, ...]
    truncated: str = ""


@dataclass(frozen=True, slots=True)
class TaskViews:
    """The `task_views` fact: every view of the same frozen moment."""

    views: tuple[TaskView, ...]

    def view(self, name: str) -> TaskView | None:
        return next((v for v in self.views if v.name == name), None)


def _comm(task: Any) -> str:
    try:
        return str(task.comm.cast("string", max_length=16, errors="replace"))
    except Exception:  # noqa: BLE001 - a hostile task's name
        return "?"


def _sighting(gc: GuestContext, task: Any, phys: int | None = None, virt: int | None = None) -> TaskSighting | None:
    """The sighting of a leader task, or None for threads, pid 0 and unreadable tasks."""
    try:
        pid, tgid = int(task.pid), int(task.tgid)
        exit_state = int(task.exit_state)
    except Exception:  # noqa: BLE001
        return None
    if pid <= 0 or pid != tgid:
        return None
    if phys is None:
        try:
            phys = int(gc.context.layers[gc.module.layer_name].translate(int(task.vol.offset))[0])
        except Exception:  # noqa: BLE001
            return None
    if virt is None:
        virt = int(task.vol.offset)
    return TaskSighting(pid, _comm(task), canonical(virt) if virt else 0, phys, exit_state)


def _collect(
    name: str, gc: GuestContext, ctx: FactContext, tasks: Iterable[Any], convert: Callable[[Any], TaskSighting | None]
) -> TaskView:
    out: dict[int, TaskSighting] = {}
    truncated = ""
    for n, task in enumerate(tasks):
        if n >= MAX_VIEW_TASKS:
            truncated = f"stopped after {MAX_VIEW_TASKS} tasks"
            break
        if n % 64 == 0 and ctx.time_left() <= 0:
            truncated = "cycle deadline reached"
            break
        s = convert(task)
        if s is not None:
            out.setdefault(s.phys_address, s)
    return TaskView(name, tuple(sorted(out.values(), key=lambda s: (s.pid, s.phys_address))), truncated)


def task_list_view(gc: GuestContext, ctx: FactContext) -> TaskView:
    from volatility3.plugins.linux import pslist

    tasks = pslist.PsList.list_tasks(gc.context, gc.module.name)
    return _collect("task_list", gc, ctx, tasks, lambda t: _sighting(gc, t))


def _idr_tasks(gc: GuestContext) -> Iterator[Any]:
    """linux.pidhashtable's walk of init_pid_ns.idr (kernels >= 4.15), as a function."""
    vmlinux = gc.module
    pid_type = vmlinux.get_enumeration("pid_type").choices["PIDTYPE_PID"]
    task_type = vmlinux.get_type("task_struct")
    member = "pid_links" if task_type.has_member("pid_links") else "pids"
    links_off = task_type.relative_child_offset(member)
    ns = vmlinux.object("pid_namespace", offset=vmlinux.get_symbol("init_pid_ns").address)
    for node in itertools.islice(ns.idr.get_entries(), MAX_VIEW_TASKS + 1):
        try:
            pid = vmlinux.object("pid", offset=node, absolute=True)
            first = pid.tasks[pid_type].first
            if not (first and first.is_readable()):
                continue
            yield vmlinux.object("task_struct", offset=int(first) - links_off, absolute=True)
        except Exception:  # noqa: BLE001, S112 - a bad node is skipped, the walk goes on
            continue


def pid_idr_view(gc: GuestContext, ctx: FactContext) -> TaskView:
    vmlinux = gc.module
    if not (vmlinux.has_type("pid_namespace") and vmlinux.get_type("pid_namespace").has_member("idr")):
        return TaskView("pid_idr", (), "kernel has no PID IDR (< 4.15)")
    return _collect("pid_idr", gc, ctx, _idr_tasks(gc), lambda t: _sighting(gc, t))


def _page_offset_base(gc: GuestContext) -> int | None:
    try:
        return int(gc.module.object_from_symbol("page_offset_base"))
    except Exception:  # noqa: BLE001
        return None


def _scan_hits(gc: GuestContext, ctx: FactContext, needles: list[bytes]) -> Iterator[int]:
    """Guest-physical addresses of 8-aligned occurrences of any needle (psscan's search,
    but a regex over large reads instead of volatility3's per-page scanner)."""
    memory = gc.context.layers[gc.context.layers[gc.module.layer_name].dependencies[0]]
    end = int(memory.maximum_address) + 1
    for base in range(0, end, SCAN_CHUNK):
        if ctx.time_left() <= 0:
            raise TimeoutError("cycle deadline reached during the task scan")
        data = memory.read(base, min(SCAN_CHUNK, end - base), pad=True)
        hits: list[int] = []
        for needle in needles:  # bytes.find is far faster than a regex alternation here
            at = data.find(needle)
            while at >= 0:
                if at % 8 == 0:
                    hits.append(at)
                at = data.find(needle, at + 1)
        for at in sorted(hits):
            yield base + at


_SCHED_CLASSES: weakref.WeakKeyDictionary[GuestContext, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _sched_class_symbols(gc: GuestContext) -> tuple[str, ...]:
    """The sched_class symbols (found once per symbol table: listing all symbols is slow)."""
    if gc not in _SCHED_CLASSES:
        _SCHED_CLASSES[gc] = tuple(s for s in gc.module.symbols if s.endswith("_sched_class"))
    return _SCHED_CLASSES[gc]


def memory_scan_view(gc: GuestContext, ctx: FactContext) -> TaskView:
    from volatility3.framework import constants

    if ctx.time_left() < MIN_SCAN_SECONDS:
        return TaskView("memory_scan", (), "too little cycle time left to scan")
    vmlinux = gc.module
    kernel = gc.context.layers[vmlinux.layer_name]
    sched_off = vmlinux.get_type("task_struct").relative_child_offset("sched_class")
    needles = [
        struct.pack("<Q", kernel.canonicalize(vmlinux.get_symbol(s).address + vmlinux.offset))
        for s in _sched_class_symbols(gc)
    ]
    if not needles:
        return TaskView("memory_scan", (), "no *_sched_class symbols")
    memory_name = kernel.dependencies[0]
    pob = _page_offset_base(gc)
    type_name = vmlinux.symbol_table_name + constants.BANG + "task_struct"

    def tasks() -> Iterator[tuple[Any, int]]:
        for hit in _scan_hits(gc, ctx, needles):
            phys = hit - sched_off
            task = gc.context.object(type_name, offset=phys, layer_name=memory_name, native_layer_name=vmlinux.layer_name)
            yield task, phys

    def convert(item: tuple[Any, int]) -> TaskSighting | None:
        task, phys = item
        s = _sighting(gc, task, phys=phys, virt=(pob + phys) & ADDR48 if pob is not None else 0)
        if s is None or not 0 < s.pid < 1 << 22 or s.exit_state not in (0, 16, 32, 48):
            return None  # psscan's sanity checks: a plausible pid and exit_state
        return s

    return _collect("memory_scan", gc, ctx, tasks(), convert)


def forget_cached_reads() -> None:
    """Drop volatility3's cached reads and translations before a view is taken (the
    same as the cycle start does; cheap, and the views must never see stale pointers)."""
    clear_translation_caches()


def task_views(gc: GuestContext, ctx: FactContext) -> TaskViews | Unavailable:
    """The three views; a view that fails is an empty, truncated view saying why."""
    forget_cached_reads()
    views = []
    for name, fn in (("task_list", task_list_view), ("pid_idr", pid_idr_view), ("memory_scan", memory_scan_view)):
        try:
            views.append(fn(gc, ctx))
        except Exception as e:  # noqa: BLE001 - one view's failure leaves the others
            views.append(TaskView(name, (), f"failed: {type(e).__name__}: {e}"))
    if all(v.truncated.startswith("failed") for v in views):
        return Unavailable("; ".join(f"{v.name}: {v.truncated}" for v in views))
    return TaskViews(tuple(views))


def view_providers(session: Any) -> list[FactProvider]:
    """`task_views` for a `GuestSession`."""
    return [session.provider("task_views", task_views)]
