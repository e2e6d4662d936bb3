"""Short-pause consistent reads: copy a working set of pages while frozen, read from the copy.

A cycle's consistent facts (task list, syscall table, page tables, …) read a few thousand
guest pages. Walking them inside the freeze keeps the guest stopped for the whole walk
(tens of ms in Python). Instead the engine (sva.engine.engine) does:

1. freeze; copy the pages the previous cycle's walks read (`MappedBackend.snapshot`),
   and the vCPU registers if those walks asked for them; thaw — the pause is one
   stop/cont plus a memcpy of a few MiB;
2. walk with the guest running while the backend serves reads from the copy
   (`MappedBackend.overlay`). Every page a read touches is recorded; one that is not in
   the copy is read live and recorded as a miss;
3. no miss: every value came from the one frozen instant, exactly as if the walk had run
   inside the freeze. A miss (a new process, a page the last cycle did not need): the
   values are thrown away and the walk is repeated with a new copy that includes what it
   touched, a bounded number of times, then inside a classic freeze.

The copy is private (a bytearray): reads never hand out views of guest RAM while the
guest runs, and a hostile guest cannot make it grow beyond `MAX_SNAPSHOT_PAGES`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import xxhash

from sva.vmi.base import Registers

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
# A walk touching more pages than this is not worth copying (128 MiB): the engine freezes
# the guest for it instead. Bounds the copy a guest can make the appliance allocate.
MAX_SNAPSHOT_PAGES = 32768
# The digests' seed, secret to this process: a guest that knew it could craft a change that
# keeps a page's hash (XXH3 is fast, not cryptographic); it never sees the digests.
_SEED = secrets.randbits(64)


@dataclass(eq=False)
class PageSnapshot:
    """Guest pages and registers copied at one frozen instant, and what reads asked since."""

    pages: dict[int, int]  # page frame number -> offset of its copy in `data`
    data: bytearray
    registers: dict[int, Registers] = field(default_factory=dict)
    touched: set[int] = field(default_factory=set)
    missed: set[int] = field(default_factory=set)
    registers_missed: bool = False
    overflow: bool = False  # reads touched more than MAX_SNAPSHOT_PAGES pages
    register_reads: int = 0
    _tracks: list[set[int]] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        """True when every read since the copy was served from it."""
        return not self.missed and not self.registers_missed and not self.overflow

    @property
    def size(self) -> int:
        """Bytes copied (`data` may be larger: a reused buffer)."""
        return len(self.pages) << PAGE_SHIFT

    def readinto(self, gpa: int, out: memoryview, live: Callable[[int, memoryview], int]) -> int:
        """Fill `out` from guest-physical `gpa`: copied pages from the copy, the others
        from `live` (recorded as misses)."""
        n = len(out)
        pos = 0
        pages, data, touched = self.pages, self.data, self.touched
        while pos < n:
            a = gpa + pos
            pfn = a >> PAGE_SHIFT
            within = a & PAGE_MASK
            take = min(n - pos, PAGE_SIZE - within)
            if pfn not in touched:
                touched.add(pfn)
                if len(touched) > MAX_SNAPSHOT_PAGES:
                    self.overflow = True
            if self._tracks:
                self._tracks[-1].add(pfn)
            off = pages.get(pfn)
            if off is None:
                self.missed.add(pfn)
                live(a, out[pos : pos + take])
            else:
                out[pos : pos + take] = data[off + within : off + within + take]
            pos += take
        return n

    def begin_track(self) -> None:
        """Start recording the pages read from here on (nested: an inner record's pages
        count for the outer one too); `end_track` returns them."""
        self._tracks.append(set())

    def end_track(self) -> frozenset[int]:
        pages = self._tracks.pop()
        if self._tracks:
            self._tracks[-1] |= pages
        return frozenset(pages)

    def digest(self, pfns: Iterable[int]) -> bytes | None:
        """A hash of the copied bytes of `pfns` (None if one of them was not copied): two
        copies with equal digests for the pages a walk read give that walk equal bytes."""
        h = xxhash.xxh3_128(seed=_SEED)
        view = memoryview(self.data)
        for pfn in sorted(pfns):
            off = self.pages.get(pfn)
            if off is None:
                return None
            h.update(view[off : off + PAGE_SIZE])
        return h.digest()

    def register(self, vcpu: int, live: Callable[[int], Registers]) -> Registers:
        self.register_reads += 1
        r = self.registers.get(vcpu)
        if r is None:
            self.registers_missed = True
            return live(vcpu)
        return r


def page_runs(pfns: Iterable[int], limit: int = MAX_SNAPSHOT_PAGES) -> list[tuple[int, int]]:
    """Sorted (first page, count) runs of consecutive page numbers, at most `limit` pages."""
    runs: list[tuple[int, int]] = []
    for total, pfn in enumerate(sorted(pfns)):
        if total >= limit:
            break
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs
