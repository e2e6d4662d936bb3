"""YARA over guest-physical memory: zero-copy, in large overlapping chunks.

Each RAM region is scanned through a read-only memoryview of the backend's mapping
(`backend.view`). yara-python takes any buffer (`s*`), so a view is scanned in place: no
copy of guest RAM is made (measured: a 64 MiB view scans with no change in RSS, a bytes
copy adds 64 MiB).

Chunks. Every `match()` call evaluates every rule's condition once — about 0.4 ms for
signature-base's 3.3k rules — so page-sized calls are ~20x slower than MiB-sized ones.
Regions are cut into `chunk_size` pieces (16 MiB by default) and each call also sees the
next `overlap` bytes, so a string that starts in a chunk and runs past its end is still
found whole. A string instance that *starts* in that overlap belongs to the next chunk and
is dropped from this one: each instance is reported exactly once. The default overlap is
the rule set's longest possible match: libyara stops regex and hex-string matches after
4096 bytes (RE_SCAN_LIMIT), and text strings are as long as written (`wide` doubles them).
A rule whose strings lie further apart than a chunk will not match across chunks — as it
would not across two processes' pages, which physical memory interleaves anyway.

Each chunk is a YARA "file": `filesize` is the chunk's size and offset 0 its start, which
is why rules anchored on file headers rarely mean anything here (CompiledRuleSet.file_only).

Guest memory is hostile: each call has a timeout (libyara's `timeout=`, whole seconds),
matches kept per rule, hits kept per match and bytes kept per hit are bounded, and every
chunk that could not be scanned (timeout, unreadable memory, libyara error) becomes a
ScanProblem in the report, never a silent gap.

Per-rule timeouts. libyara's timeout is per match() call and covers every rule of the
call: one pathological rule that runs out of time on a block would lose every rule's
results for it. So the rules the load-time slow-rule check flags (and keeps) are compiled
apart (CompiledRuleSet.quarantine: each slow rule with the rules that use it and the
private rules it needs, in its own namespace). Each block is scanned with the fast main
set (`timeout_s`), then once with each quarantined set (`slow_rule_timeout_s`). A timeout
there is a TIMEOUT problem naming the rule (`ScanProblem.rule`); every other rule's
results for the block stand, and the incremental scanner retries only that rule on that
block. One set per slow rule, not one set of all of them, so that a timeout blames one
rule and costs only its results. The price is one more pass of libyara's string search
over the block per slow rule, and slow rules no longer share atom work: measured on
yara-rules (its six `Big_Numbers*` regexes flagged; 64 MiB of synthetic memory, shared
2-core host) 1.9 MiB/s scanned apart against 2.3 MiB/s in one set — about 18 % slower on
a set its slow rules dominate, where the rest alone runs at ~160 MiB/s. Without slow
rules a block is one match() call, exactly as before.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import yara

from sva.errors import ConfigError, SvaError
from sva.scan.rules import CompiledRuleSet, QuarantinedRules, techniques
from sva.vmi.base import PAGE_SIZE, Backend, MemoryRegion

MiB = 1 << 20


@dataclass(frozen=True)
class ScanConfig:
    """How a scan cuts memory and what it keeps. Every bound is there for hostile guests."""

    chunk_size: int = 16 * MiB  # bytes per match() call (plus the overlap)
    overlap: int | None = None  # None: the rule set's longest possible match (>= 4096)
    timeout_s: int = 60  # per match() call; libyara counts whole seconds
    slow_rule_timeout_s: int = 5  # per quarantined slow rule and block (CompiledRuleSet.quarantine)
    max_matches_per_rule: int = 256  # YaraMatch objects kept per rule and scan
    max_matches_total: int = 10_000  # over all rules
    max_hits_per_match: int = 32  # string instances kept per YaraMatch
    max_data: int = 64  # bytes of matched data kept per string instance
    fast: bool = False  # libyara fast mode: one instance per string and chunk

    def __post_init__(self) -> None:
        checks = {
            "chunk_size": self.chunk_size >= 64 * 1024 and self.chunk_size % PAGE_SIZE == 0,
            "overlap": self.overlap is None or 0 <= self.overlap < self.chunk_size,
            "timeout_s": self.timeout_s >= 1,
            "slow_rule_timeout_s": self.slow_rule_timeout_s >= 1,
            "max_matches_per_rule": self.max_matches_per_rule >= 1,
            "max_matches_total": self.max_matches_total >= 1,
            "max_hits_per_match": self.max_hits_per_match >= 1,
            "max_data": self.max_data >= 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"scan config: bad {key} = {getattr(self, key)!r}")


class ProblemKind(str, Enum):
    TIMEOUT = "timeout"  # libyara gave up on the block: nothing from it (from `rule` only, when set)
    TOO_MANY_MATCHES = "too_many_matches"  # a string hit libyara's per-string limit
    UNREADABLE = "unreadable"  # not guest RAM, or the backing went away
    SCAN_ERROR = "scan_error"  # any other libyara error for the block


@dataclass(frozen=True)
class ScanProblem:
    """A block of memory that was not (fully) scanned, and why."""

    kind: ProblemKind
    start: int  # address of the block (guest-physical for backend scans)
    end: int
    message: str
    rule: str | None = None  # namespace:rule, when one rule is to blame

    def __str__(self) -> str:
        return f"{self.kind.value} in 0x{self.start:x}-0x{self.end:x}: {self.message}"

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind.value, "start": self.start, "end": self.end, "message": self.message,
                "rule": self.rule}  # fmt: skip


@dataclass(frozen=True)
class StringHit:
    """One instance of a rule's string."""

    identifier: str  # "$marker"
    address: int  # guest-physical address of its first byte (base_address-relative for scan_buffer)
    length: int  # bytes matched
    data: bytes  # the first max_data of them

    def to_json(self) -> dict[str, object]:
        return {"identifier": self.identifier, "address": self.address, "length": self.length,
                "data": self.data.hex()}  # fmt: skip


@dataclass(frozen=True)
class YaraMatch:
    """A rule that matched one scanned block (a chunk or a rescanned window)."""

    namespace: str
    rule: str
    tags: tuple[str, ...]
    meta: Mapping[str, object] = field(hash=False)
    hits: tuple[StringHit, ...] = ()  # in address order
    block_start: int = 0  # the block the rule's condition was evaluated on
    block_end: int = 0
    hits_omitted: int = 0  # instances beyond max_hits_per_match

    @property
    def key(self) -> str:
        return f"{self.namespace}:{self.rule}"

    @property
    def author(self) -> str | None:
        v = self.meta.get("author")
        return None if v is None else str(v)

    @property
    def reference(self) -> str | None:
        v = self.meta.get("reference")
        return None if v is None else str(v)

    @property
    def description(self) -> str | None:
        v = self.meta.get("description")
        return None if v is None else str(v)

    @property
    def techniques(self) -> tuple[str, ...]:
        return techniques(self.meta, self.tags)

    @property
    def addresses(self) -> tuple[int, ...]:
        return tuple(h.address for h in self.hits)

    def touches(self, start: int, end: int) -> bool:
        """Whether any kept hit (or, without hits, the block) overlaps [start, end)."""
        if not self.hits:
            return self.block_start < end and start < self.block_end
        return any(h.address < end and start < h.address + max(h.length, 1) for h in self.hits)

    def to_json(self) -> dict[str, object]:
        return {
            "rule": self.key,
            "tags": list(self.tags),
            "meta": {k: v for k, v in self.meta.items()},
            "author": self.author,
            "reference": self.reference,
            "techniques": list(self.techniques),
            "block": [self.block_start, self.block_end],
            "hits": [h.to_json() for h in self.hits],
            "hits_omitted": self.hits_omitted,
        }


@dataclass
class ScanReport:
    """What one scan (or one incremental cycle) found and what it could not scan."""

    matches: list[YaraMatch]
    problems: list[ScanProblem]
    overflow: dict[str, int]  # namespace:rule (or "*" for the total cap) -> matches not kept
    bytes_scanned: int  # distinct bytes handed to libyara (overlaps counted once)
    calls: int  # match() calls
    seconds: float
    fingerprint: str  # of the rule set used
    full: bool = True  # False for an incremental cycle that rescanned only changed pages
    pages_rescanned: int | None = None  # incremental: pages handed to libyara this cycle
    pages_changed: int | None = None  # incremental: pages whose hash changed
    pages_total: int | None = None
    extra: dict[str, float] = field(default_factory=dict)  # timings of the parts, for benchmarks

    def by_rule(self) -> dict[str, list[YaraMatch]]:
        out: dict[str, list[YaraMatch]] = {}
        for m in self.matches:
            out.setdefault(m.key, []).append(m)
        return out

    @property
    def rules_matched(self) -> set[str]:
        return {m.key for m in self.matches}

    def hit_addresses(self, key: str) -> list[int]:
        """Every kept hit address of rule `namespace:rule`, sorted."""
        return sorted(h.address for m in self.matches if m.key == key for h in m.hits)

    def to_json(self) -> dict[str, object]:
        return {
            "matches": [m.to_json() for m in self.matches],
            "problems": [p.to_json() for p in self.problems],
            "overflow": dict(self.overflow),
            "bytes_scanned": self.bytes_scanned,
            "calls": self.calls,
            "seconds": self.seconds,
            "fingerprint": self.fingerprint,
            "full": self.full,
            "pages_rescanned": self.pages_rescanned,
            "pages_changed": self.pages_changed,
            "pages_total": self.pages_total,
        }


class _Collector:
    """Matches, problems and counts of one scan, with the caps applied."""

    def __init__(self, config: ScanConfig) -> None:
        self.config = config
        self.matches: list[YaraMatch] = []
        self.problems: list[ScanProblem] = []
        self.overflow: Counter[str] = Counter()
        self.per_rule: Counter[str] = Counter()
        self.bytes = 0
        self.calls = 0

    def add(self, m: YaraMatch) -> None:
        if self.per_rule[m.key] >= self.config.max_matches_per_rule:
            self.overflow[m.key] += 1
        elif len(self.matches) >= self.config.max_matches_total:
            self.overflow["*"] += 1
        else:
            self.per_rule[m.key] += 1
            self.matches.append(m)

    def problem(self, kind: ProblemKind, start: int, end: int, message: str, rule: str | None = None) -> None:
        self.problems.append(ScanProblem(kind, start, end, message, rule))

    def report(self, t0: float, fingerprint: str) -> ScanReport:
        return ScanReport(
            matches=self.matches,
            problems=self.problems,
            overflow=dict(self.overflow),
            bytes_scanned=self.bytes,
            calls=self.calls,
            seconds=time.perf_counter() - t0,
            fingerprint=fingerprint,
        )


class PhysicalScanner:
    """Scans guest RAM (or any buffer) with a CompiledRuleSet."""

    def __init__(self, rules: CompiledRuleSet, config: ScanConfig | None = None) -> None:
        self.rules = rules
        self.config = config or ScanConfig()
        self.overlap = self.config.overlap if self.config.overlap is not None else rules.longest_literal
        if self.overlap >= self.config.chunk_size:
            raise ConfigError(
                f"scan config: overlap {self.overlap} (the rule set's longest match) must be smaller "
                f"than chunk_size {self.config.chunk_size}"
            )

    # -- public entry points --------------------------------------------------------------
    def scan(self, backend: Backend) -> ScanReport:
        """Every RAM region of `backend`, chunk by chunk."""
        t0 = time.perf_counter()
        acc = _Collector(self.config)
        for region in backend.memory_map:
            self._scan_region_span(acc, backend, region, 0, region.size)
        return acc.report(t0, self.rules.fingerprint)

    def scan_ranges(self, backend: Backend, ranges: Iterable[tuple[int, int]]) -> ScanReport:
        """The guest-physical ranges [(gpa, size), …] — e.g. one process's pages.

        Overlapping and touching ranges are merged first, so a string across two adjacent
        pages is found. Parts outside guest RAM are reported as UNREADABLE problems.
        """
        t0 = time.perf_counter()
        spans = []
        for gpa, size in ranges:
            if gpa < 0 or size < 0:
                raise ValueError(f"bad range 0x{gpa:x}+{size}")
            spans.append((gpa, size))
        acc = _Collector(self.config)
        self._scan_gpa_ranges(acc, backend, spans)
        return acc.report(t0, self.rules.fingerprint)

    def scan_buffer(self, buf: bytes | bytearray | memoryview, base_address: int = 0) -> ScanReport:
        """Any bytes-like buffer (scanned in place); hit addresses are base_address + offset."""
        t0 = time.perf_counter()
        acc = _Collector(self.config)
        with memoryview(buf) as mv, mv.cast("B") as view:
            self._scan_span(acc, view, base_address, 0, len(view))
        return acc.report(t0, self.rules.fingerprint)

    # -- internals (also used by IncrementalScanner) ---------------------------------------
    # `only`: scan with just these quarantined sets (a retry of slow rules); None: all rules.
    def _scan_gpa_ranges(
        self, acc: _Collector, backend: Backend, ranges: Iterable[tuple[int, int]],
        only: tuple[QuarantinedRules, ...] | None = None,
    ) -> None:
        for start, end in merge_ranges((gpa, gpa + size) for gpa, size in ranges):
            pos = start
            for region in backend.memory_map:
                lo, hi = max(start, region.gpa), min(end, region.end)
                if lo >= hi:
                    continue
                if lo > pos:
                    acc.problem(ProblemKind.UNREADABLE, pos, lo, "not guest RAM")
                self._scan_region_span(acc, backend, region, lo - region.gpa, hi - region.gpa, only)
                pos = hi
            if pos < end:
                acc.problem(ProblemKind.UNREADABLE, pos, end, "not guest RAM")

    def _scan_region_span(
        self, acc: _Collector, backend: Backend, region: MemoryRegion, lo: int, hi: int,
        only: tuple[QuarantinedRules, ...] | None = None,
    ) -> None:
        """Bytes [lo, hi) of `region` (offsets within it), through a zero-copy view."""
        try:
            view = backend.view(region.gpa + lo, hi - lo)
        except SvaError as e:
            acc.problem(ProblemKind.UNREADABLE, region.gpa + lo, region.gpa + hi, str(e))
            return
        try:
            self._scan_span(acc, view, region.gpa + lo, 0, hi - lo, only)
        finally:
            view.release()

    def _scan_span(
        self, acc: _Collector, view: memoryview, base: int, start: int, end: int,
        only: tuple[QuarantinedRules, ...] | None = None,
    ) -> None:
        """Scan view[start:end] (addresses base + offset) in overlapping chunks."""
        chunk, overlap = self.config.chunk_size, self.overlap
        pos = start
        while pos < end:
            nominal = pos + chunk
            if nominal + overlap >= end:
                nominal = end  # the rest fits in this call: no tiny last chunk
            stop = min(nominal + overlap, end)
            # Instances starting at or after `nominal` are the next chunk's to report.
            with view[pos:stop] as data:
                self._scan_chunk(acc, data, base + pos, owned=nominal - pos, only=only)
            acc.bytes += nominal - pos
            pos = nominal

    def _scan_chunk(
        self, acc: _Collector, data: memoryview, address: int, owned: int,
        only: tuple[QuarantinedRules, ...] | None = None,
    ) -> None:
        """One block: the main set, then each quarantined slow-rule set with its own timeout."""
        if only is None:
            self._match(acc, self.rules.fast_rules, None, data, address, owned)
        for q in self.rules.quarantine if only is None else only:
            self._match(acc, q.compiled, q, data, address, owned)

    def _match(
        self, acc: _Collector, rules: yara.Rules, group: QuarantinedRules | None,
        data: memoryview, address: int, owned: int,
    ) -> None:
        cfg = self.config
        end = address + len(data)
        timeout = cfg.timeout_s if group is None else cfg.slow_rule_timeout_s

        def on_warning(kind: int, what: object) -> int:
            if kind == yara.CALLBACK_TOO_MANY_MATCHES:
                ns, rule, ident = (getattr(what, a, "?") for a in ("namespace", "rule", "string"))
                if group is not None and rule not in group.reports:
                    return yara.CALLBACK_CONTINUE  # the main set's call reports that one
                acc.problem(
                    ProblemKind.TOO_MANY_MATCHES, address, end,
                    f"string {ident} of {ns}:{rule} hit libyara's per-string match limit; "
                    "later instances in this block are missing",
                    rule=f"{ns}:{rule}",
                )  # fmt: skip
            return yara.CALLBACK_CONTINUE

        acc.calls += 1
        try:
            found = rules.match(data=data, timeout=timeout, fast=cfg.fast, warnings_callback=on_warning)
        except yara.TimeoutError:
            if group is None:
                acc.problem(ProblemKind.TIMEOUT, address, end, f"libyara timed out after {timeout} s; block not scanned")
            else:
                acc.problem(
                    ProblemKind.TIMEOUT, address, end,
                    f"slow rule {group.key} timed out after {timeout} s; no results from "
                    f"{', '.join(group.keys)} for this block (the other rules' stand)",
                    rule=group.key,
                )  # fmt: skip
            return
        except yara.Error as e:
            acc.problem(ProblemKind.SCAN_ERROR, address, end, f"libyara: {e}", rule=None if group is None else group.key)
            return
        for m in found:
            if group is not None and m.rule not in group.reports:
                continue  # a public rule the slow one uses: the main set reports it
            hits: list[StringHit] = []
            total = 0
            any_instance = False
            for s in m.strings:
                for inst in s.instances:
                    any_instance = True
                    if inst.offset >= owned:
                        continue
                    total += 1
                    if len(hits) < cfg.max_hits_per_match:
                        hits.append(StringHit(
                            s.identifier, address + inst.offset, inst.matched_length,
                            bytes(inst.matched_data[: cfg.max_data]),
                        ))  # fmt: skip
            if any_instance and total == 0:
                continue  # every instance lies in the overlap: the next chunk reports the rule
            hits.sort(key=lambda h: (h.address, h.identifier))
            acc.add(YaraMatch(
                namespace=m.namespace, rule=m.rule, tags=tuple(m.tags), meta=dict(m.meta),
                hits=tuple(hits), block_start=address, block_end=end, hits_omitted=total - len(hits),
            ))  # fmt: skip


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) ranges sorted, with overlapping and touching ones merged; empty dropped."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if start < 0:
            raise ValueError(f"negative address 0x{start:x}")
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
