"""The run-queue walk (sva.guest.runqueue) on hand-built scheduler structures: it finds
the tasks of every queue, and hostile structures (cycles, garbage pointers, a wrong CPU,
absurd sizes) end the walk within its bounds with a reason. The live view is tested on
the lab guest in tests/detectors/test_rootkit.py."""

from __future__ import annotations

import itertools

import pytest

from sva.guest import runqueue
from sva.guest.runqueue import RunQueueTasks, WalkStopped, _CpuWalk, _Layout

K = 0xFFFF_8880_0000_0000 & runqueue.ADDR48  # the walk works on 48-bit addresses
LAY = _Layout(
    runqueues=0, rq_cpu=0, rq_curr=8, rq_cfs=64, rq_rt=256, rq_dl=2048,
    cfs_timeline=0, cfs_curr=16, se_run_node=16, se_my_q=40, rb_left=16, rb_right=8, task_se=128,
    rt_queue=0, rt_run_list=0, task_rt=400, dl_root=0, dl_rb_node=0, task_dl=500,
)  # fmt: skip
RQ = K + 0x10000


class Memory:
    """Sparse little-endian memory: unset bytes read as zero."""

    def __init__(self) -> None:
        self.cells: dict[int, tuple[int, int]] = {}  # address -> (value, size)

    def put(self, address: int, value: int, size: int = 8) -> None:
        self.cells[address] = (value & ((1 << 8 * size) - 1), size)

    def read(self, address: int, size: int) -> bytes:
        out = bytearray(size)
        for a, (value, n) in self.cells.items():
            if address <= a and a + n <= address + size:
                out[a - address : a - address + n] = value.to_bytes(n, "little")
        return bytes(out)


def kernel_ptr(address: int) -> int:
    return address | 0xFFFF_0000_0000_0000


def task_for_se_node(node: int) -> int:
    return node - LAY.se_run_node - LAY.task_se


def walk(mem: Memory, cpu: int = 0) -> RunQueueTasks:
    out = RunQueueTasks()
    _CpuWalk(mem.read, LAY, cpu, out).rq(RQ)
    return out


def rq_with_rt_heads_empty(mem: Memory) -> None:
    for prio in range(runqueue.RT_PRIOS):  # empty list heads point at themselves
        head = RQ + LAY.rq_rt + 16 * prio  # type: ignore[operator]
        mem.put(head, kernel_ptr(head))


def test_curr_cfs_tree_groups_rt_and_dl_tasks_are_found() -> None:
    mem = Memory()
    rq_with_rt_heads_empty(mem)
    curr_task = K + 0x100000
    mem.put(RQ + LAY.rq_curr, kernel_ptr(curr_task))
    cfs = RQ + LAY.rq_cfs
    # Root CFS tree: node A (a task) with a left child G (a group whose cfs_rq holds task B).
    a, g, b = K + 0x200010, K + 0x300010, K + 0x400010
    mem.put(cfs + LAY.cfs_timeline, kernel_ptr(a))
    mem.put(a + LAY.rb_left, kernel_ptr(g))
    group_q = K + 0x500000
    mem.put(g - LAY.se_run_node + LAY.se_my_q, kernel_ptr(group_q))  # type: ignore[operator]
    mem.put(group_q + LAY.cfs_timeline, kernel_ptr(b))
    mem.put(group_q + LAY.cfs_curr, kernel_ptr(K + 0x600000))  # the group's running entity
    # One real-time task at priority 5, one deadline task.
    head = RQ + LAY.rq_rt + 16 * 5  # type: ignore[operator]
    rt_node = K + 0x700000
    mem.put(head, kernel_ptr(rt_node))
    mem.put(rt_node, kernel_ptr(head))
    dl_node = K + 0x800000
    mem.put(RQ + LAY.rq_dl, kernel_ptr(dl_node))  # type: ignore[operator]
    found = walk(mem)
    assert found.tasks == {
        curr_task: "cpu0:curr",
        task_for_se_node(a): "cpu0:cfs",
        task_for_se_node(b): "cpu0:cfs",
        K + 0x600000 - LAY.task_se: "cpu0:cfs",
        rt_node - 400: "cpu0:rt",
        dl_node - 500: "cpu0:dl",
    }


def test_a_cyclic_tree_and_a_cyclic_rt_list_end() -> None:
    mem = Memory()
    rq_with_rt_heads_empty(mem)
    a, b = K + 0x200010, K + 0x300010
    cfs = RQ + LAY.rq_cfs
    mem.put(cfs + LAY.cfs_timeline, kernel_ptr(a))
    mem.put(a + LAY.rb_left, kernel_ptr(b))
    mem.put(b + LAY.rb_right, kernel_ptr(a))  # back to the root
    head = RQ + LAY.rq_rt
    n1, n2 = K + 0x700000, K + 0x710000
    mem.put(head, kernel_ptr(n1))
    mem.put(n1, kernel_ptr(n2))
    mem.put(n2, kernel_ptr(n1))  # never returns to the head
    found = walk(mem)
    assert set(found.tasks) == {task_for_se_node(a), task_for_se_node(b), n1 - 400, n2 - 400}


def test_a_huge_rt_list_stops_at_the_node_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runqueue, "MAX_NODES", 50)
    mem = Memory()
    rq_with_rt_heads_empty(mem)
    head = RQ + LAY.rq_rt
    nodes = [K + 0x700000 + 64 * i for i in range(200)]
    mem.put(head, kernel_ptr(nodes[0]))
    for n, nxt in itertools.pairwise(nodes):
        mem.put(n, kernel_ptr(nxt))
    with pytest.raises(WalkStopped, match="more than 50"):
        walk(mem)


def test_group_nesting_is_bounded() -> None:
    mem = Memory()
    rq_with_rt_heads_empty(mem)
    cfs = RQ + LAY.rq_cfs
    # Each group's running entity is a group again, each with a new cfs_rq: a chain.
    for depth in range(runqueue.MAX_GROUP_DEPTH + 5):
        q = cfs if depth == 0 else K + 0x900000 + 0x1000 * depth
        se = K + 0xA00000 + 0x1000 * depth
        mem.put(q + LAY.cfs_curr, kernel_ptr(se))
        mem.put(se + LAY.se_my_q, kernel_ptr(K + 0x900000 + 0x1000 * (depth + 1)))  # type: ignore[operator]
    with pytest.raises(WalkStopped, match="nested deeper"):
        walk(mem)


def test_garbage_pointer_and_wrong_cpu_are_refused() -> None:
    mem = Memory()
    mem.put(RQ + LAY.rq_curr, 0x4141414141414141)
    with pytest.raises(WalkStopped, match="not a kernel address"):
        walk(mem)
    mem = Memory()
    mem.put(RQ + LAY.rq_cpu, 3, size=4)
    with pytest.raises(WalkStopped, match="CPU 3's"):
        walk(mem, cpu=0)
