"""Incremental rescans: hash every guest page each cycle, rescan only the pages that changed.

Full scans skip all-zero 64 KiB blocks (see `IncrementalConfig.skip_zero_blocks`).

An idle guest rewrites a few dozen of its 65 536 pages (256 MiB) per second, so scanning
all of RAM every cycle mostly re-reads unchanged bytes. Each cycle here:

1. hashes guest RAM with XXH3-64 keyed by a per-scanner random seed, in two levels: every
   64 KiB block (one call each, ~20 ms for 256 MiB, about what reading it costs), then the
   4 KiB pages of only the blocks whose hash changed (hashing each page every cycle would
   cost twice as much, in Python call overhead). A scan of the same 256 MiB takes 0.4 s
   (7 rules) to several seconds (thousands). A keyed hash because a guest that knows the
   hash could otherwise make an edit that keeps its page's hash (a CRC is linear, so that
   edit is easy to compute); `full_rescan_every` adds periodic full scans for those who
   want more than a non-cryptographic hash;
2. compares with the last cycle's hashes; runs of changed pages become windows, widened by
   `context` bytes on both sides (by default the scanner's overlap, rounded up to whole
   pages) so a string that starts in an unchanged page and ends in a changed one is seen
   whole; windows closer than `merge_gap` are scanned in one call (each call evaluates
   every condition, so many tiny calls cost more than a few bytes more);
3. drops last cycle's matches that touch a changed page and rescans the span of their
   hits too, so a rule whose strings are still all there is found again; keeps the other
   matches as they were; adds what the windows find (instances already known are not
   repeated);
4. rescans blocks the last cycle could not scan (timeouts, errors): a gap never becomes
   permanent because its pages did not change. When only a quarantined slow rule timed out
   on a block (a problem with `rule` set, see sva.scan.scanner), only that rule's set is
   run on the block again: the other rules' results from it are kept.

The first cycle, a new rule set (another fingerprint), a changed memory map, and every
`full_rescan_every`-th cycle are full scans. Pages are hashed before they are scanned, so a
page written in between is scanned newer than its hash and rescanned next cycle: changes
are never lost, at worst scanned twice. For a consistent picture freeze the guest around
`cycle()` (`with backend.frozen(): ...`).

Limits: the windows are YARA blocks, smaller than full-scan chunks, so a rule that needs
strings further apart than the context (and not previously matched) can match in a full
scan and not in an incremental one. Overflow counts are approximate across cycles.
"""

from __future__ import annotations

import bisect
import secrets
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache

import xxhash

from sva.errors import ConfigError, SvaError
from sva.scan.rules import CompiledRuleSet
from sva.scan.scanner import (
    PhysicalScanner,
    ProblemKind,
    ScanConfig,
    ScanProblem,
    ScanReport,
    YaraMatch,
    _Collector,
    merge_ranges,
)
from sva.vmi.base import PAGE_SIZE, Backend

_RETRY = (ProblemKind.TIMEOUT, ProblemKind.SCAN_ERROR, ProblemKind.UNREADABLE)
_DIFF_BLOCK = 4096  # hashes compared at once before looking at single ones
BLOCK_PAGES = 16  # pages per first-level hash block (64 KiB)
_ZERO_BLOCK = bytes(BLOCK_PAGES * PAGE_SIZE)  # one all-zero hash block


@dataclass(frozen=True)
class IncrementalConfig:
    context: int | None = None  # bytes rescanned around changed pages; None: scanner overlap
    merge_gap: int = 64 * 1024  # windows this close are scanned in one call
    full_rescan_every: int = 0  # every Nth cycle is a full scan; 0: only when needed
    max_rescan_fraction: float = 0.5  # rescanning more than this share of RAM: full scan
    # Full scans leave out 64 KiB blocks that are all zero bytes (most of an idle guest's
    # RAM), with `context` bytes around every non-zero run still scanned. A rule that can
    # match zero bytes alone no longer fires inside such blocks; False restores it.
    skip_zero_blocks: bool = True

    def __post_init__(self) -> None:
        checks = {
            "context": self.context is None or self.context >= 0,
            "merge_gap": self.merge_gap >= 0,
            "full_rescan_every": self.full_rescan_every >= 0,
            "max_rescan_fraction": 0 < self.max_rescan_fraction <= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"incremental config: bad {key} = {getattr(self, key)!r}")


def hash_pages(view: memoryview, seed: int, unit: int = PAGE_SIZE) -> array:
    """XXH3-64 (keyed by `seed`) of each `unit` bytes of `view`; the last may be short."""
    h = xxhash.xxh3_64_intdigest
    return array("Q", [h(view[i : i + unit], seed) for i in range(0, len(view), unit)])


@dataclass
class RegionHashes:
    """One region's hashes: per 64 KiB block and per page."""

    blocks: array
    pages: array


def rehash(view: memoryview, seed: int, previous: RegionHashes | None) -> tuple[RegionHashes, list[int]]:
    """Hashes of a region and the pages that changed since `previous` (all, without one).

    Only blocks whose hash changed get their pages hashed again.
    """
    block = BLOCK_PAGES * PAGE_SIZE
    blocks = hash_pages(view, seed, block)
    if previous is None or len(previous.blocks) != len(blocks):
        # All pages are new. An all-zero block's pages are all the zero page: take their
        # hash as known instead of hashing them one call each (most of an idle guest).
        zero_block, zero_page = _zero_hashes(seed)
        zero_pages = array("Q", [zero_page] * BLOCK_PAGES)
        pages = array("Q")
        for k, value in enumerate(blocks):
            lo = k * block
            if value == zero_block and lo + block <= len(view):
                pages.extend(zero_pages)
            else:
                pages.extend(hash_pages(view[lo : lo + block], seed))
        return RegionHashes(blocks, pages), list(range(len(pages)))
    pages = array("Q", previous.pages)
    changed: list[int] = []
    for blk in changed_indices(previous.blocks, blocks):
        lo = blk * BLOCK_PAGES
        fresh = hash_pages(view[lo * PAGE_SIZE : (lo + BLOCK_PAGES) * PAGE_SIZE], seed)
        for k, value in enumerate(fresh):
            if pages[lo + k] != value:
                pages[lo + k] = value
                changed.append(lo + k)
    return RegionHashes(blocks, pages), changed


@lru_cache(maxsize=8)
def _zero_hashes(seed: int) -> tuple[int, int]:
    """The keyed hashes of an all-zero hash block and of an all-zero page."""
    h = xxhash.xxh3_64_intdigest
    return h(_ZERO_BLOCK, seed), h(_ZERO_BLOCK[:PAGE_SIZE], seed)


def changed_indices(old: array, new: array) -> list[int]:
    """Indices where two equally long hash arrays differ."""
    if old == new:
        return []
    out: list[int] = []
    for i in range(0, len(new), _DIFF_BLOCK):
        j = min(i + _DIFF_BLOCK, len(new))
        if old[i:j] != new[i:j]:
            out.extend(k for k in range(i, j) if old[k] != new[k])
    return out


@dataclass
class _State:
    fingerprint: str
    layout: tuple[tuple[int, int], ...]  # (gpa, size) of each region
    hashes: list[RegionHashes]
    matches: list[YaraMatch]
    overflow: dict[str, int]
    retry: list[tuple[int, int]] = field(default_factory=list)  # (gpa, end) not scanned last time
    # (gpa, end) a quarantined slow rule's set could not scan last time, by its key
    rule_retry: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


class IncrementalScanner:
    """Scans a guest cycle after cycle, rescanning only pages whose hash changed."""

    def __init__(
        self,
        rules: CompiledRuleSet,
        config: ScanConfig | None = None,
        incremental: IncrementalConfig | None = None,
        seed: int | None = None,
    ) -> None:
        self.scanner = PhysicalScanner(rules, config)
        self.incremental = incremental or IncrementalConfig()
        self._seed = secrets.randbits(64) if seed is None else seed
        self._state: _State | None = None
        self.cycles = 0

    @property
    def rules(self) -> CompiledRuleSet:
        return self.scanner.rules

    @rules.setter
    def rules(self, new: CompiledRuleSet) -> None:
        """A new bundle: the next cycle is a full scan (its fingerprint differs)."""
        self.scanner = PhysicalScanner(new, self.scanner.config)

    @property
    def context(self) -> int:
        ctx = self.incremental.context if self.incremental.context is not None else self.scanner.overlap
        return -(-ctx // PAGE_SIZE) * PAGE_SIZE

    def reset(self) -> None:
        """Forget the last cycle: the next one is a full scan."""
        self._state = None

    # -- one cycle --------------------------------------------------------------------------
    def cycle(self, backend: Backend) -> ScanReport:
        t0 = time.perf_counter()
        layout = tuple((r.gpa, r.size) for r in backend.memory_map)
        hash_problems: list[ScanProblem] = []
        st = self._state
        previous = st.hashes if st is not None and st.layout == layout else None
        hashes, changed = self._hash(backend, hash_problems, previous)
        t_hash = time.perf_counter() - t0
        total_pages = sum(len(h.pages) for h in hashes)
        n_changed = sum(len(c) for c in changed) if previous is not None else None
        self.cycles += 1
        every = self.incremental.full_rescan_every
        if st is None or previous is None or st.fingerprint != self.rules.fingerprint or (
            every and self.cycles % every == 0
        ):
            return self._full(backend, hashes, layout, hash_problems, t0, t_hash, n_changed)

        changed_gpa_pages = sorted(
            (gpa // PAGE_SIZE) + i for (gpa, _size), idx in zip(layout, changed) for i in idx
        )
        affected = [m for m in st.matches if _touches_pages(m, changed_gpa_pages)]
        windows = self._windows(backend, changed, affected, st.retry)
        rescan = sum(e - s for s, e in windows)
        if rescan > self.incremental.max_rescan_fraction * max(1, sum(s for _g, s in layout)):
            return self._full(backend, hashes, layout, hash_problems, t0, t_hash, n_changed)

        acc = _Collector(self.scanner.config)
        acc.problems.extend(hash_problems)
        self.scanner._scan_gpa_ranges(acc, backend, [(s, e - s) for s, e in windows])
        groups = {q.key: q for q in self.rules.quarantine}
        for key, ranges in st.rule_retry.items():
            # same fingerprint, so the same quarantined sets; a window already covered part
            # of these ranges with every rule, and instances found twice are merged below
            if key in groups:
                self.scanner._scan_gpa_ranges(acc, backend, [(s, e - s) for s, e in ranges], only=(groups[key],))
        affected_ids = {id(m) for m in affected}
        keep = [m for m in st.matches if id(m) not in affected_ids]
        known = {(m.key, h.identifier, h.address) for m in keep for h in m.hits}
        merged = _Collector(self.scanner.config)
        for m in keep:
            merged.add(m)
        for m in acc.matches:
            if m.hits:
                fresh = tuple(h for h in m.hits if (m.key, h.identifier, h.address) not in known)
                if not fresh:
                    continue
                if len(fresh) != len(m.hits):
                    m = replace(m, hits=fresh)
            merged.add(m)
        overflow = Counter(st.overflow)
        for key, n in (acc.overflow + merged.overflow).items():
            overflow[key] = max(overflow[key], n)
        self._state = _State(
            fingerprint=self.rules.fingerprint,
            layout=layout,
            hashes=hashes,
            matches=merged.matches,
            overflow=dict(overflow),
            retry=_retry_ranges(acc.problems, self.rules),
            rule_retry=_rule_retry_ranges(acc.problems, self.rules),
        )
        return ScanReport(
            matches=list(merged.matches),
            problems=acc.problems,
            overflow=dict(overflow),
            bytes_scanned=acc.bytes,
            calls=acc.calls,
            seconds=time.perf_counter() - t0,
            fingerprint=self.rules.fingerprint,
            full=False,
            pages_rescanned=sum(-(-(e - s) // PAGE_SIZE) for s, e in windows),
            pages_changed=n_changed,
            pages_total=total_pages,
            extra={"hash_seconds": t_hash, "windows": float(len(windows))},
        )

    # -- parts --------------------------------------------------------------------------------
    def _hash(
        self, backend: Backend, problems: list[ScanProblem], previous: list[RegionHashes] | None
    ) -> tuple[list[RegionHashes], list[list[int]]]:
        hashes: list[RegionHashes] = []
        changed: list[list[int]] = []
        for i, region in enumerate(backend.memory_map):
            try:
                view = backend.view(region.gpa, region.size)
            except SvaError as e:
                # unhashable: give it hashes no real page has, so it counts as changed
                problems.append(ScanProblem(ProblemKind.UNREADABLE, region.gpa, region.end, str(e)))
                n = -(-region.size // PAGE_SIZE)
                hashes.append(RegionHashes(
                    array("Q", [secrets.randbits(64) for _ in range(-(-n // BLOCK_PAGES))]),
                    array("Q", [secrets.randbits(64) for _ in range(n)]),
                ))  # fmt: skip
                changed.append(list(range(n)))
                continue
            try:
                h, c = rehash(view, self._seed, previous[i] if previous is not None else None)
            finally:
                view.release()
            hashes.append(h)
            changed.append(c)
        return hashes, changed

    def _full(
        self,
        backend: Backend,
        hashes: list[RegionHashes],
        layout: tuple[tuple[int, int], ...],
        hash_problems: list[ScanProblem],
        t0: float,
        t_hash: float,
        n_changed: int | None = None,
    ) -> ScanReport:
        if self.incremental.skip_zero_blocks:
            acc = _Collector(self.scanner.config)
            ranges, skipped = self._nonzero_ranges(backend, hashes)
            self.scanner._scan_gpa_ranges(acc, backend, [(s, e - s) for s, e in ranges])
            report = acc.report(t0, self.rules.fingerprint)
        else:
            report, skipped = self.scanner.scan(backend), 0
        report.problems[:0] = hash_problems
        self._state = _State(
            fingerprint=self.rules.fingerprint,
            layout=layout,
            hashes=hashes,
            matches=list(report.matches),
            overflow=dict(report.overflow),
            retry=_retry_ranges(report.problems, self.rules),
            rule_retry=_rule_retry_ranges(report.problems, self.rules),
        )
        report.seconds = time.perf_counter() - t0
        report.full = True
        report.pages_total = sum(len(h.pages) for h in hashes)
        report.pages_rescanned = report.pages_total
        report.pages_changed = n_changed
        report.extra = {"hash_seconds": t_hash, "zero_blocks_skipped": float(skipped)}
        return report

    def _nonzero_ranges(
        self, backend: Backend, hashes: list[RegionHashes]
    ) -> tuple[list[tuple[int, int]], int]:
        """GPA ranges a full scan must cover: every region minus its all-zero 64 KiB blocks
        (the non-zero runs widened by `context`); and how many blocks were left out.

        A block counts as zero when its keyed hash is the zero block's and, checked again
        now, its bytes are all zero (the hash was taken earlier; the guest may be running).
        A block written after that check has a new hash, so the next cycle rescans it.
        """
        block = BLOCK_PAGES * PAGE_SIZE
        zero_hash = _zero_hashes(self._seed)[0]
        ctx = self.context
        out: list[tuple[int, int]] = []
        skipped = 0
        for region, h in zip(backend.memory_map, hashes):
            candidates = [k for k, v in enumerate(h.blocks) if v == zero_hash and (k + 1) * block <= region.size]
            zero: set[int] = set()
            if candidates:
                try:
                    view = backend.view(region.gpa, region.size)
                except SvaError:
                    view = None  # the scan reports it unreadable
                if view is not None:
                    try:
                        # bytes(): a memoryview compares item by item, 20x slower than memcmp
                        zero = {k for k in candidates if bytes(view[k * block : (k + 1) * block]) == _ZERO_BLOCK}
                    finally:
                        view.release()
            skipped += len(zero)
            nonzero = [k for k in range(len(h.blocks)) if k not in zero]
            for first, last in _runs(nonzero):
                lo = max(region.gpa, region.gpa + first * block - ctx)
                hi = min(region.end, region.gpa + (last + 1) * block + ctx)
                out.append((lo, hi))
        return merge_ranges(out), skipped

    def _windows(
        self,
        backend: Backend,
        changed: list[list[int]],
        affected: list[YaraMatch],
        retry: list[tuple[int, int]],
    ) -> list[tuple[int, int]]:
        """GPA ranges to rescan, each inside one region, merged when closer than merge_gap."""
        ctx = self.context
        raw: list[tuple[int, int]] = []
        regions = list(backend.memory_map)
        for region, idx in zip(regions, changed):
            for first, last in _runs(idx):
                raw.append((region.gpa + first * PAGE_SIZE - ctx, region.gpa + (last + 1) * PAGE_SIZE + ctx))
        for m in affected:
            if m.hits:
                lo = min(h.address for h in m.hits)
                hi = max(h.address + h.length for h in m.hits)
                raw.append((max(m.block_start, lo - ctx), min(m.block_end, hi + ctx)))
            else:
                raw.append((m.block_start, m.block_end))
        raw.extend(retry)
        # clip to regions (the context may reach past a region's ends), then merge
        clipped: list[tuple[int, int]] = []
        for s, e in raw:
            for region in regions:
                lo, hi = max(s, region.gpa), min(e, region.end)
                if lo < hi:
                    clipped.append((lo, hi))
        out: list[tuple[int, int]] = []
        gap = self.incremental.merge_gap
        for s, e in merge_ranges(clipped):
            if out and s - out[-1][1] <= gap and _same_region(regions, out[-1][0], e - 1):
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
        return out


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted page indices as (first, last) runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _same_region(regions: list, a: int, b: int) -> bool:
    return any(r.gpa <= a and b < r.end for r in regions)


def _touches_pages(m: YaraMatch, pages: list[int]) -> bool:
    """Whether a match's hits (or its block, without hits) touch any of the sorted pages."""
    if not pages:
        return False
    spans = [(h.address, h.address + max(h.length, 1)) for h in m.hits] or [(m.block_start, m.block_end)]
    for s, e in spans:
        i = bisect.bisect_left(pages, s // PAGE_SIZE)
        if i < len(pages) and pages[i] <= (e - 1) // PAGE_SIZE:
            return True
    return False


def _retry_ranges(problems: list[ScanProblem], rules: CompiledRuleSet) -> list[tuple[int, int]]:
    """Blocks to rescan with every rule: those no rule could scan."""
    quarantined = {q.key for q in rules.quarantine}
    return [(p.start, p.end) for p in problems if p.kind in _RETRY and p.rule not in quarantined]


def _rule_retry_ranges(problems: list[ScanProblem], rules: CompiledRuleSet) -> dict[str, list[tuple[int, int]]]:
    """Blocks to rescan with one quarantined slow rule's set only, by its key."""
    quarantined = {q.key for q in rules.quarantine}
    out: dict[str, list[tuple[int, int]]] = {}
    for p in problems:
        if p.kind in _RETRY and p.rule in quarantined:
            out.setdefault(p.rule, []).append((p.start, p.end))  # type: ignore[arg-type]
    return out
