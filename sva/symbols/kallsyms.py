"""Recover a Linux kernel's symbol table (kallsyms) from a vmlinux image or guest RAM.

Distribution kernels ship without a usable System.map (Debian's is an 83-byte stub), but
every kernel built with CONFIG_KALLSYMS carries its own compressed symbol table in
.rodata. `scripts/kallsyms.c` lays it out as a run of 8-byte-aligned arrays, in one of
two orders:

  addresses-first (up to Linux 6.3, and Debian's 6.1):
      offsets (s32 x n) | relative_base (u64) | num_syms | names | markers (u32 x n/256)
      | [seqs_of_names (3 bytes x n), Debian 6.1 has the 6.2 backport] | token_table
      | token_index (u16 x 256)
  names-first (6.4 and later):
      num_syms | names | markers | token_table | token_index | offsets | relative_base
      | seqs_of_names

With CONFIG_KALLSYMS_BASE_RELATIVE=n, `offsets` + `relative_base` are replaced by
`addresses` (u64 x n).

The search anchors on the token table: every character that occurs in a symbol name owns
the token slot of its own code, so the table always contains "0\\0" "1\\0" ... "9\\0" at
slots 0x30..0x39. That 20-byte literal is found with a C-speed scan; each hit is then
checked against `token_index`, the num_syms/markers/names stream around it is located
by arithmetic, and the candidate is accepted only if every name decodes, every marker
matches the stream, and the addresses come out sorted. Anything else rejects the
candidate; nothing in guest memory is trusted for a length or a count before it is
bounded.

Addresses (base-relative, x86-64 with CONFIG_KALLSYMS_ABSOLUTE_PERCPU): an offset < 0 is
relative, address = relative_base - 1 - offset; an offset >= 0 is an absolute value
(the per-CPU symbols, which x86-64 links at 0). Without ABSOLUTE_PERCPU every offset is
an unsigned distance from relative_base. In guest RAM `relative_base` has been relocated
by KASLR, so relative symbols come out at their run-time addresses and absolute ones
unchanged.
"""

from __future__ import annotations

import bisect
import re
import struct
import sys
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from sva.errors import SymbolsError
from sva.vmi.base import Backend, MemoryRegion

MIN_SYMS = 256  # a kernel with fewer symbols than this is not worth recognising
MAX_SYMS = 1_000_000  # real kernels hold < 300k (Debian 6.1 cloud: 87k)
MAX_NAME_ENTRY = 2 + 1024  # length header + compressed bytes of one symbol (KSYM_NAME_LEN 512)
MAX_NAME_LEN = 1024  # decoded characters of one name, type letter included
MAX_CANDIDATES = 64  # token-table anchors examined per source before giving up
MAX_NUM_SYMS_PROBES = 256  # num_syms positions tried per token table
SEARCH_SECONDS = 20.0  # wall-clock cap on one source's search, whatever the data
KERNEL_HALF = 0xFFFF_8000_0000_0000  # lowest kernel-space address on x86-64 (and arm64)
PAGE_MASK = 0xFFF

# Token slots 0x30..0x39 hold the digits themselves (see the module docstring).
_DIGITS_ANCHOR = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
_DIGITS_SLOT = 0x30
_DIGITS_RE = re.compile(re.escape(_DIGITS_ANCHOR))
# A kernel address's top two bytes (ff ff) then a u32 num_syms < 2**24 and 4 zero pad
# bytes: the tail of `relative_base`/`addresses` followed by `num_syms` (addresses-first).
# A literal prefix keeps the regex engine on its fast path; consuming only one byte keeps
# overlapping hits (ff ff ff ff before a count) from hiding the real one.
_BASE_THEN_COUNT_RE = re.compile(rb"\xff(?=\xff[\x00-\xff]{3}\x00{5})")
_NAMES_RE = re.compile(rb"(?:[A-Za-z][\x21-\x7e]+\n)*")
_TOKEN_RE = re.compile(rb"[\x21-\x7e]*")
_DATA_TYPES = frozenset("dDbBrR")

_LITTLE = sys.byteorder == "little"


class Layout(StrEnum):
    """How symbol addresses are stored."""

    BASE_RELATIVE = "base-relative"  # s32 offsets + relative_base (CONFIG_KALLSYMS_BASE_RELATIVE)
    ABSOLUTE = "absolute"  # one u64 address per symbol


class TableOrder(StrEnum):
    """Which order scripts/kallsyms.c wrote the arrays in."""

    ADDRESSES_FIRST = "addresses-first"  # Linux <= 6.3
    NAMES_FIRST = "names-first"  # Linux >= 6.4


@dataclass(frozen=True)
class KernelSymbol:
    """One kallsyms entry. `absolute` marks values not relative to the kernel base
    (x86-64 per-CPU offsets): KASLR does not move them."""

    name: str
    address: int
    type: str  # nm-style letter: T/t text, D/d data, B/b bss, R/r rodata, A absolute, W weak
    absolute: bool = False


@dataclass(frozen=True)
class KallsymsLocation:
    """Where each array was found: file offsets for an image, guest-physical addresses
    for memory. `None` for arrays the layout does not have."""

    num_syms: int
    names: int
    markers: int
    token_table: int
    token_index: int
    offsets: int | None  # kallsyms_offsets (base-relative) or kallsyms_addresses
    relative_base: int | None
    seqs_of_names: int | None

    @property
    def start(self) -> int:
        """The lowest offset of the table."""
        return min(v for v in (self.num_syms, self.offsets) if v is not None)


@dataclass(frozen=True)
class Kallsyms:
    """A kernel's symbol table, in the kernel's own (address) order."""

    source: str
    symbols: tuple[KernelSymbol, ...]
    layout: Layout
    order: TableOrder
    location: KallsymsLocation
    relative_base: int | None  # as stored: relocated by KASLR when read from RAM
    absolute_percpu: bool  # CONFIG_KALLSYMS_ABSOLUTE_PERCPU: offsets >= 0 are absolute
    has_seqs_of_names: bool
    kaslr_slide: int | None = None  # run-time minus link-time `_text`, when both are known
    _by_name: dict[str, KernelSymbol] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _sorted_addrs: list[int] = field(default_factory=list, init=False, repr=False, compare=False)
    _sorted_syms: tuple[KernelSymbol, ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        by_name: dict[str, KernelSymbol] = {}
        for sym in self.symbols:
            by_name.setdefault(sym.name, sym)  # duplicates (static symbols): first wins
        ordered = tuple(sorted(self.symbols, key=lambda s: s.address))
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_sorted_syms", ordered)
        object.__setattr__(self, "_sorted_addrs", [s.address for s in ordered])

    @property
    def num_syms(self) -> int:
        return len(self.symbols)

    @property
    def offset(self) -> int:
        """Where the table starts (file offset or guest-physical address)."""
        return self.location.start

    @property
    def has_data_symbols(self) -> bool:
        """True when data symbols are present (CONFIG_KALLSYMS_ALL): without it only
        text symbols are recorded, and names like `init_task` cannot be resolved."""
        data = sum(1 for s in self.symbols if s.type in _DATA_TYPES)
        return data >= max(16, len(self.symbols) // 100)

    @property
    def text_base(self) -> int | None:
        """The address of `_text` (the kernel base), or relative_base without it."""
        sym = self._by_name.get("_text")
        return sym.address if sym is not None else self.relative_base

    @property
    def by_address(self) -> tuple[KernelSymbol, ...]:
        """All symbols sorted by address (stable: table order among equals)."""
        return self._sorted_syms

    def lookup(self, name: str) -> KernelSymbol | None:
        """The first symbol called `name`, or None."""
        return self._by_name.get(name)

    def lookup_all(self, name: str) -> list[KernelSymbol]:
        """Every symbol called `name` (static functions repeat across files)."""
        return [s for s in self.symbols if s.name == name]

    def address(self, name: str) -> int:
        """The address of `name`; SymbolsError when the table lacks it."""
        sym = self._by_name.get(name)
        if sym is None:
            why = "" if self.has_data_symbols else (
                " (this kernel records text symbols only: CONFIG_KALLSYMS_ALL is off)"
            )
            raise SymbolsError(self.source, f"no symbol {name!r} in kallsyms{why}")
        return sym.address

    def symbol_at(self, address: int) -> KernelSymbol | None:
        """The symbol at or nearest below `address`, or None below the first one."""
        i = bisect.bisect_right(self._sorted_addrs, address) - 1
        return self._sorted_syms[i] if i >= 0 else None

    def __iter__(self) -> Iterator[KernelSymbol]:
        return iter(self.symbols)

    def __len__(self) -> int:
        return len(self.symbols)


# -- public entry points ----------------------------------------------------------------


def kallsyms_from_image(vmlinux: bytes, source: str) -> Kallsyms:
    """Find and decode kallsyms in a decompressed kernel (a vmlinux ELF, or raw bytes).

    For an ELF the search is limited to .rodata (falling back to the whole file when
    there is no such section); offsets in the result are file offsets. Addresses are
    link-time ones, so `kaslr_slide` is None.
    """
    buf = memoryview(vmlinux).cast("B")
    if len(buf) > 0x206 and bytes(buf[0x202:0x206]) == b"HdrS":
        raise SymbolsError(
            source, "a compressed bzImage: unpack it first (sva.symbols.kimage.load_kernel_image)"
        )
    lo, hi = _elf_section_range(buf, b".rodata", source) or (0, len(buf))
    return _search(buf, 0, lo, hi, source, hint_text_base=None)


def kallsyms_from_memory(
    backend: Backend, source: str, hint_text_base: int | None = None
) -> Kallsyms:
    """Find and decode kallsyms in guest-physical memory.

    Each RAM region is scanned zero-copy, in address order; the first valid table wins.
    `hint_text_base` is the kernel's link-time `_text` (for example
    `kallsyms_from_image(...).text_base`); with it `kaslr_slide` is reported.
    Offsets in the result are guest-physical addresses.
    """
    deadline = time.monotonic() + SEARCH_SECONDS
    first: SymbolsError | None = None
    for region, view in _region_views(backend):
        try:
            return _search(view, region.gpa, 0, len(view), source, hint_text_base, deadline)
        except SymbolsError as e:
            if time.monotonic() > deadline:
                raise
            if first is None or (first.offset is None and e.offset is not None):
                first = e
    why = first.reason if first is not None else "no RAM regions"
    raise SymbolsError(
        source, f"no kallsyms table in guest memory: {why}", None if first is None else first.offset
    )


# -- search -----------------------------------------------------------------------------


class _Reject(Exception):
    """A candidate failed a check; carries the reason and where."""

    def __init__(self, where: int, why: str) -> None:
        super().__init__(why)
        self.where = where
        self.why = why


@dataclass
class _Scan:
    """One search: the bytes, which part to search, and how to report positions."""

    buf: memoryview
    base: int  # added to buffer offsets in results and errors (0, or a region's GPA)
    lo: int  # search and read only inside buf[lo:hi]
    hi: int
    source: str
    hint_text_base: int | None
    deadline: float

    def check_time(self, where: int) -> None:
        if time.monotonic() > self.deadline:
            raise SymbolsError(
                self.source, f"kallsyms search gave up after {SEARCH_SECONDS}s", self.base + where
            )


@dataclass
class _Tokens:
    table: int  # start of kallsyms_token_table
    index: int  # start of kallsyms_token_index
    end: int  # one past token_index
    tokens: list[bytes]


def _search(
    buf: memoryview, base: int, lo: int, hi: int, source: str, hint_text_base: int | None,
    deadline: float | None = None,
) -> Kallsyms:
    """Scan buf[lo:hi] for a kallsyms table; `base` maps buffer offsets to reported ones."""
    if deadline is None:
        deadline = time.monotonic() + SEARCH_SECONDS
    scan = _Scan(buf, base, lo, hi, source, hint_text_base, deadline)
    first_reject: _Reject | None = None
    seen = 0
    for m in _DIGITS_RE.finditer(buf, lo, hi):
        seen += 1
        if seen > MAX_CANDIDATES:
            break
        scan.check_time(m.start())
        try:
            tok = _token_table_at(buf, m.start(), lo, hi)
            return _table_around(scan, tok)
        except _Reject as r:
            first_reject = first_reject or r
        except (IndexError, ValueError, struct.error, OverflowError) as e:  # belt and braces
            first_reject = first_reject or _Reject(m.start(), f"malformed data ({e})")
    if first_reject is None:
        raise SymbolsError(source, "no kallsyms token table found")
    raise SymbolsError(
        source,
        f"no valid kallsyms table ({seen} candidate(s)); first rejected: {first_reject.why}",
        base + first_reject.where,
    )


def _token_table_at(buf: memoryview, digits: int, lo: int, hi: int) -> _Tokens:
    """Check the token table whose '0' token sits at `digits`; read its index after it."""
    # Walk forward over tokens 0x30..0xff to find the end of the table.
    pos = digits
    for _ in range(256 - _DIGITS_SLOT):
        nul = _find_nul(buf, pos, min(hi, pos + 1024))
        if nul < 0:
            raise _Reject(pos, "token table entry not terminated")
        pos = nul + 1
    index = _align8(pos)
    if index + 512 > hi:
        raise _Reject(index, "token index runs past the end of the data")
    idx = struct.unpack_from("<256H", buf, index)
    table = digits - idx[_DIGITS_SLOT]
    if idx[0] != 0 or table < lo or table % 8:
        raise _Reject(index, "token index does not point at the token table")
    if table + idx[255] >= pos or pos - table > 256 * 1024:
        raise _Reject(index, "token index runs past the token table")
    raw = bytes(buf[table:pos])
    tokens: list[bytes] = []
    expect = 0
    for i in range(256):
        if idx[i] != expect:
            raise _Reject(index + 2 * i, f"token index entry {i} is {idx[i]}, expected {expect}")
        nul = raw.find(b"\0", expect)
        if nul < 0:
            raise _Reject(table + expect, f"token {i} not terminated")
        tok = raw[expect:nul]
        if not _TOKEN_RE.fullmatch(tok):
            raise _Reject(table + expect, f"token {i} holds non-symbol characters")
        tokens.append(tok)
        expect = nul + 1
    if expect != len(raw):
        raise _Reject(table + expect, "token table has trailing bytes")
    for c in b"0123456789":
        if tokens[c] != bytes([c]):
            raise _Reject(table, "digit tokens are not in their own slots")
    return _Tokens(table=table, index=index, end=index + 512, tokens=tokens)


def _table_around(scan: _Scan, tok: _Tokens) -> Kallsyms:
    """Locate num_syms/names/markers for a checked token table, in either order."""
    first: _Reject | None = None
    for finder in (_addresses_first, _names_first):
        try:
            return finder(scan, tok)
        except _Reject as r:
            first = first or r
    assert first is not None
    raise first


def _addresses_first(scan: _Scan, tok: _Tokens) -> Kallsyms:
    """num_syms sits right after a kernel address (relative_base or the last address)."""
    buf, lo = scan.buf, scan.lo
    window_lo = max(lo, tok.table - (MAX_SYMS * 20))
    probes = 0
    first: _Reject | None = None
    # Nearest first: the real num_syms is usually within a couple of MiB of the tokens.
    hits = [m.start() + 2 for m in _BASE_THEN_COUNT_RE.finditer(buf, window_lo, tok.table)]
    for q in reversed(hits):
        if q % 8 or q - 8 < lo:
            continue
        n = _u64(buf, q)
        if not MIN_SYMS <= n <= MAX_SYMS or q + 8 + 2 * n > tok.table:
            continue
        probes += 1
        if probes > MAX_NUM_SYMS_PROBES:
            break
        scan.check_time(q)
        try:
            names = _names_at(buf, tok.table, q, n)
            seqs = _seqs_before_tokens(buf, names, n, tok)
            return _with_addresses(scan, tok, names, seqs, q, n, TableOrder.ADDRESSES_FIRST)
        except _Reject as r:
            first = first or r
    raise first or _Reject(tok.table, "no num_syms found before the token table")


def _names_first(scan: _Scan, tok: _Tokens) -> Kallsyms:
    """markers end right before the token table; num_syms precedes the names."""
    buf, lo = scan.buf, scan.lo
    first: _Reject | None = None
    for end in (tok.table, tok.table - 4):
        if end - 4 < lo or (end != tok.table and _u32(buf, end) != 0):
            continue
        markers_start, markers = _markers_ending_at(buf, lo, end)
        if markers_start is None:
            continue
        m = len(markers)
        n_lo, n_hi = 256 * (m - 1) + 1, 256 * m
        if n_hi < MIN_SYMS:
            continue
        # names_end lies in (markers_start - 8, markers_start] and beyond markers[-1].
        last = markers[-1]
        q_hi = markers_start - last - 10  # the last marked entry needs >= 2 bytes
        q_lo = max(lo, markers_start - last - 256 * MAX_NAME_ENTRY - 16)
        q_hi -= q_hi % 8
        q = q_hi
        probes = 0
        while q >= q_lo:
            n = _u64(buf, q)
            if n_lo <= n <= n_hi and n >= MIN_SYMS:
                probes += 1
                if probes > MAX_NUM_SYMS_PROBES:
                    break
                scan.check_time(q)
                try:
                    names = _names_at(buf, tok.table, q, n)
                    if names.markers != markers_start:
                        raise _Reject(names.markers, "names do not end at the markers")
                    # seqs_of_names follows the addresses in this order: found there.
                    return _with_addresses(scan, tok, names, None, q, n, TableOrder.NAMES_FIRST)
                except _Reject as r:
                    first = first or r
            q -= 8
    raise first or _Reject(tok.table, "no markers array before the token table")


def _markers_ending_at(buf: memoryview, lo: int, end: int) -> tuple[int | None, list[int]]:
    """Walk a strictly increasing u32 array backwards from `end` down to its 0 entry."""
    values: list[int] = []
    pos = end - 4
    prev = None
    limit = MAX_SYMS // 256 + 1
    while pos >= lo and len(values) <= limit:
        v = _u32(buf, pos)
        if prev is not None and v >= prev:
            return None, []
        values.append(v)
        if v == 0:
            if pos % 8:
                return None, []
            values.reverse()
            return pos, values
        prev = v
        pos -= 4
    return None, []


@dataclass
class _Names:
    start: int  # first byte of kallsyms_names
    end: int  # one past the last entry
    markers: int  # start of kallsyms_markers
    markers_end: int
    marker_size: int  # 4 or 8 bytes
    entries: list[tuple[int, int]]  # (offset in names, compressed length) per symbol


def _names_at(buf: memoryview, limit: int, q: int, n: int) -> _Names:
    """Walk the names stream of `n` entries after num_syms at `q`; check the markers."""
    start = q + 8
    if _u32(buf, q + 4) != 0:
        raise _Reject(q, "num_syms is not followed by padding")
    stop = min(limit, start + n * MAX_NAME_ENTRY)
    if start >= stop:
        raise _Reject(q, "no room for the names stream")
    raw = bytes(buf[start:stop])
    size = len(raw)
    entries: list[tuple[int, int]] = []
    append = entries.append
    marks: list[int] = []
    p = 0
    for i in range(n):
        if not i & 0xFF:
            marks.append(p)
        if p >= size:
            raise _Reject(start + p, f"names stream ends after {len(entries)} of {n} symbols")
        ln = raw[p]
        if ln & 0x80:  # "big" symbols: 2-byte little-endian base-128 length
            if p + 1 >= size:
                raise _Reject(start + p, "names stream truncated in a length")
            ln = (ln & 0x7F) | (raw[p + 1] << 7)
            p += 2
        else:
            p += 1
        if ln == 0 or ln > MAX_NAME_ENTRY:
            raise _Reject(start + p, f"symbol {len(entries)} has compressed length {ln}")
        append((p, ln))
        p += ln
    if p > size:
        raise _Reject(start + size, "names stream runs past the token table")
    end = start + p
    markers = _align8(end)
    m = (n + 255) // 256
    first: _Reject | None = None
    # u32 markers in current kernels (Debian 6.1 included); older ones used `unsigned long`.
    for width, code in ((4, "I"), (8, "Q")):
        markers_end = markers + width * m
        if markers_end > limit:
            first = first or _Reject(markers, "markers run into the token table")
            continue
        got = struct.unpack_from(f"<{m}{code}", buf, markers)
        bad = next((i for i, (v, want) in enumerate(zip(got, marks)) if v != want), None)
        if bad is None:
            return _Names(start, end, markers, markers_end, width, entries)
        first = first or _Reject(
            markers + width * bad, f"marker {bad} is {got[bad]}, the names stream says {marks[bad]}"
        )
    assert first is not None
    raise first


def _seqs_before_tokens(buf: memoryview, names: _Names, n: int, tok: _Tokens) -> int | None:
    """Addresses-first: the token table follows the markers, or seqs_of_names then it."""
    after = _align8(names.markers_end)
    if after == tok.table:
        return None
    if _align8(after + 3 * n) == tok.table:
        if not _is_seqs(buf, after, n):
            raise _Reject(after, "seqs_of_names is not a permutation of the symbols")
        return after
    raise _Reject(names.markers_end, "unexplained bytes between the markers and the token table")


def _is_seqs(buf: memoryview, pos: int, n: int) -> bool:
    """True when 3*n bytes at `pos` are big-endian u24 indices forming a permutation."""
    raw = bytes(buf[pos : pos + 3 * n])
    if len(raw) != 3 * n:
        return False
    seen = bytearray(n)
    for i in range(0, 3 * n, 3):
        v = (raw[i] << 16) | (raw[i + 1] << 8) | raw[i + 2]
        if v >= n or seen[v]:
            return False
        seen[v] = 1
    return True


def _with_addresses(
    scan: _Scan, tok: _Tokens, names: _Names, seqs: int | None, q: int, n: int,
    order: TableOrder,
) -> Kallsyms:
    """Read the address arrays for a checked names stream and build the result."""
    buf, base, lo, hi = scan.buf, scan.base, scan.lo, scan.hi
    decoded = _decode_names(buf, names, tok)
    rejects: list[_Reject] = []
    for layout in (Layout.BASE_RELATIVE, Layout.ABSOLUTE):
        try:
            off_pos, rb_pos, tail = _address_arrays(q, n, tok, order, layout)
            if off_pos < lo or tail > hi:
                raise _Reject(max(off_pos, lo), f"{layout} address arrays lie outside the data")
            addrs, absolute, relative_base, abs_percpu = _read_addresses(
                buf, layout, off_pos, rb_pos, n
            )
            break
        except _Reject as r:
            rejects.append(r)
    else:
        raise rejects[0]
    if order is TableOrder.NAMES_FIRST:
        # seqs_of_names (6.2+) trails the address arrays in this order.
        seqs = _align8(tail)
        if seqs + 3 * n > hi or not _is_seqs(buf, seqs, n):
            seqs = None
    symbols = tuple(
        KernelSymbol(name=name[1:], address=a, type=name[0], absolute=ab)
        for name, a, ab in zip(decoded, addrs, absolute)
    )
    location = KallsymsLocation(
        num_syms=base + q,
        names=base + names.start,
        markers=base + names.markers,
        token_table=base + tok.table,
        token_index=base + tok.index,
        offsets=base + off_pos,
        relative_base=None if rb_pos is None else base + rb_pos,
        seqs_of_names=None if seqs is None else base + seqs,
    )
    text_base = _text_base(symbols, relative_base)
    slide = None
    if scan.hint_text_base is not None and text_base is not None:
        slide = text_base - scan.hint_text_base
    return Kallsyms(
        source=scan.source,
        symbols=symbols,
        layout=layout,
        order=order,
        location=location,
        relative_base=relative_base,
        absolute_percpu=abs_percpu,
        has_seqs_of_names=seqs is not None,
        kaslr_slide=slide,
    )


def _address_arrays(
    q: int, n: int, tok: _Tokens, order: TableOrder, layout: Layout
) -> tuple[int, int | None, int]:
    """(offsets/addresses start, relative_base position or None, end of both)."""
    relative = layout is Layout.BASE_RELATIVE
    if order is TableOrder.ADDRESSES_FIRST:
        if relative:
            rb_pos = q - 8
            return rb_pos - _align8(4 * n), rb_pos, q
        return q - 8 * n, None, q
    off_pos = _align8(tok.end)
    if relative:
        rb_pos = _align8(off_pos + 4 * n)
        return off_pos, rb_pos, rb_pos + 8
    return off_pos, None, off_pos + 8 * n


def _text_base(symbols: tuple[KernelSymbol, ...], relative_base: int | None) -> int | None:
    for sym in symbols:
        if sym.name == "_text":
            return sym.address
    return relative_base


def _read_addresses(
    buf: memoryview, layout: Layout, off_pos: int, rb_pos: int | None, n: int
) -> tuple[list[int], list[bool], int | None, bool]:
    if layout is Layout.BASE_RELATIVE:
        assert rb_pos is not None
        relative_base = _u64(buf, rb_pos)
        if relative_base < KERNEL_HALF or relative_base & PAGE_MASK:
            raise _Reject(rb_pos, f"relative_base 0x{relative_base:x} is not a kernel page")
        offs = _array("i", buf, off_pos, n)
        abs_percpu = min(offs) < 0
        if abs_percpu:
            absolute = [o >= 0 for o in offs]
            addrs = [o if o >= 0 else relative_base - 1 - o for o in offs]
        else:
            absolute = [False] * n
            addrs = [relative_base + o for o in offs]
        if all(absolute):
            raise _Reject(off_pos, "no symbol is relative to the kernel base")
    else:
        relative_base = None
        abs_percpu = False
        addrs = list(_array("Q", buf, off_pos, n))
        absolute = [a < KERNEL_HALF for a in addrs]
        if sum(absolute) * 2 > n:
            raise _Reject(off_pos, "most addresses are not kernel addresses")
    if any(b < a for a, b in zip(addrs, addrs[1:])):
        raise _Reject(off_pos, "symbol addresses are not sorted")
    return addrs, absolute, relative_base, abs_percpu


def _decode_names(buf: memoryview, names: _Names, tok: _Tokens) -> list[str]:
    raw = bytes(buf[names.start : names.end])
    tokens = tok.tokens
    out = [b"".join([tokens[c] for c in raw[p : p + ln]]) for p, ln in names.entries]
    joined = b"\n".join(out) + b"\n"
    if len(joined) > MAX_NAME_LEN * len(out) or not _NAMES_RE.fullmatch(joined):
        bad = next(
            (i for i, s in enumerate(out) if not _NAMES_RE.fullmatch(s + b"\n")), 0
        )
        raise _Reject(names.start + names.entries[bad][0], f"symbol {bad} does not decode to a name")
    if max(map(len, out)) > MAX_NAME_LEN:
        raise _Reject(names.start, "a symbol name is implausibly long")
    return joined.decode("ascii").split("\n")[:-1]


# -- small helpers ------------------------------------------------------------------------


def _align8(x: int) -> int:
    return (x + 7) & ~7


def _u32(buf: memoryview, pos: int) -> int:
    if pos < 0 or pos + 4 > len(buf):
        raise _Reject(max(pos, 0), "read past the end of the data")
    return int.from_bytes(buf[pos : pos + 4], "little")


def _u64(buf: memoryview, pos: int) -> int:
    if pos < 0 or pos + 8 > len(buf):
        raise _Reject(max(pos, 0), "read past the end of the data")
    return int.from_bytes(buf[pos : pos + 8], "little")


def _array(code: str, buf: memoryview, pos: int, n: int) -> array[int]:
    a = array(code)
    size = a.itemsize * n
    if pos < 0 or pos + size > len(buf):
        raise _Reject(max(pos, 0), "address array runs past the end of the data")
    a.frombytes(buf[pos : pos + size])
    if not _LITTLE:
        a.byteswap()
    return a


def _find_nul(buf: memoryview, start: int, stop: int) -> int:
    if start >= stop:
        return -1
    i = bytes(buf[start:stop]).find(b"\0")
    return -1 if i < 0 else start + i


def _elf_section_range(buf: memoryview, name: bytes, source: str) -> tuple[int, int] | None:
    """File range of section `name` of a little-endian ELF64, or None if not ELF64/absent."""
    if len(buf) < 64 or bytes(buf[:4]) != b"\x7fELF" or buf[4] != 2 or buf[5] != 1:
        return None
    shoff = _u64(buf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", buf, 0x3A)
    if shentsize < 64 or shnum == 0 or shnum > 65280 or shstrndx >= shnum:
        return None
    if shoff + shnum * shentsize > len(buf):
        raise SymbolsError(source, "ELF section headers run past the end of the file", shoff)

    def header(i: int) -> tuple[int, int, int, int]:
        nm, typ, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", buf, shoff + i * shentsize
        )
        return nm, typ, off, size

    _, _, str_off, str_size = header(shstrndx)
    if str_off + str_size > len(buf):
        raise SymbolsError(source, "ELF section name table runs past the end of the file", str_off)
    names = bytes(buf[str_off : str_off + str_size])
    for i in range(shnum):
        nm, typ, off, size = header(i)
        if nm < len(names) and names[nm : names.find(b"\0", nm)] == name and typ != 8:
            if off + size > len(buf):
                raise SymbolsError(source, f"ELF section {name.decode()} is truncated", off)
            return off, off + size
    return None


def _region_views(backend: Backend) -> Iterator[tuple[MemoryRegion, memoryview]]:
    """Zero-copy views of each RAM region (`region_views` where the backend has it)."""
    views = getattr(backend, "region_views", None)
    if views is not None:
        yield from views()
        return
    for region in backend.memory_map:
        yield region, backend.view(region.gpa, region.size)
