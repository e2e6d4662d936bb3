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
from sva.guest.context import GuestContext
from sva.guest.processes import RawTask, canonical
from sva.guest.vollayer import clear_translation_caches

MAX_VIEW_TASKS = 32768  # per view
MAX_XA_NODES = 1 << 16  # PID xarray nodes walked (64 slots each: far more than MAX_VIEW_TASKS)
XA_MAX_DEPTH = 11  # 64-bit indexes, 6 bits a level
XA_SLOTS = 64
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


class _RawTasks:
    """Sightings from raw task_struct bytes (the offsets of sva.guest.processes.TaskLayout):
    one read per task instead of volatility3 objects, which cost ten times as much and
    all of it inside the freeze."""

    def __init__(self, gc: GuestContext) -> None:
        from sva.guest.processes import raw_span, task_layout

        self.lay = task_layout(gc)
        self.lo, self.hi = raw_span(self.lay)
        self.kernel = gc.context.layers[gc.module.layer_name]
        self.memory = gc.context.layers[self.kernel.dependencies[0]]
        self.group_leader = int(gc.module.get_type("task_struct").relative_child_offset("group_leader"))

    def at_virtual(self, address: int) -> RawTask | None:
        from sva.guest.processes import RawTask

        try:
            return RawTask(address, bytes(self.kernel.read(address + self.lo, self.hi - self.lo)), self.lo)
        except Exception:  # noqa: BLE001 - unmapped: not a task we can see
            return None

    def at_physical(self, phys: int) -> RawTask | None:
        from sva.guest.processes import RawTask

        try:
            return RawTask(phys, bytes(self.memory.read(phys + self.lo, self.hi - self.lo)), self.lo)
        except Exception:  # noqa: BLE001
            return None

    def leader(self, raw: RawTask) -> RawTask | None:
        """The thread-group leader of a task (itself for a leader)."""
        lay = self.lay
        if raw.i32(lay.pid) == raw.i32(lay.tgid):
            return raw
        try:
            (leader,) = struct.unpack("<Q", self.kernel.read(raw.address + self.group_leader, 8))
        except Exception:  # noqa: BLE001
            return None
        return self.at_virtual(leader & ADDR48) if leader >= 0xFFFF800000000000 else None

    def sighting(self, raw: RawTask | None, phys: int | None = None, virt: int | None = None) -> TaskSighting | None:
        """The sighting of a leader task, or None for threads, pid 0 and unreadable tasks.
        `raw.address` is virtual unless `phys` is given (then `virt` may say where)."""
        if raw is None:
            return None
        lay = self.lay
        pid, tgid = raw.i32(lay.pid), raw.i32(lay.tgid)
        if pid <= 0 or pid != tgid:
            return None
        if phys is None:
            try:
                phys = int(self.kernel.translate(raw.address)[0])
            except Exception:  # noqa: BLE001
                return None
            virt = raw.address
        return TaskSighting(pid, raw.comm(lay) or "?", canonical(virt) if virt else 0, phys, raw.i32(lay.exit_state))


def _collect(
    name: str, ctx: FactContext, tasks: Iterable[Any], convert: Callable[[Any], TaskSighting | None]
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
    """The task list, by sva.guest.processes' raw walk (volatility3's pslist, faster)."""
    from sva.guest.processes import raw_task_list

    raw = _RawTasks(gc)
    return _collect("task_list", ctx, raw_task_list(gc), raw.sighting)


def _xarray_entries(read: Callable[[int, int], bytes], head: int, slots_off: int) -> Iterator[int]:
    """The pointers stored in an xarray (kernels >= 4.20) whose xa_head is `head`: leaf
    entries, depth first. Internal entries are tagged 0b10 (nodes are > 4096), value
    entries 0b1. Bounded by node count and depth; a node seen twice ends that branch."""
    seen: set[int] = set()
    stack: list[tuple[int, int]] = [(head, 0)]
    while stack:
        entry, depth = stack.pop()
        if not entry or entry & 1:
            continue  # empty or a value entry (not a pointer)
        if entry & 3 == 2:
            if entry <= 4096 or depth > XA_MAX_DEPTH:
                continue  # retry/sibling entries, or deeper than 64-bit indexes go
            node = (entry - 2) & ADDR48
            if node in seen or len(seen) >= MAX_XA_NODES:
                continue
            seen.add(node)
            slots = struct.unpack(f"<{XA_SLOTS}Q", read(node + slots_off, 8 * XA_SLOTS))
            stack.extend((e, depth + 1) for e in reversed(slots))
        else:
            yield entry & ADDR48


def _idr_tasks(gc: GuestContext, raw: _RawTasks) -> Iterator[RawTask | None]:
    """The tasks of init_pid_ns.idr's pids (linux.pidhashtable's walk, raw)."""
    vmlinux = gc.module
    kernel = raw.kernel

    def read(address: int, size: int) -> bytes:
        return bytes(kernel.read(address & ADDR48, size))

    def off(t: str, member: str) -> int:
        return int(vmlinux.get_type(t).relative_child_offset(member))

    pid_type = vmlinux.get_enumeration("pid_type").choices["PIDTYPE_PID"]
    task_type = vmlinux.get_type("task_struct")
    links_off = off("task_struct", "pid_links" if task_type.has_member("pid_links") else "pids")
    ns = (vmlinux.get_symbol("init_pid_ns").address + vmlinux.offset) & ADDR48
    if not vmlinux.has_type("xa_node"):  # a radix tree (< 4.20): volatility3 walks it
        obj = vmlinux.object("pid_namespace", offset=vmlinux.get_symbol("init_pid_ns").address)
        entries: Iterable[int] = obj.idr.get_entries()
    else:
        (head,) = struct.unpack("<Q", read(ns + off("pid_namespace", "idr") + off("idr", "idr_rt")
                                           + off("xarray", "xa_head"), 8))  # fmt: skip
        entries = _xarray_entries(read, head, off("xa_node", "slots"))
    first_at = off("pid", "tasks") + 8 * pid_type  # pid->tasks[PIDTYPE_PID].first
    for pid in itertools.islice(entries, MAX_VIEW_TASKS + 1):
        try:
            (first,) = struct.unpack("<Q", read(int(pid) + first_at, 8))
        except Exception:  # noqa: BLE001, S112 - a bad node is skipped, the walk goes on
            continue
        if first >= 0xFFFF800000000000:
            yield raw.at_virtual((first - links_off) & ADDR48)


def pid_idr_view(gc: GuestContext, ctx: FactContext) -> TaskView:
    vmlinux = gc.module
    if not (vmlinux.has_type("pid_namespace") and vmlinux.get_type("pid_namespace").has_member("idr")):
        return TaskView("pid_idr", (), "kernel has no PID IDR (< 4.15)")
    raw = _RawTasks(gc)
    return _collect("pid_idr", ctx, _idr_tasks(gc, raw), raw.sighting)


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
    raw = _RawTasks(gc)
    needles = _needles(gc)
    sched_off = gc.module.get_type("task_struct").relative_child_offset("sched_class")
    pob = _page_offset_base(gc)
    leads = set(seen) | set(scan.candidates if isinstance(scan, TaskScan) else ())

    def tasks() -> Iterator[RawTask]:
        for phys in sorted(leads):
            try:
                if bytes(raw.memory.read(phys + sched_off, 8)) not in needles:
                    continue
            except Exception:  # noqa: BLE001, S112 - outside RAM: not a task
                continue
            if (task := raw.at_physical(phys)) is not None:
                yield task

    def convert(task: RawTask) -> TaskSighting | None:
        phys = task.address
        s = raw.sighting(task, phys=phys, virt=(pob + phys) & ADDR48 if pob is not None else 0)
        if s is None or not 0 < s.pid < 1 << 22 or s.exit_state not in (0, 16, 32, 48):
            return None  # psscan's sanity checks: a plausible pid and exit_state
        return s

    view = _collect("memory_scan", ctx, tasks(), convert)
    if isinstance(scan, Unavailable):
        return TaskView("memory_scan", view.tasks, f"live sweep unavailable: {scan.reason}")
    return TaskView("memory_scan", view.tasks, "; ".join(filter(None, [view.truncated, scan.truncated])))


def run_queue_view(gc: GuestContext, ctx: FactContext) -> TaskView:
    """The run queues' tasks, each as its thread-group leader: the views compare leaders,
    and a hidden process's running thread need not be its leader."""
    from sva.guest.runqueue import run_queue_tasks

    found = run_queue_tasks(gc, ctx.time_left)
    raw = _RawTasks(gc)

    def leaders() -> Iterator[RawTask | None]:
        for address in found.tasks:
            task = raw.at_virtual(address)
            yield None if task is None else raw.leader(task)

    view = _collect("run_queue", ctx, leaders(), raw.sighting)
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
