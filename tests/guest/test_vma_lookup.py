"""The raw maple-tree VMA lookup (sva.guest.vmalookup): on the lab guest it finds, for the
first and last byte of every VMA of every process, the VMA volatility3's iteration gives;
on hand-built nodes it refuses garbage instead of following it."""

from __future__ import annotations

import itertools
import struct

import pytest

from sva.guest.context import GuestContext
from sva.guest.memscan import _raw_vmas, _user_tasks
from sva.guest.vmalookup import ADDR48, LEAF_64, RANGE_64, MapleLookup
from sva.vmi import open_target


@pytest.mark.lab
def test_lookup_agrees_with_volatility3_for_every_vma(lab_guest) -> None:
    with open_target(f"lab:{lab_guest.name}") as b:
        gc = GuestContext.attach(b)
        lookup = MapleLookup.for_context(gc)
        assert lookup is not None, "the lab's 6.1 kernel keeps VMAs in a maple tree"
        kernel = gc.context.layers[gc.module.layer_name]

        def read(address: int, size: int) -> bytes:
            return bytes(kernel.read(address & ADDR48, size))

        checked = 0
        with b.frozen():
            gc.begin_cycle()
            for task in _user_tasks(gc):
                mm = int(task.mm) & ADDR48
                vmas = _raw_vmas(task)
                walked = lookup.all_vmas(read, mm, 65536)
                assert walked is not None
                assert [(v.address, v.start, v.end, v.flags, v.file & ADDR48) for v in walked] == [
                    (int(vma.vol.offset) & ADDR48, start, end, flags, int(vma.vm_file) & ADDR48)
                    for start, end, flags, vma in vmas
                ]
                for start, end, flags, vma in vmas:
                    for va in (start, end - 1, (start + end) // 2):
                        found = lookup.find(read, mm, va)
                        assert found is not None, (int(task.pid), hex(va))
                        assert (found.address, found.start, found.end, found.flags) == (
                            int(vma.vol.offset) & ADDR48, start, end, flags)  # fmt: skip
                        checked += 1
                # Below the first VMA and in the gap after one: no VMA.
                assert lookup.find(read, mm, vmas[0][0] - 1) is None
                gaps = [(a[1], b_[0]) for a, b_ in itertools.pairwise(vmas) if a[1] < b_[0]]
                if gaps:
                    assert lookup.find(read, mm, gaps[0][0]) is None
        assert checked > 100


LOOKUP = MapleLookup(
    mm_root=0x40, range_pivots=(8, 15), range_slots=(128, 16), arange_pivots=(8, 9), arange_slots=(80, 10),
    range_meta=248, arange_meta=240,
    vm_start=0, vm_end=8, vm_flags=32, vm_file=40,
)  # fmt: skip
K = 0xFFFF_8880_0000_0000


def node_pointer(address: int, kind: int, root: bool = False) -> int:
    """A maple_enode: the node type in bits 3..6, bit 2 set; the root's also has bit 1."""
    return address | kind << 3 | 4 | (2 if root else 0)


class Memory:
    def __init__(self) -> None:
        self.qwords: dict[int, int] = {}

    def put(self, address: int, value: int) -> None:
        self.qwords[address & ADDR48] = value

    def read(self, address: int, size: int) -> bytes:
        return b"".join(struct.pack("<Q", self.qwords.get((address + i) & ADDR48, 0)) for i in range(0, size, 8))


def test_lookup_on_built_nodes_and_garbage() -> None:
    mem = Memory()
    mm, root, leaf, vma = K + 0x1000, K + 0x2000, K + 0x3000, K + 0x4000
    mem.put(mm + 0x40, node_pointer(root, RANGE_64, root=True))
    mem.put(root + 8, 0x7FFF_FFFF)  # pivot 0: slot 0 covers 0..0x7fffffff
    mem.put(root + 128, node_pointer(leaf, LEAF_64))
    mem.put(leaf + 8, 0x3FFF)  # slot 0: 0..0x3fff, a gap
    mem.put(leaf + 16, 0x4FFF)  # slot 1: 0x4000..0x4fff, the VMA
    mem.put(leaf + 128 + 8, vma | 0xFFFF_0000_0000_0000)
    mem.put(leaf + 248, 1)  # maple_metadata.end: slot 1 is the last used (the root's is 0)
    mem.put(vma, 0x4000)
    mem.put(vma + 8, 0x5000)
    mem.put(vma + 32, 0x73)
    found = LOOKUP.find(mem.read, mm, 0x4800)
    assert found is not None and (found.start, found.end, found.flags) == (0x4000, 0x5000, 0x73)
    assert LOOKUP.find(mem.read, mm, 0x1000) is None  # the gap
    assert [(v.start, v.end) for v in LOOKUP.all_vmas(mem.read, mm, 10) or []] == [(0x4000, 0x5000)]
    mem.put(vma, 0x4900)  # a VMA that does not contain the address is not believed
    assert LOOKUP.find(mem.read, mm, 0x4800) is None
    mem.put(root + 128, node_pointer(root, RANGE_64))  # a node that is its own child
    assert LOOKUP.find(mem.read, mm, 0x4800) is None
    assert LOOKUP.all_vmas(mem.read, mm, 10) is None
    mem.put(root + 128, node_pointer(leaf, 7))  # an unknown node type
    assert LOOKUP.find(mem.read, mm, 0x4800) is None
