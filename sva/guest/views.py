"""Independent views of the guest's tasks, for cross-view (hidden process) detection.

A rootkit that hides a process unlinks it from one kernel structure, rarely from all:

- `task_list`:   the `init_task.tasks` list (what `ps` and volatility3's pslist walk);
- `pid_idr`:     the PID allocator of the initial namespace (`init_pid_ns.idr`, as
                 volatility3's linux.pidhashtable walks it on kernels >= 4.15);
- `memory_scan`: task_structs carved from physical RAM by their `sched_class` pointer
                 (volatility3's linux.psscan logic, with a faster needle search);
- `run_queue`:   the tasks on each CPU's run queues (sva.guest.runqueue): only runnable
                 tasks, so it is a witness (`exhaustive` False), never proof of absence.

All of them are taken inside the same freeze, so a task that exits meanwhile cannot make
the views disagree. The memory scan's expensive part, the sweep of all RAM, runs before
the freeze with the guest running (the `task_scan` fact, see TaskScanner); inside the
freeze only its candidates and the tasks of the other views are re-read, which is
what the view reports. Only thread-group leaders (pid == tgid) with pid > 0 are kept: the
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
from sva.errors import ConfigError
from sva.guest.vollayer import clear_translation_caches
from sva.guest.context import GuestContext
from sva.guest.processes import canonical

MAX_VIEW_TASKS = 32768  # per view
SCAN_CHUNK = 16 << 20  # bytes of guest RAM searched at a time
MIN_SCAN_SECONDS = 2.0  # the scan is skipped (Unavailable) with less cycle time left
ADDR48 = (1 << 48) - 1

VIEW_NAMES = ("task_list", "pid_idr", "memory_scan", "run_queue")


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
    """What one view saw; `truncated` says it stopped early (bound or deadline), with why.
    `exhaustive` False: the view lists only some live tasks by design (the run queues
    hold runnable ones only), so a task missing from it proves nothing."""

    name: str
    tasks: tuple[TaskSighting, ...]
    truncated: str = ""
    exhaustive: bool = True

    @property
    def complete(self) -> bool:
        """Whether a task's absence from this view means something."""
        return self.exhaustive and not self.truncated


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


def _needles(gc: GuestContext) -> dict[bytes, str]:
    """The 8-byte values a task_struct's `sched_class` member can hold, and their names."""
    vmlinux = gc.module
    kernel = gc.context.layers[vmlinux.layer_name]
    return {
        struct.pack("<Q", kernel.canonicalize(vmlinux.get_symbol(s).address + vmlinux.offset)): s
        for s in _sched_class_symbols(gc)
    }


@dataclass(frozen=True, slots=True)
class TaskScan:
    """The `task_scan` fact: guest-physical addresses of task_struct candidates, swept
    from all of RAM with the guest running (a candidate has a `*_sched_class` pointer
    where task_struct.sched_class is). `cycle` is the cycle that swept; a later cycle may
    reuse a sweep (see `TaskScanner.every`). Candidates are only leads: the `memory_scan`
    view re-reads each one inside the freeze."""

    candidates: tuple[int, ...]
    cycle: int
    truncated: str = ""


def sweep_for_tasks(gc: GuestContext, ctx: FactContext) -> TaskScan:
    """Sweep RAM for task_struct candidates (psscan's search; done live, outside the freeze)."""
    if ctx.time_left() < MIN_SCAN_SECONDS:
        return TaskScan((), ctx.cycle, "too little cycle time left to scan")
    needles = list(_needles(gc))
    if not needles:
        return TaskScan((), ctx.cycle, "no *_sched_class symbols")
    sched_off = gc.module.get_type("task_struct").relative_child_offset("sched_class")
    found: list[int] = []
    truncated = ""
    try:
        for hit in _scan_hits(gc, ctx, needles):
            if len(found) >= MAX_VIEW_TASKS * 4:  # threads and stale copies count too
                truncated = f"stopped after {len(found)} candidates"
                break
            found.append(hit - sched_off)
    except TimeoutError as e:
        truncated = str(e)
    return TaskScan(tuple(found), ctx.cycle, truncated)


class TaskScanner:
    """The `task_scan` provider's state: sweeps every `every`-th cycle and hands out the
    last sweep in between.

    The trade-off of `every` > 1: the sweep costs a few hundred ms of CPU per 256 MiB of
    guest RAM each time (never pause time: it runs with the guest running). Between two
    sweeps the `memory_scan` view still re-reads, inside each freeze, every task the
    other views see and every earlier candidate, so it stays exact for those; only a
    task that appears at a new address *and* is hidden from every other view (task list,
    PID allocator, run queues) waits for the next sweep to be found.
    """

    def __init__(self, every: int = 1) -> None:
        if every < 1:
            raise ConfigError(f"task scan interval must be at least 1 cycle, not {every}")
        self.every = every
        self.last: TaskScan | None = None
        self._gc: GuestContext | None = None

    def compute(self, gc: GuestContext, ctx: FactContext) -> TaskScan:
        last = self.last
        if last is not None and self._gc is gc and 0 <= ctx.cycle - last.cycle < self.every and not last.truncated:
            return last
        self.last, self._gc = sweep_for_tasks(gc, ctx), gc
        return self.last


def memory_scan_view(
    gc: GuestContext, ctx: FactContext, scan: TaskScan | Unavailable, seen: Iterable[int] = ()
) -> TaskView:
    """The memory-scan view at the frozen moment: every candidate of the live sweep and
    every task struct the other views saw (`seen`, guest-physical), each re-read now and
    kept if its sched_class pointer and its pid and exit state still look like a task's."""
    from volatility3.framework import constants

    vmlinux = gc.module
    kernel = gc.context.layers[vmlinux.layer_name]
    memory_name = kernel.dependencies[0]
    memory = gc.context.layers[memory_name]
    needles = _needles(gc)
    sched_off = vmlinux.get_type("task_struct").relative_child_offset("sched_class")
    pob = _page_offset_base(gc)
    type_name = vmlinux.symbol_table_name + constants.BANG + "task_struct"
    leads = set(seen) | set(scan.candidates if isinstance(scan, TaskScan) else ())

    def tasks() -> Iterator[tuple[Any, int]]:
        for phys in sorted(leads):
            try:
                if bytes(memory.read(phys + sched_off, 8)) not in needles:
                    continue
            except Exception:  # noqa: BLE001, S112 - outside RAM: not a task
                continue
            task = gc.context.object(type_name, offset=phys, layer_name=memory_name, native_layer_name=vmlinux.layer_name)
            yield task, phys

    def convert(item: tuple[Any, int]) -> TaskSighting | None:
        task, phys = item
        s = _sighting(gc, task, phys=phys, virt=(pob + phys) & ADDR48 if pob is not None else 0)
        if s is None or not 0 < s.pid < 1 << 22 or s.exit_state not in (0, 16, 32, 48):
            return None  # psscan's sanity checks: a plausible pid and exit_state
        return s

    view = _collect("memory_scan", gc, ctx, tasks(), convert)
    if isinstance(scan, Unavailable):
        return TaskView("memory_scan", view.tasks, f"live sweep unavailable: {scan.reason}")
    return TaskView("memory_scan", view.tasks, "; ".join(filter(None, [view.truncated, scan.truncated])))


def _leader(gc: GuestContext, task_address: int) -> Any:
    """The thread-group leader of the task at `task_address`: the views compare leaders,
    and a hidden process's running thread need not be its leader."""
    task = gc.module.object("task_struct", offset=task_address, absolute=True)
    if int(task.pid) != int(task.tgid):
        task = task.group_leader.dereference()
    return task


def run_queue_view(gc: GuestContext, ctx: FactContext) -> TaskView:
    from sva.guest.runqueue import run_queue_tasks

    found = run_queue_tasks(gc, ctx.time_left)

    def leaders() -> Iterator[Any]:
        for address in found.tasks:
            try:
                yield _leader(gc, address)
            except Exception:  # noqa: BLE001, S112 - an unreadable entry is skipped
                continue

    view = _collect("run_queue", gc, ctx, leaders(), lambda t: _sighting(gc, t))
    truncated = "; ".join(filter(None, [view.truncated, *found.problems]))
    return TaskView("run_queue", view.tasks, truncated, exhaustive=False)


def forget_cached_reads() -> None:
    """Drop volatility3's cached reads and translations before a view is taken (the
    same as the cycle start does; cheap, and the views must never see stale pointers)."""
    clear_translation_caches()


def task_views(gc: GuestContext, ctx: FactContext) -> TaskViews | Unavailable:
    """Every view; a view that fails is an empty, truncated view saying why. The memory
    scan re-reads, inside the freeze, what the live sweep (the `task_scan` fact) and the
    other views found."""
    forget_cached_reads()
    views: dict[str, TaskView] = {}
    for name, fn in (("task_list", task_list_view), ("pid_idr", pid_idr_view), ("run_queue", run_queue_view)):
        try:
            views[name] = fn(gc, ctx)
        except Exception as e:  # noqa: BLE001 - one view's failure leaves the others
            views[name] = TaskView(name, (), f"failed: {type(e).__name__}: {e}")
    seen = {s.phys_address for v in views.values() for s in v.tasks}
    try:
        views["memory_scan"] = memory_scan_view(gc, ctx, ctx.fact("task_scan"), seen)
    except Exception as e:  # noqa: BLE001
        views["memory_scan"] = TaskView("memory_scan", (), f"failed: {type(e).__name__}: {e}")
    ordered = [views[n] for n in VIEW_NAMES]
    if all(v.truncated.startswith("failed") for v in ordered):
        return Unavailable("; ".join(f"{v.name}: {v.truncated}" for v in ordered))
    return TaskViews(tuple(ordered))


def view_providers(session: Any, scan_every: int = 1) -> list[FactProvider]:
    """`task_scan` (live, every `scan_every`-th cycle: see TaskScanner) and `task_views`
    (frozen) for a `GuestSession`."""
    scanner = TaskScanner(scan_every)
    return [
        session.provider("task_scan", scanner.compute, consistent=False),
        session.provider("task_views", task_views, requires=("task_scan",)),
    ]
