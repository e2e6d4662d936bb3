"""The tasks on each CPU's run queues: the scheduler's own view of what is runnable.

A rootkit that unlinks a task from the task list (and even from the PID allocator) must
leave it on a run queue, or the task never runs again. So every task the scheduler can
pick is a witness: the current task of each CPU (`rq->curr`), the CFS red-black tree
(`rq->cfs.tasks_timeline`, whose nodes are `sched_entity.run_node`; with group
scheduling a node may be a group whose own `cfs_rq` (`my_q`) holds more entities), the
real-time priority lists (`rq->rt.active.queue[]` of `sched_rt_entity.run_list`) and
the deadline tree (`rq->dl.root` of `sched_dl_entity.rb_node`). `cfs_rq->curr` is
followed too: CFS takes the running entity out of its tree, and between picking a task
and setting `rq->curr` the kernel holds it only there.

The run queues are per-CPU (`runqueues` + `__per_cpu_offset[cpu]` for each online CPU).
Sleeping tasks are on no run queue, so this view can only testify that a task exists,
never that one is missing.

Guest memory is hostile: the CPU count and every walk are bounded (MAX_CPUS,
MAX_NODES per CPU, MAX_GROUP_DEPTH), visited nodes are remembered so a cycle ends the
walk, every pointer must be a canonical kernel address that reads, and each `rq` must
name its own CPU (`rq->cpu`), or that CPU is reported rather than trusted.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sva.guest.context import GuestContext

ADDR48 = (1 << 48) - 1
KERNEL_HALF = 0xFFFF800000000000
MAX_CPUS = 8192  # the kernel's own NR_CPUS limit on x86-64
MAX_NODES = 4096  # queue entries walked per CPU, all queues together
MAX_GROUP_DEPTH = 16  # nesting of CFS task groups followed
RT_PRIOS = 100  # MAX_RT_PRIO: one list per real-time priority


class WalkStopped(Exception):
    """A bound or a bad pointer ended one CPU's walk (the message says which)."""


@dataclass(frozen=True, slots=True)
class _Layout:
    """Offsets of the scheduler structures, from the symbol table."""

    runqueues: int  # per-CPU offset of `runqueues` (per-CPU symbols are not relocated)
    rq_cpu: int
    rq_curr: int
    rq_cfs: int
    rq_rt: int | None
    rq_dl: int | None
    cfs_timeline: int  # cfs_rq.tasks_timeline (its rb_root is at offset 0)
    cfs_curr: int
    se_run_node: int
    se_my_q: int | None  # None without CONFIG_FAIR_GROUP_SCHED
    rb_left: int
    rb_right: int
    task_se: int
    rt_queue: int | None  # rt_rq.active.queue
    rt_run_list: int | None
    task_rt: int | None
    dl_root: int | None  # dl_rq.root
    dl_rb_node: int | None
    task_dl: int | None


def _layout(gc: GuestContext) -> _Layout:
    m = gc.module

    def off(type_name: str, member: str) -> int:
        return int(m.get_type(type_name).relative_child_offset(member))

    def maybe(type_name: str, member: str) -> int | None:
        if not m.has_type(type_name) or not m.get_type(type_name).has_member(member):
            return None
        return off(type_name, member)

    rt_queue = None
    if (rt_active := maybe("rt_rq", "active")) is not None and (q := maybe("rt_prio_array", "queue")) is not None:
        rt_queue = rt_active + q
    return _Layout(
        runqueues=int(m.get_symbol("runqueues").address), rq_cpu=off("rq", "cpu"), rq_curr=off("rq", "curr"),
        rq_cfs=off("rq", "cfs"), rq_rt=maybe("rq", "rt"), rq_dl=maybe("rq", "dl"),
        cfs_timeline=off("cfs_rq", "tasks_timeline"), cfs_curr=off("cfs_rq", "curr"),
        se_run_node=off("sched_entity", "run_node"), se_my_q=maybe("sched_entity", "my_q"),
        rb_left=off("rb_node", "rb_left"), rb_right=off("rb_node", "rb_right"), task_se=off("task_struct", "se"),
        rt_queue=rt_queue, rt_run_list=maybe("sched_rt_entity", "run_list"), task_rt=maybe("task_struct", "rt"),
        dl_root=maybe("dl_rq", "root"), dl_rb_node=maybe("sched_dl_entity", "rb_node"),
        task_dl=maybe("task_struct", "dl"),
    )  # fmt: skip


@dataclass
class RunQueueTasks:
    """What the walk found: task_struct addresses (kernel virtual, 48-bit) with the queue
    that held each, and the CPUs whose walk stopped early, with why."""

    tasks: dict[int, str] = field(default_factory=dict)  # task address -> "cpu0:cfs" …
    cpus: tuple[int, ...] = ()
    problems: list[str] = field(default_factory=list)


class _CpuWalk:
    """One CPU's queues, with one node budget and one visited set."""

    def __init__(self, read: Callable[[int, int], bytes], lay: _Layout, cpu: int, out: RunQueueTasks) -> None:
        self.read, self.lay, self.cpu, self.out = read, lay, cpu, out
        self.budget = MAX_NODES
        self.visited: set[int] = set()

    def ptr(self, address: int, what: str) -> int:
        """The kernel pointer stored at `address`; 0 for NULL; WalkStopped for garbage."""
        (value,) = struct.unpack("<Q", self.read(address, 8))
        if value and value < KERNEL_HALF:
            raise WalkStopped(f"{what} at 0x{address:x} holds 0x{value:x}, not a kernel address")
        return value & ADDR48

    def visit(self, node: int, what: str) -> bool:
        """Count a node; False if it was seen already (a cycle or a shared node)."""
        if node in self.visited:
            return False
        self.budget -= 1
        if self.budget < 0:
            raise WalkStopped(f"more than {MAX_NODES} run-queue entries")
        self.visited.add(node)
        return True

    def task(self, address: int, queue: str) -> None:
        self.out.tasks.setdefault(address, f"cpu{self.cpu}:{queue}")

    # -- the queues --------------------------------------------------------------------
    def rq(self, rq: int) -> None:
        lay = self.lay
        (cpu,) = struct.unpack("<I", self.read(rq + lay.rq_cpu, 4))
        if cpu != self.cpu:
            raise WalkStopped(f"the rq at 0x{rq:x} says it is CPU {cpu}'s")
        if curr := self.ptr(rq + lay.rq_curr, "rq->curr"):
            self.task(curr, "curr")
        self.cfs(rq + lay.rq_cfs, 0)
        if lay.rq_rt is not None:
            self.rt(rq + lay.rq_rt)
        if lay.rq_dl is not None:
            self.dl(rq + lay.rq_dl)

    def entity(self, se: int, depth: int) -> None:
        """A CFS entity: a task, or (group scheduling) a group with its own cfs_rq."""
        lay = self.lay
        my_q = self.ptr(se + lay.se_my_q, "sched_entity.my_q") if lay.se_my_q is not None else 0
        if my_q:
            if depth >= MAX_GROUP_DEPTH:
                raise WalkStopped(f"task groups nested deeper than {MAX_GROUP_DEPTH}")
            self.cfs(my_q, depth + 1)
        else:
            self.task(se - lay.task_se, "cfs")

    def cfs(self, cfs_rq: int, depth: int) -> None:
        lay = self.lay
        if not self.visit(cfs_rq, "cfs_rq"):
            return
        if curr := self.ptr(cfs_rq + lay.cfs_curr, "cfs_rq->curr"):
            self.entity(curr, depth)
        for node in self.rb_nodes(cfs_rq + lay.cfs_timeline):
            self.entity(node - lay.se_run_node, depth)

    def rb_nodes(self, root: int) -> list[int]:
        """The nodes of the red-black tree rooted at `root` (an rb_root), iteratively."""
        out: list[int] = []
        stack = [self.ptr(root, "rb_root.rb_node")]
        while stack:
            node = stack.pop()
            if not node or not self.visit(node, "rb_node"):
                continue
            out.append(node)
            stack.append(self.ptr(node + self.lay.rb_left, "rb_node.rb_left"))
            stack.append(self.ptr(node + self.lay.rb_right, "rb_node.rb_right"))
        return out

    def rt(self, rt_rq: int) -> None:
        lay = self.lay
        if lay.rt_queue is None or lay.rt_run_list is None or lay.task_rt is None:
            return
        heads = rt_rq + lay.rt_queue
        raw = self.read(heads, 16 * RT_PRIOS)
        for prio in range(RT_PRIOS):
            head = heads + 16 * prio
            node = struct.unpack_from("<Q", raw, 16 * prio)[0] & ADDR48
            while node and node != head:
                if not self.visit(node, "rt list"):
                    break  # a cycle that does not come back to the head
                self.task(node - lay.rt_run_list - lay.task_rt, "rt")
                node = self.ptr(node, "list_head.next")

    def dl(self, dl_rq: int) -> None:
        lay = self.lay
        if lay.dl_root is None or lay.dl_rb_node is None or lay.task_dl is None:
            return
        for node in self.rb_nodes(dl_rq + lay.dl_root):
            self.task(node - lay.dl_rb_node - lay.task_dl, "dl")


def _online_cpus(gc: GuestContext, read: Callable[[int, int], bytes]) -> list[int]:
    m = gc.module

    def va(name: str) -> int:
        return (m.get_symbol(name).address + m.offset) & ADDR48

    (nr,) = struct.unpack("<I", read(va("nr_cpu_ids"), 4))
    if not 0 < nr <= MAX_CPUS:
        raise WalkStopped(f"nr_cpu_ids is {nr}")
    words = (nr + 63) // 64
    mask = struct.unpack(f"<{words}Q", read(va("__cpu_online_mask"), 8 * words))
    return [c for c in range(nr) if mask[c // 64] >> (c % 64) & 1]


def run_queue_tasks(gc: GuestContext, time_left: Callable[[], float] = lambda: 1.0) -> RunQueueTasks:
    """Every task on the run queues of every online CPU (see the module docstring).

    A CPU whose walk stops early (bound, bad pointer, unreadable memory, deadline) adds a
    line to `problems`; what it found before stopping is kept."""
    kernel = gc.context.layers[gc.module.layer_name]

    def read(address: int, size: int) -> bytes:
        return bytes(kernel.read(address & ADDR48, size))

    lay = _layout(gc)
    out = RunQueueTasks()
    cpus = _online_cpus(gc, read)
    out.cpus = tuple(cpus)
    offsets_at = (gc.module.get_symbol("__per_cpu_offset").address + gc.module.offset) & ADDR48
    for cpu in cpus:
        if time_left() <= 0:
            out.problems.append(f"cycle deadline reached before CPU {cpu}")
            break
        try:
            (base,) = struct.unpack("<Q", read(offsets_at + 8 * cpu, 8))
            _CpuWalk(read, lay, cpu, out).rq((base + lay.runqueues) & ADDR48)
        except WalkStopped as e:
            out.problems.append(f"CPU {cpu}: {e}")
        except Exception as e:  # noqa: BLE001 - unreadable memory (volatility3 raises its own types)
            out.problems.append(f"CPU {cpu}: {type(e).__name__}: {e}")
    return out
