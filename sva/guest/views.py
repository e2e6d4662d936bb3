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
the freeze with the guest running, optionally a slice per cycle (the `task_scan` fact,
see TaskScanner); inside the freeze only its candidates and the tasks of the other
views are re-read, which is what the view reports. Only thread-group leaders (pid ==
tgid) with pid > 0 are kept: the task list links leaders only, the other views see
threads too. Tasks are identified by the guest-physical address of their task_struct
(the scan only knows that one).

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
MAX_SCAN_CANDIDATES = MAX_VIEW_TASKS * 4  # leads a sweep pass keeps: threads and stale copies count too
MIN_SCAN_SECONDS = 2.0  # a cycle's share of the scan is skipped (truncated) with less cycle time left
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


def _chunk_hits(memory: Any, base: int, size: int, needles: list[bytes]) -> list[int]:
    """Guest-physical addresses, ascending, of 8-aligned occurrences of any needle in
    [base, base + size) (psscan's search, but bytes.find over large reads instead of
    volatility3's per-page scanner). `base` is 8-aligned, so an aligned 8-byte needle
    never straddles two chunks."""
    data = memory.read(base, size, pad=True)
    hits: list[int] = []
    for needle in needles:  # bytes.find is far faster than a regex alternation here
        at = data.find(needle)
        while at >= 0:
            if at % 8 == 0:
                hits.append(base + at)
            at = data.find(needle, at + 1)
    return sorted(hits)


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
class SweepStep:
    """One cycle's share of an `IncrementalSweep`: the leads to hand out (the last
    complete pass's and the current pass's so far, ascending) and how far the pass got."""

    leads: tuple[int, ...]
    truncated: str  # why this cycle's share, or the pass the leads come from, was cut short
    swept: int  # bytes swept this cycle
    covered: int  # bytes of the current pass swept so far; of the whole pass when pass_complete
    area: int  # bytes of the whole area at this cycle
    pass_complete: bool  # this cycle finished a pass (its leads are exactly that pass's)
    passes: int  # passes finished since the sweep (re)started


class IncrementalSweep:
    """A sweep of an address range spread over `every` cycles.

    Each cycle sweeps the next 1/`every` of [lo, hi) (rounded up to a multiple of
    `align`, the alignment of what is looked for, so that no slice boundary cuts one)
    from a cursor, at most `chunk` bytes at a time on a fixed grid of absolute addresses,
    checking the deadline before each piece (a cycle cut short keeps its progress: the
    next one goes on from there). Leads found in the current pass accumulate; when the
    cursor reaches `hi` the pass is complete and its leads replace the previous pass's.
    Each cycle hands out the union of the last complete pass and the current one so far,
    so a lead is dropped only once a whole pass has gone by without it. With `every` = 1
    every cycle is one whole pass. `lo` and `hi` are read each cycle: a pass follows an
    area that grows (a part that appears below the cursor waits for the next pass).

    Guest memory is hostile: a pass holds at most `cap` leads (one that reaches it ends
    there, marked truncated), and the union handed out is capped too. `reset` (a new
    guest context: reattach, reboot) forgets the cursor and every lead.
    """

    def __init__(self, every: int, chunk: int, cap: int, what: str, align: int = 8) -> None:
        if every < 1:
            raise ConfigError(f"{what} interval must be at least 1 cycle, not {every}")
        if align < 1 or chunk <= 0 or chunk % align or cap < 1:
            raise ValueError(f"{what}: bad chunk ({chunk}), alignment ({align}) or cap ({cap})")
        self.every, self.chunk, self.cap, self.what, self.align = every, chunk, cap, what, align
        self.reset()

    def reset(self) -> None:
        self._cursor: int | None = None  # next address of the current pass; None: a pass starts next
        self._partial: dict[int, None] = {}  # the current pass's leads, in insertion order
        self._covered = 0
        self._last: tuple[int, ...] = ()  # the last complete pass's leads, ascending
        self._last_truncated = ""
        self.passes = 0

    def _share(self, lo: int, hi: int) -> int:
        """Bytes to sweep per cycle: a whole pass over `every` cycles, rounded up to `align`."""
        per = -(-max(hi - lo, 0) // self.every)
        return -(-per // self.align) * self.align

    def step(
        self,
        lo: int,
        hi: int,
        find: Callable[[int, int], Iterable[int]],
        time_left: Callable[[], float],
        skip: str = "",
    ) -> SweepStep:
        """Sweep this cycle's share of [lo, hi) with `find(start, end)` (the leads in that
        part); `skip` non-empty sweeps nothing this cycle and says why."""
        cursor = lo if self._cursor is None else max(self._cursor, lo)
        start, reason, capped = cursor, skip, False
        stop = min(hi, cursor + (0 if skip else self._share(lo, hi)))
        while cursor < stop and not reason:
            if time_left() <= 0:
                reason = f"cycle deadline reached during the {self.what} at 0x{cursor:x}"
                break
            end = min((cursor // self.chunk + 1) * self.chunk, stop)
            for lead in find(cursor, end):
                if len(self._partial) >= self.cap:
                    reason, capped = f"stopped after {self.cap} {self.what} leads", True
                    break
                self._partial[lead] = None
            cursor = end
        swept = cursor - start
        self._covered += swept
        if cursor >= hi or capped:  # the pass is over (a capped one is cut short)
            return self._finish_pass(swept, max(hi - lo, 0), reason, capped)
        self._cursor = cursor
        return self._union(swept, max(hi - lo, 0), reason)

    def _finish_pass(self, swept: int, area: int, reason: str, capped: bool) -> SweepStep:
        covered = self._covered
        self._last = tuple(sorted(self._partial))
        self._last_truncated = reason if capped else ""
        self._cursor, self._partial, self._covered = None, {}, 0
        self.passes += 1
        return SweepStep(self._last, reason, swept, covered, area, True, self.passes)

    def _union(self, swept: int, area: int, reason: str) -> SweepStep:
        union = sorted(set(self._last).union(self._partial))
        problems = [reason, f"last pass: {self._last_truncated}" if self._last_truncated else ""]
        if len(union) > self.cap:
            keep = set(self._partial)  # the current pass's leads first: they are the newest
            keep.update(itertools.islice((a for a in self._last if a not in keep), max(self.cap - len(keep), 0)))
            problems.append(f"{len(union) - len(keep)} leads of the last pass dropped (cap {self.cap})")
            union = sorted(keep)
        truncated = "; ".join(filter(None, problems))
        return SweepStep(tuple(union), truncated, swept, self._covered, area, False, self.passes)


@dataclass(frozen=True, slots=True)
class TaskScan:
    """The `task_scan` fact: guest-physical addresses of task_struct candidates swept from
    RAM with the guest running (a candidate has a `*_sched_class` pointer where
    task_struct.sched_class is). `cycle` is the cycle that handed it out. With
    `TaskScanner.every` > 1 a cycle sweeps only part of RAM (`swept` bytes; `covered` of
    `area` bytes of the current pass so far, `pass_complete` when this cycle finished
    one) and the candidates are those of the last complete pass plus the current one's so
    far. Candidates are only leads: the `memory_scan` view re-reads each one inside the
    freeze."""

    candidates: tuple[int, ...]
    cycle: int
    truncated: str = ""
    swept: int = 0
    covered: int = 0
    area: int = 0
    pass_complete: bool = True
    passes: int = 0


def _task_scan_step(sweep: IncrementalSweep, gc: GuestContext, ctx: FactContext) -> TaskScan:
    """This cycle's share of the RAM sweep for task_struct candidates (psscan's search;
    done live, outside the freeze)."""
    memory = gc.context.layers[gc.context.layers[gc.module.layer_name].dependencies[0]]
    needles = list(_needles(gc))
    sched_off = int(gc.module.get_type("task_struct").relative_child_offset("sched_class"))
    skip = "no *_sched_class symbols" if not needles else ""
    if not skip and ctx.time_left() < MIN_SCAN_SECONDS:
        skip = "too little cycle time left to scan"

    def find(start: int, end: int) -> list[int]:
        return [hit - sched_off for hit in _chunk_hits(memory, start, end - start, needles)]

    step = sweep.step(0, int(memory.maximum_address) + 1, find, ctx.time_left, skip)
    return TaskScan(
        step.leads, ctx.cycle, step.truncated, step.swept, step.covered, step.area, step.pass_complete, step.passes
    )


def sweep_for_tasks(gc: GuestContext, ctx: FactContext) -> TaskScan:
    """One whole sweep of RAM for task_struct candidates, now."""
    return _task_scan_step(IncrementalSweep(1, SCAN_CHUNK, MAX_SCAN_CANDIDATES, "task scan"), gc, ctx)


class TaskScanner:
    """The `task_scan` provider's state: a full sweep of RAM spread over `every` cycles.

    Each cycle sweeps the next 1/`every` of RAM (slices and reads start 8-aligned, so an
    8-aligned needle never straddles two) from where the last cycle stopped, and hands out the
    candidates of the last complete pass plus those of the current pass so far; with
    `every` = 1 each cycle is one whole sweep. A new guest context (reattach, reboot)
    starts a new pass with no candidates.

    The trade-off of `every` > 1: a whole sweep costs a few hundred ms of CPU per 256 MiB
    of guest RAM (never pause time: it runs with the guest running); spread out, each
    cycle pays 1/`every` of it, so no cycle is much longer than the others. The
    `memory_scan` view still re-reads, inside each freeze, every task the other views
    see and every candidate handed out, so it stays exact for those; only a task that
    appears at a new address *and* is hidden from every other view (task list, PID
    allocator, run queues) is found once the sweep has passed its address: within one
    pass, `every` cycles.
    """

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.sweep = IncrementalSweep(every, SCAN_CHUNK, MAX_SCAN_CANDIDATES, "task scan")
        self.last: TaskScan | None = None
        self._gc: GuestContext | None = None

    def compute(self, gc: GuestContext, ctx: FactContext) -> TaskScan:
        last = self.last
        if self._gc is not gc:
            self.sweep.reset()
        elif last is not None and last.cycle == ctx.cycle and not last.truncated:
            return last  # asked twice in one cycle
        self.last, self._gc = _task_scan_step(self.sweep, gc, ctx), gc
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
    """`task_scan` (live, a full sweep spread over `scan_every` cycles: see TaskScanner)
    and `task_views` (frozen) for a `GuestSession`."""
    scanner = TaskScanner(scan_every)
    return [
        session.provider("task_scan", scanner.compute, consistent=False),
        session.provider("task_views", task_views, requires=("task_scan",)),
    ]
