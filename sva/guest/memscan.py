"""Memory facts: YARA matches attributed to processes, and suspicious executable mappings.

Facts provided here (see `memory_providers`):
  yara_scan            ScanReport: the incremental scan of all guest RAM, run before the
                       freeze with the guest running (not consistent)
  yara_matches         tuple[AttributedMatch, ...]: every match of the active YARA rule set
                       in guest RAM, its bytes re-read in the freeze, one entry per (YARA
                       rule, pid), plus one per rule for hits no process maps (kernel
                       memory, page cache, free pages)
  suspicious_mappings  tuple[SuspiciousMapping, ...]: malfind-style candidates (W+X, anonymous
                       executable, executable with dirty file pages), with their first bytes

How YARA stays cheap: `IncrementalScanner` hashes RAM each cycle and rescans only changed
pages (zero-copy); the scanner is kept across cycles and rebuilt only when the rule set's
fingerprint changes. Attribution then needs the reverse of the processes' page tables, but
only for the pages that matched: each user process's page tables are walked directly
(4 KiB table reads, 512 entries each; a busybox guest has a few hundred table pages in all)
and only leaves pointing at a matched page are kept; the VMA holding a hit is found by one
raw maple-tree descent (sva.guest.vmalookup; volatility3's `mm.get_vma_iter()` where the
kernel has no maple tree). A page no process maps is reported as unattributed rather
than dropped.

Guest memory is hostile: tasks, VMAs and page-table pages walked are bounded, every
pointer read can fail (that process is skipped, never the cycle), and the walk watches
the cycle's deadline.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sva.engine.facts import (
    FactContext,
    FactProvider,
    FunctionProvider,
    ProcessInfo,
    Unavailable,
)
from sva.errors import SvaError
from sva.guest.vmalookup import MapleLookup
from sva.vmi.base import PAGE_SIZE

if TYPE_CHECKING:
    from sva.guest.context import GuestContext
    from sva.guest.facts import GuestSession
    from sva.scan import CompiledRuleSet, IncrementalScanner, ScanReport

log = logging.getLogger("sva.guest.memscan")

MAX_TASKS = 65536
MAX_VMAS = 65536  # the kernel's default vm.max_map_count
MAX_TABLE_PAGES = 1 << 16  # page-table pages read per process
MAX_HEAD = 256  # bytes of a suspicious mapping's first resident page kept
MAX_HEAD_PAGES = 16  # pages tried for the first resident one
MAX_HITS = 64  # string instances kept per attributed match
MAX_OWNERS_PER_PAGE = 64  # processes a shared page is attributed to
MAX_DATA = 64  # bytes of matched data kept per hit
ADDR48 = (1 << 48) - 1  # volatility3's Intel layer takes 48-bit kernel addresses

# x86-64 page-table entry bits
_P, _RW, _PS, _DIRTY, _PROTNONE = 1 << 0, 1 << 1, 1 << 7, 1 << 6, 1 << 8
_NX = 1 << 63
_ADDR = 0x000FFFFFFFFFF000
_LEVEL_SHIFT = (39, 30, 21, 12)  # PGD, PUD, PMD, PTE
USER_PGD_ENTRIES = 256  # the lower half of the PGD maps user space

# vm_area_struct.vm_flags
VM_READ, VM_WRITE, VM_EXEC, VM_SHARED = 0x1, 0x2, 0x4, 0x8
SPECIAL_MAPPINGS = frozenset({"[vdso]", "[vvar]", "[vsyscall]", "[uprobes]"})


# -- values -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MappingInfo:
    """One VMA of a process. `path` is None for an anonymous mapping; `name` is the path or
    a label ([heap], [stack], [vdso], [anon])."""

    start: int
    end: int
    perms: str  # "rwxp" style: r/w/x then p (private) or s (shared)
    flags: int  # vm_flags
    path: str | None
    name: str
    vma_address: int = 0  # kernel address of the vm_area_struct

    @property
    def anonymous(self) -> bool:
        return self.path is None

    @property
    def size(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict[str, Any]:
        return {"start": f"0x{self.start:x}", "end": f"0x{self.end:x}", "perms": self.perms,
                "path": self.path, "name": self.name, "anonymous": self.anonymous}  # fmt: skip


@dataclass(frozen=True, slots=True)
class HitLocation:
    """One matched string instance: where it is physically and, if attributed, virtually."""

    identifier: str  # "$marker"
    gpa: int
    length: int
    data: bytes
    va: int | None = None
    mapping: MappingInfo | None = None

    @property
    def mapping_offset(self) -> int | None:
        return (
            None
            if self.va is None or self.mapping is None
            else self.va - self.mapping.start
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"identifier": self.identifier, "gpa": f"0x{self.gpa:x}", "length": self.length,
                               "data": self.data.hex()}  # fmt: skip
        if self.va is not None:
            out["va"] = f"0x{self.va:x}"
        if self.mapping is not None:
            out["offset"] = self.mapping_offset
            out["mapping"] = self.mapping.name
        return out


@dataclass(frozen=True, slots=True)
class AttributedMatch:
    """One YARA rule's hits in one process (`process` None: in memory no process maps)."""

    rule: str  # namespace:rule
    tags: tuple[str, ...]
    meta: tuple[tuple[str, str | int | bool], ...]
    techniques: tuple[str, ...]
    process: ProcessInfo | None
    hits: tuple[HitLocation, ...]
    hits_omitted: int = 0

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def mappings(self) -> tuple[MappingInfo, ...]:
        seen: dict[tuple[int, int], MappingInfo] = {}
        for h in self.hits:
            if h.mapping is not None:
                seen.setdefault((h.mapping.start, h.mapping.end), h.mapping)
        return tuple(seen.values())

    def meta_value(self, key: str) -> str | None:
        return next((str(v) for k, v in self.meta if k == key), None)


@dataclass(frozen=True, slots=True)
class SuspiciousMapping:
    """A malfind-style candidate: why it is one, and the first bytes of its first resident page."""

    process: ProcessInfo
    mapping: MappingInfo
    reason: str  # "rwx", "anon_exec" or "dirty_exec"
    head: bytes = b""
    head_va: int | None = (
        None  # address of `head` (the first resident page, or the dirty page)
    )


@dataclass(frozen=True, slots=True)
class _Leaf:
    va: int
    pa: int
    size: int
    entry: int  # the raw table entry

    @property
    def dirty(self) -> bool:
        return bool(self.entry & _DIRTY)


# -- page tables ------------------------------------------------------------------------


def _entry_target(entry: int, shift: int) -> int:
    """Physical address an entry points at. Non-present PROT_NONE entries hold an inverted
    pfn (the kernel's L1TF mitigation)."""
    if not entry & _P:
        entry = ~entry
    mask = _ADDR & ~((1 << shift) - 1) if shift > 12 else _ADDR
    return entry & mask


def walk_user_pages(
    read: Callable[[int, int], bytes],
    pgd: int,
    *,
    max_tables: int = MAX_TABLE_PAGES,
    deadline: float | None = None,
) -> Iterator[_Leaf]:
    """Every resident user page (present or PROT_NONE) of the 4-level tables at `pgd`.

    `read(gpa, size)` reads guest-physical memory. Bounded by `max_tables` table pages
    and `deadline` (time.monotonic()); an unreadable table is skipped.
    """
    budget = [max_tables]

    def table(pa: int) -> tuple[int, ...] | None:
        if budget[0] <= 0 or (deadline is not None and time.monotonic() > deadline):
            return None
        budget[0] -= 1
        try:
            return struct.unpack("<512Q", read(pa, PAGE_SIZE))
        except (SvaError, struct.error):
            return None

    def walk(pa: int, level: int, base: int, limit: int) -> Iterator[_Leaf]:
        entries = table(pa)
        if entries is None:
            return
        shift = _LEVEL_SHIFT[level]
        for i in range(limit):
            e = entries[i]
            if not e & (_P | _PROTNONE):
                continue
            va = base | (i << shift)
            leaf = level == 3 or (level in (1, 2) and e & _PS)
            if leaf:
                yield _Leaf(va, _entry_target(e, shift), 1 << shift, e)
            elif e & _P:
                yield from walk(e & _ADDR, level + 1, va, 512)

    yield from walk(pgd & _ADDR, 0, 0, USER_PGD_ENTRIES)


# -- volatility3 reads ------------------------------------------------------------------


def _canonical(address: int) -> int:
    """volatility3 keeps 48-bit addresses; show kernel ones sign-extended, as the CPU does."""
    return address | 0xFFFF000000000000 if address & (1 << 47) else address


def _string(obj: Any, length: int) -> str:
    return str(obj.cast("string", max_length=length, errors="replace"))


def _user_tasks(gc: GuestContext) -> Iterator[Any]:
    """Thread-group leaders that have an mm (user processes), as volatility3 objects.

    The task list comes from sva.guest.processes' raw walk (the tasks pslist gives, a few
    times faster); objects are made only for tasks with an mm, kernel threads that borrow
    one left out."""
    from sva.guest.processes import raw_task_list, task_layout

    lay = task_layout(gc)
    for raw in itertools.islice(raw_task_list(gc), MAX_TASKS):
        if not raw.u64(lay.mm):
            continue
        try:
            task = gc.module.object("task_struct", offset=raw.address, absolute=True)
            if not task.is_kernel_thread:
                yield task
        except Exception:  # noqa: BLE001, S112 - a task we cannot read is skipped
            continue


def _process_info(task: Any, known: Mapping[int, ProcessInfo]) -> ProcessInfo:
    pid = int(task.pid)
    p = known.get(pid)
    start = None
    try:
        start = int(task.start_time)
    except Exception:  # noqa: BLE001, S110 - unknown start time
        pass
    if p is not None and (
        start is None or p.start_time is None or p.start_time == start
    ):
        return p
    try:
        ppid = int(task.real_parent.tgid) if task.real_parent else 0
    except Exception:  # noqa: BLE001
        ppid = -1
    return ProcessInfo(pid=pid, ppid=ppid, comm=_string(task.comm, 16), start_time=start,
                       task_address=_canonical(int(task.vol.offset)))  # fmt: skip


def _pgd_phys(gc: GuestContext, task: Any) -> int | None:
    try:
        pgd = int(task.mm.pgd)
        return int(gc.context.layers[gc.module.layer_name].translate(pgd)[0])
    except Exception:  # noqa: BLE001
        return None


def _perms(flags: int) -> str:
    return "".join((
        "r" if flags & VM_READ else "-", "w" if flags & VM_WRITE else "-", "x" if flags & VM_EXEC else "-",
        "s" if flags & VM_SHARED else "p",
    ))  # fmt: skip


def _raw_vmas(task: Any) -> list[tuple[int, int, int, Any]]:
    """(start, end, vm_flags, vma) of a task's mm, sorted by start (at most MAX_VMAS)."""
    out: list[tuple[int, int, int, Any]] = []
    for vma in itertools.islice(task.mm.get_vma_iter(), MAX_VMAS):
        try:
            out.append((int(vma.vm_start), int(vma.vm_end), int(vma.vm_flags), vma))
        except Exception:  # noqa: BLE001, S112 - a smeared VMA is skipped
            continue
    out.sort(key=lambda r: r[0])
    return out


def _mapping_info(
    gc: GuestContext, task: Any, raw: tuple[int, int, int, Any]
) -> MappingInfo | None:
    """The named mapping of one raw VMA (naming a file mapping walks dentries: only on demand)."""
    start, end, flags, vma = raw
    try:
        anonymous = not int(vma.vm_file)
        name = vma.get_name(gc.context, task) or "?"
    except Exception:  # noqa: BLE001
        return None
    if name == "Anonymous Mapping":
        name = "[anon]"
    return MappingInfo(start, end, _perms(flags), flags, None if anonymous else name, name,
                       _canonical(int(vma.vol.offset)))  # fmt: skip


def process_mappings(gc: GuestContext, task: Any) -> tuple[MappingInfo, ...]:
    """The VMAs of a task's mm, named, sorted by start (at most MAX_VMAS)."""
    return tuple(
        m
        for m in (_mapping_info(gc, task, r) for r in _raw_vmas(task))
        if m is not None
    )


class _LazyMappings:
    """One process's VMAs, found one address at a time and each named only when a hit
    falls in it: a raw maple-tree lookup (sva.guest.vmalookup) where the kernel has one,
    else (or when it fails) volatility3's iteration of all VMAs, read once."""

    def __init__(self, gc: GuestContext, task: Any, lookup: MapleLookup | None = None) -> None:
        self.gc, self.task, self.lookup = gc, task, lookup
        self.raw: list[tuple[int, int, int, Any]] | None = None
        self.starts: list[int] = []
        self.named: dict[int, MappingInfo | None] = {}  # by VMA start
        self.mm: int | None = None
        kernel = gc.context.layers[gc.module.layer_name]
        self.read: Callable[[int, int], bytes] = lambda address, size: bytes(kernel.read(address & ADDR48, size))
        if lookup is not None:
            try:
                self.mm = int(task.mm) & ADDR48
            except Exception:  # noqa: BLE001
                self.mm = None

    def _all(self) -> list[tuple[int, int, int, Any]]:
        if self.raw is None:
            try:
                self.raw = _raw_vmas(self.task)
            except Exception:  # noqa: BLE001
                self.raw = []
            self.starts = [r[0] for r in self.raw]
        return self.raw

    def at(self, va: int) -> MappingInfo | None:
        for start, named in self.named.items():
            if named is not None and start <= va < named.end:
                return named
        found: tuple[int, int, int, Any] | None = None
        if self.lookup is not None and self.mm is not None:
            vma = self.lookup.find(self.read, self.mm, va)
            if vma is not None:
                obj = self.gc.module.object("vm_area_struct", offset=vma.address, absolute=True)
                found = (vma.start, vma.end, vma.flags, obj)
        if found is None:
            raw = self._all()
            i = bisect.bisect_right(self.starts, va) - 1
            if i < 0 or va >= raw[i][1]:
                return None
            found = raw[i]
        if found[0] not in self.named:
            self.named[found[0]] = _mapping_info(self.gc, self.task, found)
        return self.named[found[0]]


def _deadline(ctx: FactContext | None) -> float | None:
    return None if ctx is None else time.monotonic() + max(0.0, ctx.time_left())


def _known_processes(ctx: FactContext | None) -> dict[int, ProcessInfo]:
    procs = ctx.fact("processes") if ctx is not None else None
    if procs is None or isinstance(procs, Unavailable):
        return {}
    return {p.pid: p for p in procs}


# -- YARA attribution ---------------------------------------------------------------------


def _meta_items(meta: Mapping[str, object]) -> tuple[tuple[str, str | int | bool], ...]:
    return tuple(
        (str(k), v if isinstance(v, str | int | bool) else str(v))
        for k, v in meta.items()
    )


def attribute(
    gc: GuestContext, report: ScanReport, ctx: FactContext | None = None
) -> tuple[AttributedMatch, ...]:
    """The report's matches, grouped by (rule, owning process); hits on pages no process
    maps go to one entry per rule with `process` None."""
    hits_by_page: dict[int, list[tuple[Any, Any]]] = {}  # pfn -> [(match, hit)]
    for m in report.matches:
        for h in m.hits:
            for pfn in range(
                h.address // PAGE_SIZE,
                (h.address + max(h.length, 1) - 1) // PAGE_SIZE + 1,
            ):
                hits_by_page.setdefault(pfn, []).append((m, h))
    owners: dict[int, list[tuple[Any, int]]] = {}  # pfn -> [(task, va of the page)]
    if hits_by_page:
        read = gc.backend.read
        deadline = _deadline(ctx)
        for task in _user_tasks(gc):
            pgd = _pgd_phys(gc, task)
            if pgd is None:
                continue
            for leaf in walk_user_pages(read, pgd, deadline=deadline):
                first, count = leaf.pa // PAGE_SIZE, leaf.size // PAGE_SIZE
                if count == 1:
                    if first in hits_by_page:
                        owners.setdefault(first, []).append((task, leaf.va))
                    continue
                for pfn in hits_by_page:  # a huge page: few matched pages, so test each
                    if first <= pfn < first + count:
                        owners.setdefault(pfn, []).append(
                            (task, leaf.va + (pfn - first) * PAGE_SIZE)
                        )
    known = _known_processes(ctx)
    maps_cache: dict[int, _LazyMappings] = {}
    procs: dict[int, ProcessInfo] = {}

    lookup = MapleLookup.for_context(gc)

    def mappings_of(task: Any) -> _LazyMappings:
        key = int(task.vol.offset)
        if key not in maps_cache:
            maps_cache[key] = _LazyMappings(gc, task, lookup)
            procs[key] = _process_info(task, known)
        return maps_cache[key]

    grouped: dict[
        tuple[str, int | None], dict[tuple[str, int, int | None], HitLocation]
    ] = {}
    first_match: dict[str, Any] = {}
    for m in report.matches:
        first_match.setdefault(m.key, m)
        if not m.hits:  # a condition without strings: only its block is known
            grouped.setdefault((m.key, None), {})
        for h in m.hits:
            pfn = h.address // PAGE_SIZE
            page_owners = owners.get(pfn, [])[:MAX_OWNERS_PER_PAGE]
            data = bytes(h.data[:MAX_DATA])
            if not page_owners:
                loc = HitLocation(h.identifier, h.address, h.length, data)
                grouped.setdefault((m.key, None), {})[
                    (h.identifier, h.address, None)
                ] = loc
                continue
            for task, page_va in page_owners:
                va = page_va + h.address % PAGE_SIZE
                loc = HitLocation(
                    h.identifier,
                    h.address,
                    h.length,
                    data,
                    va,
                    mappings_of(task).at(va),
                )
                grouped.setdefault((m.key, int(task.vol.offset)), {})[
                    (h.identifier, h.address, va)
                ] = loc
    out: list[AttributedMatch] = []
    for (key, owner), locs in grouped.items():
        m = first_match[key]
        hits = sorted(locs.values(), key=lambda x: (x.gpa, x.va or 0))
        out.append(AttributedMatch(
            rule=key, tags=tuple(m.tags), meta=_meta_items(m.meta), techniques=tuple(m.techniques),
            process=None if owner is None else procs[owner], hits=tuple(hits[:MAX_HITS]),
            hits_omitted=max(0, len(hits) - MAX_HITS),
        ))  # fmt: skip
    out.sort(key=lambda a: (a.rule, -1 if a.pid is None else a.pid))
    return tuple(out)


@dataclass
class YaraMemoryScan:
    """The `yara_matches` provider's state across cycles: one IncrementalScanner, rebuilt
    (a full rescan) when the rule set changes.

    `rules` is a callable returning the rule set in force (e.g. the signature bundle's
    current one; by default the built-in bundle, compiled once). `last_report` is the last
    cycle's ScanReport (timings, pages rescanned, problems) for reports and benchmarks.

    `min_interval` (seconds): a cycle less than this after the last scan hands out the last
    report instead of scanning (each scan hashes all of RAM, about 20 ms per 256 MiB, which
    adds up at several cycles a second); `yara_matches` still re-reads every hit each
    cycle. A new rule set, a new context or a scan with problems always scans again.
    """

    rules: Callable[[], CompiledRuleSet] | None = None
    scanner: IncrementalScanner | None = None
    last_report: ScanReport | None = None
    last_seconds: dict[str, float] = field(default_factory=dict)
    min_interval: float = 0.0
    _default: CompiledRuleSet | None = None
    _last_at: float = 0.0
    _last_backend: Any = None

    def current_rules(self) -> CompiledRuleSet:
        if self.rules is not None:
            return self.rules()
        if self._default is None:
            from sva.scan import CompiledRuleSet

            self._default = CompiledRuleSet.default()
        return self._default

    def scan(self, gc: GuestContext, ctx: FactContext | None = None) -> ScanReport:
        """One incremental scan cycle (the `yara_scan` fact: run with the guest running)."""
        from sva.scan import IncrementalScanner

        rules = self.current_rules()
        if self.scanner is None or self.scanner.rules.fingerprint != rules.fingerprint:
            self.scanner = IncrementalScanner(rules)
        elif (self.min_interval > 0 and self.last_report is not None and self._last_backend is gc.backend
              and not self.last_report.problems and time.monotonic() - self._last_at < self.min_interval):  # fmt: skip
            return self.last_report
        t0 = time.perf_counter()
        self._last_at, self._last_backend = time.monotonic(), gc.backend
        report = self.scanner.cycle(gc.backend)
        self.last_report = report
        self.last_seconds = {"scan": time.perf_counter() - t0}
        for p in report.problems[:8]:
            log.warning("yara memory scan: %s", p)
        return report

    def attribute(
        self, gc: GuestContext, report: ScanReport, ctx: FactContext | None = None
    ) -> tuple[AttributedMatch, ...]:
        """The report's matches that are still in RAM now (each hit's bytes read again:
        the scan may have run on the live guest), attributed to processes."""
        t0 = time.perf_counter()
        matches = attribute(gc, still_present(gc.backend, report), ctx)
        self.last_seconds["attribute"] = time.perf_counter() - t0
        return matches

    def compute(
        self, gc: GuestContext, ctx: FactContext | None = None
    ) -> tuple[AttributedMatch, ...]:
        """Scan and attribute in one go (the guest frozen around it, for a consistent view)."""
        return self.attribute(gc, self.scan(gc, ctx), ctx)


def still_present(backend: Any, report: ScanReport) -> ScanReport:
    """`report` without the hits whose bytes are no longer at their address (a match with
    no hit left is dropped; a match without strings is kept: nothing to re-read)."""
    from dataclasses import replace

    kept = []
    for m in report.matches:
        hits = []
        for h in m.hits:
            try:
                if backend.read(h.address, len(h.data)) == h.data:
                    hits.append(h)
            except SvaError:
                continue
        if not m.hits or hits:
            kept.append(m if len(hits) == len(m.hits) else replace(m, hits=tuple(hits)))
    return replace(report, matches=kept)


# -- injected code ----------------------------------------------------------------------


def _first_resident(
    leaves: list[_Leaf], starts: list[int], start: int, end: int
) -> _Leaf | None:
    i = bisect.bisect_right(starts, start) - 1
    if i >= 0 and leaves[i].va + leaves[i].size > start:
        return leaves[i]
    i += 1
    stop = min(end, start + MAX_HEAD_PAGES * PAGE_SIZE)
    return leaves[i] if i < len(leaves) and leaves[i].va < stop else None


def _dirty_leaf(
    leaves: list[_Leaf], starts: list[int], start: int, end: int
) -> _Leaf | None:
    i = max(0, bisect.bisect_right(starts, start) - 1)
    while i < len(leaves) and leaves[i].va < end:
        if leaves[i].va + leaves[i].size > start and leaves[i].dirty:
            return leaves[i]
        i += 1
    return None


def _reason(
    raw: tuple[int, int, int, Any], leaves: list[_Leaf], starts: list[int]
) -> tuple[str, _Leaf | None] | None:
    """Why an executable VMA is a malfind candidate, and the page to show; None: it is not."""
    start, end, flags, vma = raw
    if flags & VM_WRITE:
        return "rwx", _first_resident(leaves, starts, start, end)
    try:
        file_backed = bool(int(vma.vm_file))
    except Exception:  # noqa: BLE001 - unreadable: treat as anonymous (the suspicious case)
        file_backed = False
    if not file_backed:
        return "anon_exec", _first_resident(leaves, starts, start, end)
    leaf = _dirty_leaf(leaves, starts, start, end)
    return None if leaf is None else ("dirty_exec", leaf)


def _exec_vmas(gc: GuestContext, task: Any, lookup: MapleLookup | None) -> list[tuple[int, int, int, Any]]:
    """(start, end, vm_flags, vma) of a task's executable VMAs: a raw walk of its maple
    tree where the kernel has one (vma objects made for these few only), else (or when
    that walk gives up) volatility3's iteration of all VMAs."""
    if lookup is not None:
        kernel = gc.context.layers[gc.module.layer_name]
        vmas = lookup.all_vmas(lambda a, n: bytes(kernel.read(a & ADDR48, n)), int(task.mm) & ADDR48, MAX_VMAS)
        if vmas is not None:
            return [(v.start, v.end, v.flags, gc.module.object("vm_area_struct", offset=v.address, absolute=True))
                    for v in vmas if v.flags & VM_EXEC]  # fmt: skip
    return [r for r in _raw_vmas(task) if r[2] & VM_EXEC]


def find_suspicious_mappings(
    gc: GuestContext, ctx: FactContext | None = None
) -> tuple[SuspiciousMapping, ...]:
    """Malfind's criteria (volatility3 linux.malware.malfind): a W+X mapping; an executable
    mapping with no file behind it; an executable file mapping with a dirty (written) page.
    Special mappings ([vdso], [vsyscall]) are not candidates. Only candidates are named
    (naming a file mapping walks dentries)."""
    known = _known_processes(ctx)
    deadline = _deadline(ctx)
    read = gc.backend.read
    lookup = MapleLookup.for_context(gc)
    out: list[SuspiciousMapping] = []
    for task in _user_tasks(gc):
        try:
            execs = _exec_vmas(gc, task, lookup)
        except Exception:  # noqa: BLE001, S112 - an unreadable mm is skipped
            continue
        if not execs:
            continue
        pgd = _pgd_phys(gc, task)
        leaves = (
            [] if pgd is None else list(walk_user_pages(read, pgd, deadline=deadline))
        )
        starts = [lf.va for lf in leaves]
        for raw in execs:
            why = _reason(raw, leaves, starts)
            if why is None:
                continue
            m = _mapping_info(gc, task, raw)
            if m is None or m.name in SPECIAL_MAPPINGS:
                continue
            reason, leaf = why
            head, head_va = b"", None
            if leaf is not None:
                head_va = max(leaf.va, m.start)
                try:
                    head = read(leaf.pa + (head_va - leaf.va), MAX_HEAD)
                except SvaError:
                    head = b""
            out.append(
                SuspiciousMapping(
                    _process_info(task, known), m, reason, bytes(head), head_va
                )
            )
    out.sort(key=lambda s: (s.process.pid, s.mapping.start))
    return tuple(out)


# -- providers ----------------------------------------------------------------------------


def memory_providers(
    session: GuestSession, scan: YaraMemoryScan | None = None
) -> list[FactProvider]:
    """`yara_scan` (live: the whole-RAM part, with the guest running), `yara_matches` and
    `suspicious_mappings` over the session's live context. The last two read guest
    memory that must not move meanwhile (consistent): `yara_matches` re-reads each hit of
    the live scan in the freeze and attributes it then; both use the `processes` fact for
    the process identities when it is available.

    The trade-off of scanning live: a string written between the scan and the freeze is
    found one cycle later (its page's hash changed, so the next cycle rescans it); one
    erased meanwhile is not reported (its bytes are re-read in the freeze)."""
    state = scan or YaraMemoryScan()

    def with_context(
        fn: Callable[[GuestContext, FactContext], Any],
    ) -> Callable[[FactContext], Any]:
        def compute(ctx: FactContext) -> Any:
            try:
                gc = session.context_for(ctx)
            except SvaError as e:
                return Unavailable(f"guest symbols/context: {e}")
            return fn(gc, ctx)

        return compute

    return [
        FunctionProvider("yara_scan", with_context(state.scan), False, frozenset(),
                         "the incremental YARA scan of guest RAM, run with the guest running"),
        FunctionProvider("yara_matches", with_context(lambda gc, ctx: _attributed(state, gc, ctx)), True,
                         frozenset({"processes", "yara_scan"}),
                         "YARA matches in guest RAM (re-read in the freeze) attributed to processes and mappings"),
        FunctionProvider("suspicious_mappings", with_context(find_suspicious_mappings), True,
                         frozenset({"processes"}), "W+X, anonymous executable or dirty executable mappings"),
    ]  # fmt: skip


def _attributed(state: YaraMemoryScan, gc: GuestContext, ctx: FactContext) -> Any:
    report = ctx.fact("yara_scan")
    if isinstance(report, Unavailable):
        return report
    return state.attribute(gc, report, ctx)


def iter_hits(
    matches: Iterable[AttributedMatch], rule: str
) -> Iterator[tuple[AttributedMatch, HitLocation]]:
    """(match, hit) for every hit of YARA rule `namespace:rule`."""
    for m in matches:
        if m.rule == rule:
            for h in m.hits:
                yield m, h
