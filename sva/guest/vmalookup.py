"""Which VMA of a process holds an address: one maple-tree descent, raw.

YARA attribution needs the mapping of a few matched addresses per process; volatility3
answers by iterating every VMA as objects (tens of ms per process). Since Linux 6.1 an
mm's VMAs live in a maple tree (`mm_struct.mm_mt`), indexed by address: a lookup reads
one node per level. Internal nodes are `maple_range_64` or `maple_arange_64` (pivots,
then child slots), leaves `maple_leaf_64` (same layout as range_64, slots are VMAs). A
node pointer carries the node type in bits 3..6 and is aligned to 256 bytes.

The walk trusts nothing: the VMA found must contain the address (vm_start <= va <
vm_end), depth is bounded, and any surprise (an unknown node type, an unreadable node)
gives None, for the caller to fall back on volatility3's iteration. Kernels before 6.1
(VMAs on a list and an rbtree) have no `mm_mt`: `MapleLookup.for_context` says None.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sva.guest.context import GuestContext

ADDR48 = (1 << 48) - 1
KERNEL_HALF = 0xFFFF800000000000
MAX_HEIGHT = 16  # the kernel allows 31; real trees of even huge processes are < 8
NODE_ALIGN_MASK = 0xFF
ROOT_TAG = 0x2  # MAPLE_ROOT_NODE: set on the root's node pointer only
LEAF_64, RANGE_64, ARANGE_64 = 1, 2, 3  # enum maple_type
USER_TOP = 1 << 47
MAX_INDEX = (1 << 64) - 1  # the root node's maximum


@dataclass(frozen=True, slots=True)
class RawVma:
    address: int  # of the vm_area_struct (48-bit)
    start: int
    end: int
    flags: int
    file: int = 0  # vm_file (0: anonymous); read by `all_vmas` only


@dataclass(frozen=True, slots=True)
class MapleLookup:
    """Offsets for one kernel (from its symbol table)."""

    mm_root: int  # mm_struct.mm_mt.ma_root
    range_pivots: tuple[int, int]  # (offset, count) in maple_range_64 (also leaf_64)
    range_slots: tuple[int, int]
    arange_pivots: tuple[int, int]
    arange_slots: tuple[int, int]
    range_meta: int  # offset of maple_metadata (its `end` byte) in each node type
    arange_meta: int
    vm_start: int
    vm_end: int
    vm_flags: int
    vm_file: int

    @classmethod
    def for_context(cls, gc: GuestContext) -> MapleLookup | None:
        m = gc.module
        if not (m.has_type("maple_range_64") and m.has_type("maple_arange_64")):
            return None
        if not m.get_type("mm_struct").has_member("mm_mt"):
            return None

        def field(t: str, name: str) -> tuple[int, int]:
            ty = m.get_type(t)
            return int(ty.relative_child_offset(name)), int(getattr(ty.members[name][1].vol, "count", 0) or 0)

        vma = m.get_type("vm_area_struct")
        return cls(
            mm_root=field("mm_struct", "mm_mt")[0] + field("maple_tree", "ma_root")[0],
            range_pivots=field("maple_range_64", "pivot"), range_slots=field("maple_range_64", "slot"),
            arange_pivots=field("maple_arange_64", "pivot"), arange_slots=field("maple_arange_64", "slot"),
            range_meta=field("maple_range_64", "meta")[0] + field("maple_metadata", "end")[0],
            arange_meta=field("maple_arange_64", "meta")[0] + field("maple_metadata", "end")[0],
            vm_start=int(vma.relative_child_offset("vm_start")), vm_end=int(vma.relative_child_offset("vm_end")),
            vm_flags=int(vma.relative_child_offset("vm_flags")), vm_file=int(vma.relative_child_offset("vm_file")),
        )  # fmt: skip

    def find(self, read: Callable[[int, int], bytes], mm: int, va: int) -> RawVma | None:
        """The VMA of the mm at `mm` (48-bit address) that contains `va`, or None."""
        try:
            (root,) = struct.unpack("<Q", read(mm + self.mm_root, 8))
            if not root:
                return None  # no VMAs
            if root & 3 != 2 or root <= 4096:
                return self._vma(read, root, va)  # not a node: the tree holds one VMA
            enode = root & ~ROOT_TAG
            for _ in range(MAX_HEIGHT):
                kind = (enode >> 3) & 0xF
                node = (enode & ~NODE_ALIGN_MASK) & ADDR48
                layout = self._layout(kind)
                if layout is None:
                    return None  # dense nodes are not used for VMAs
                pivots, slots = layout
                piv = struct.unpack(f"<{pivots[1]}Q", read(node + pivots[0], 8 * pivots[1]))
                # The first pivot >= va; a 0 pivot after the first marks the end of the
                # node's data, whose last slot then runs to the node's maximum.
                slot = next((i for i, p in enumerate(piv) if va <= p or (i and p == 0)), pivots[1])
                (child,) = struct.unpack("<Q", read(node + slots[0] + 8 * min(slot, slots[1] - 1), 8))
                if kind == LEAF_64:
                    return self._vma(read, child, va) if child else None
                if child < KERNEL_HALF:
                    return None
                enode = child
        except Exception:  # noqa: BLE001 - unreadable tree: the caller falls back
            return None
        return None

    def _layout(self, kind: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
        if kind in (LEAF_64, RANGE_64):
            return self.range_pivots, self.range_slots
        if kind == ARANGE_64:
            return self.arange_pivots, self.arange_slots
        return None

    def all_vmas(self, read: Callable[[int, int], bytes], mm: int, limit: int) -> list[RawVma] | None:
        """Every VMA of the mm at `mm`, sorted by start (at most `limit`); None when the
        tree cannot be walked (the caller falls back on volatility3)."""
        try:
            (root,) = struct.unpack("<Q", read(mm + self.mm_root, 8))
            if not root:
                return []
            if root & 3 != 2 or root <= 4096:
                one = self._vma(read, root, None)
                return [] if one is None else [one]
            out: dict[int, RawVma] = {}
            seen: set[int] = set()
            stack = [(root & ~ROOT_TAG, 0, MAX_INDEX)]
            while stack:
                enode, depth, node_max = stack.pop()
                kind = (enode >> 3) & 0xF
                node = (enode & ~NODE_ALIGN_MASK) & ADDR48
                layout = self._layout(kind)
                if layout is None or depth >= MAX_HEIGHT or node in seen or len(seen) > limit:
                    return None
                seen.add(node)
                (poff, pcount), (soff, _scount) = layout
                piv = struct.unpack(f"<{pcount}Q", read(node + poff, 8 * pcount))
                end = self._data_end(read, node, kind, piv, node_max)
                slots = struct.unpack(f"<{end + 1}Q", read(node + soff, 8 * (end + 1)))
                for i, child in enumerate(slots):
                    if not child:
                        continue
                    if kind == LEAF_64:
                        vma = self._vma(read, child, None)
                        if vma is None:
                            return None
                        out[vma.address] = vma
                        if len(out) > limit:
                            return None
                    elif child >= KERNEL_HALF:
                        stack.append((child, depth + 1, piv[i] if i < pcount and piv[i] else node_max))
                    else:
                        return None
            return sorted(out.values(), key=lambda v: v.start)
        except Exception:  # noqa: BLE001
            return None

    def _data_end(
        self, read: Callable[[int, int], bytes], node: int, kind: int, piv: tuple[int, ...], node_max: int
    ) -> int:
        """The last used slot of a node (the kernel's ma_data_end): the metadata's `end`
        when the node is not full, else the slot whose pivot is the node's maximum."""
        meta = self.arange_meta if kind == ARANGE_64 else self.range_meta
        if kind == ARANGE_64 or not piv[-1]:
            end = read(node + meta, 1)[0]
            if end > len(piv):
                raise ValueError(f"maple node 0x{node:x} claims {end} as its last slot")
            return end
        return len(piv) - 1 if piv[-1] == node_max else len(piv)

    def _vma(self, read: Callable[[int, int], bytes], pointer: int, va: int | None) -> RawVma | None:
        """The VMA at `pointer` if it holds `va` (or, with `va` None, is a plausible user VMA)."""
        if pointer < KERNEL_HALF:
            return None
        address = pointer & ADDR48
        (start,) = struct.unpack("<Q", read(address + self.vm_start, 8))
        (end,) = struct.unpack("<Q", read(address + self.vm_end, 8))
        if not (start <= va < end if va is not None else start < end <= USER_TOP):
            return None
        (flags,) = struct.unpack("<Q", read(address + self.vm_flags, 8))
        (file,) = struct.unpack("<Q", read(address + self.vm_file, 8))
        return RawVma(address, start, end, flags, file)
