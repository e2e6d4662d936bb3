"""Find a Linux guest's own symbol data in its RAM: kallsyms, the banner and the BTF.

x86-64 maps the kernel image (text, rodata, data, bss) linearly:

    physical = virtual - __START_KERNEL_map (0xffffffff80000000) + phys_base

where `phys_base` is chosen at boot (physical KASLR) and may "wrap" below zero, so all
arithmetic is modulo 2**64. It is found without trusting any single value in guest memory:

1. kallsyms is recovered from RAM (`kallsyms_from_memory`): run-time addresses of
   `linux_banner`, `__start_BTF`/`__stop_BTF`, `_text`/`_end`, and the table's own
   guest-physical address K. The table lies in the image, so the banner lies physically
   within one image size of K.
2. Every "Linux version " string in that window gives a candidate
   `phys_base = gpa - (linux_banner - __START_KERNEL_map)`. A candidate is accepted only
   if, through it, `linux_banner` holds a whole banner, `__start_BTF` holds a BTF header
   whose blob is exactly `__stop_BTF - __start_BTF` bytes and parses completely, and K
   falls inside the image. A live target's page tables (CR3) are walked as a further
   check when they map the kernel.
3. The BTF is therefore the one at `__start_BTF` of the same image the banner and
   kallsyms came from (the cross-check between the three). RAM also holds damaged and
   module copies of BTF; without `__start_BTF` in kallsyms, the image's physical range is
   scanned for a header and only a blob that parses completely is taken.

The virtual KASLR slide is `_text - 0xffffffff81000000`: x86-64 links `_text` at
__START_KERNEL_map + CONFIG_PHYSICAL_START, which is 16 MiB in every distribution kernel
we know of. The symbol table is written with link-time addresses (run-time minus the
slide), so it does not depend on the boot; a kernel linked elsewhere still gets a usable
table (volatility3 measures the shift itself), only `kaslr_slide` would be off.

Every scan is bounded in bytes, candidates and time; every failure is a SymbolsError
naming the target.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sva.errors import MemoryAccessError, SvaError, SymbolsError, TargetError
from sva.symbols.btf import Btf, parse_btf
from sva.symbols.isf import MAX_BANNER, ExtraSymbol
from sva.symbols.kallsyms import Kallsyms, Layout, kallsyms_from_memory
from sva.vmi.base import Backend, MemoryRegion

START_KERNEL_MAP = 0xFFFFFFFF80000000
KERNEL_IMAGE_SIZE = 1 << 30  # the kernel image mapping is 1 GiB
LINK_TEXT_BASE = 0xFFFFFFFF81000000  # __START_KERNEL with CONFIG_PHYSICAL_START = 16 MiB
KERNEL_ALIGN = 0x200000  # CONFIG_PHYSICAL_ALIGN: KASLR moves the kernel in 2 MiB steps
MAX_IMAGE_SPAN = 256 << 20  # _text.._end larger than this is not a kernel
MAX_BANNER_HITS = 64  # "Linux version " strings examined per scan
MAX_BTF_CANDIDATES = 64
SEARCH_SECONDS = 10.0
_MASK64 = (1 << 64) - 1
_BANNER = re.compile(rb"Linux version ")
_BTF_MAGIC_LE = re.compile(rb"\x9f\xeb\x01\x00")

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class BannerHit:
    """A NUL-terminated "Linux version ..." string in guest-physical memory."""

    gpa: int
    text: bytes  # up to and including the NUL


def banner_at(read: Callable[[int, int], bytes | None], gpa: int) -> bytes | None:
    """The banner at `gpa` (bytes up to and including its NUL), or None if there is none."""
    data = read(gpa, MAX_BANNER)
    if data is None or not data.startswith(b"Linux version "):
        return None
    end = data.find(b"\0")
    if end < 0 or not 14 < end or data[end - 1 : end] != b"\n" or not data[14:15].isdigit():
        return None
    return data[: end + 1]


def read_physical(backend: Backend) -> Callable[[int, int], bytes | None]:
    def read(gpa: int, size: int) -> bytes | None:
        if gpa < 0:
            return None
        region = backend.memory_map.region_of(gpa)
        if region is None:
            return None
        try:
            return backend.read(gpa, min(size, region.end - gpa))
        except (MemoryAccessError, TargetError):
            return None

    return read


def scan_banners(
    backend: Backend,
    lo: int = 0,
    hi: int | None = None,
    deadline: float | None = None,
    accept: Callable[[int], bool] | None = None,
) -> list[BannerHit]:
    """Whole banner strings in guest-physical [lo, hi), in address order: at most
    MAX_BANNER_HITS of them, and only at addresses `accept` allows, if given."""
    read = read_physical(backend)
    hits: list[BannerHit] = []
    deadline = deadline if deadline is not None else time.monotonic() + SEARCH_SECONDS
    for region, view in _views(backend):
        start, stop = max(lo, region.gpa), min(hi if hi is not None else region.end, region.end)
        if start >= stop:
            continue
        for m in _BANNER.finditer(view, start - region.gpa, stop - region.gpa):
            if len(hits) >= MAX_BANNER_HITS or time.monotonic() > deadline:
                return hits
            if accept is not None and not accept(region.gpa + m.start()):
                continue
            text = banner_at(read, region.gpa + m.start())
            if text is not None:
                hits.append(BannerHit(region.gpa + m.start(), text))
    return hits


@dataclass(frozen=True)
class GuestKernel:
    """Where a guest's kernel is and what it carries, as found in its RAM."""

    target: str
    kallsyms: Kallsyms
    btf: Btf
    btf_gpa: int
    banner: bytes  # linux_banner's bytes, "\n\0" included
    banner_gpa: int
    phys_base: int  # modulo 2**64, as the kernel's own phys_base variable holds it
    kaslr_slide: int | None  # run-time minus link-time; None if _text is implausible
    checks: tuple[str, ...]  # the cross-checks that passed

    def physical(self, address: int) -> int | None:
        """Guest-physical address of a kernel-image virtual address (run-time)."""
        if not START_KERNEL_MAP <= address < START_KERNEL_MAP + KERNEL_IMAGE_SIZE:
            return None
        return (address - START_KERNEL_MAP + self.phys_base) & _MASK64

    @property
    def link_slide(self) -> int:
        """What to subtract from run-time addresses to get link-time ones (0 if unknown)."""
        return self.kaslr_slide or 0

    @property
    def banner_text(self) -> str:
        return self.banner.rstrip(b"\0").rstrip(b"\n").decode("utf-8", "backslashreplace")

    def virtual(self, gpa: int | None) -> int | None:
        """Run-time virtual address of a guest-physical address inside the kernel image."""
        if gpa is None:
            return None
        return (gpa - self.phys_base + START_KERNEL_MAP) & _MASK64


def kallsyms_array_symbols(ks: Kallsyms, to_virtual: Callable[[int | None], int | None]) -> list[ExtraSymbol]:
    """kallsyms' own arrays as symbols (kallsyms does not list itself; volatility3's
    kallsyms support needs them). `to_virtual` maps the table's positions (guest-physical
    or file offsets) to addresses."""
    loc, n = ks.location, ks.num_syms
    wanted: list[tuple[str, int | None, str]] = [
        ("kallsyms_num_syms", loc.num_syms, "unsigned int"),
        ("kallsyms_names", loc.names, f"u8[{loc.markers - loc.names}]"),
        ("kallsyms_markers", loc.markers, f"unsigned int[{(n + 255) // 256}]"),
        ("kallsyms_token_table", loc.token_table, f"u8[{loc.token_index - loc.token_table}]"),
        ("kallsyms_token_index", loc.token_index, "u16[256]"),
        ("kallsyms_relative_base", loc.relative_base, "unsigned long"),
        ("kallsyms_seqs_of_names", loc.seqs_of_names, f"u8[{3 * n}]"),
    ]
    if ks.layout is Layout.BASE_RELATIVE:
        wanted.append(("kallsyms_offsets", loc.offsets, f"int[{n}]"))
    else:
        wanted.append(("kallsyms_addresses", loc.offsets, f"unsigned long[{n}]"))
    out: list[ExtraSymbol] = []
    for name, where, spec in wanted:
        address = to_virtual(where) if where is not None else None
        if address is not None:
            out.append(ExtraSymbol(name, address, spec))
    return out


class GuestReader:
    """`KernelReader` over guest RAM for kernel-image virtual addresses."""

    def __init__(self, backend: Backend, kernel: GuestKernel) -> None:
        self._read = read_physical(backend)
        self._kernel = kernel

    def read(self, address: int, size: int) -> bytes | None:
        gpa = self._kernel.physical(address)
        if gpa is None:
            return None
        data = self._read(gpa, size)
        return data if data is not None and len(data) == size else None


def locate_kernel(
    backend: Backend, target: str | None = None, progress: Progress | None = None
) -> GuestKernel:
    """Find kallsyms, the banner and the BTF of the kernel running in `backend`."""
    target = target or backend.target
    say = progress or _quiet
    deadline = time.monotonic() + SEARCH_SECONDS
    say("searching guest RAM for kallsyms")
    ks = kallsyms_from_memory(backend, target)
    say(f"kallsyms: {ks.num_syms} symbols at GPA 0x{ks.offset:x}")

    def need(name: str) -> int:
        sym = ks.lookup(name)
        if sym is None or sym.absolute:
            why = "" if ks.has_data_symbols else " (CONFIG_KALLSYMS_ALL is off: give --kernel)"
            raise SymbolsError(target, f"kallsyms has no {name}{why}")
        return sym.address

    banner_va, text_va = need("linux_banner"), need("_text")
    end_sym = ks.lookup("_end")
    end_va = end_sym.address if end_sym is not None else text_va + MAX_IMAGE_SPAN
    if not text_va <= banner_va < end_va or end_va - text_va > MAX_IMAGE_SPAN:
        raise SymbolsError(target, "kallsyms: linux_banner is not inside _text.._end")
    btf_range = _btf_range(ks)

    # The banner lies within one image span of the kallsyms table, either way, and where
    # it puts _text on a 2 MiB boundary (x86-64 requires CONFIG_PHYSICAL_ALIGN to be a
    # multiple of 2 MiB): banners planted elsewhere are not even looked at.
    k = ks.offset
    span = end_va - text_va
    lo, hi = max(0, k - span), k + span
    into_image = banner_va - text_va
    hits = scan_banners(backend, lo, hi, deadline, lambda gpa: (gpa - into_image) % KERNEL_ALIGN == 0)
    read = read_physical(backend)
    rejected: list[str] = []
    for hit in hits:
        phys_base = (hit.gpa - (banner_va - START_KERNEL_MAP)) & _MASK64

        def phys(va: int, base: int = phys_base) -> int:
            return (va - START_KERNEL_MAP + base) & _MASK64

        if not phys(text_va) <= k < phys(end_va):
            rejected.append(f"0x{hit.gpa:x}: kallsyms would lie outside the image")
            continue
        checks = ["banner at linux_banner", "kallsyms inside _text.._end"]
        btf: Btf | None = None
        btf_gpa = 0
        if btf_range is not None:
            start, size = phys(btf_range[0]), btf_range[1]
            header = read(start, 24)
            if header is None or header[:4] != b"\x9f\xeb\x01\x00":
                rejected.append(f"0x{hit.gpa:x}: no BTF header at __start_BTF")
                continue
            try:
                btf = _btf_at(read, start, size, f"{target}:BTF@0x{start:x}")
            except SymbolsError as e:
                rejected.append(f"0x{hit.gpa:x}: {e.reason}")
                continue
            btf_gpa = start
            checks.append("BTF at __start_BTF, sized __stop_BTF - __start_BTF, parses")
        walked = _page_walk_check(backend, banner_va, hit.gpa)
        if walked is False:
            rejected.append(f"0x{hit.gpa:x}: the page tables map linux_banner elsewhere")
            continue
        if walked:
            checks.append("CR3 page tables map linux_banner there")
        if btf is None:
            say("no __start_BTF in kallsyms: scanning the kernel image for BTF")
            btf, btf_gpa = find_btf(backend, phys(text_va), phys(end_va), target, deadline)
            checks.append("BTF found by header scan inside the image (parses completely)")
        slide = text_va - LINK_TEXT_BASE
        plausible = 0 <= slide < KERNEL_IMAGE_SIZE and slide % KERNEL_ALIGN == 0
        return GuestKernel(
            target=target,
            kallsyms=ks,
            btf=btf,
            btf_gpa=btf_gpa,
            banner=hit.text,
            banner_gpa=hit.gpa,
            phys_base=phys_base,
            kaslr_slide=slide if plausible else None,
            checks=tuple(checks),
        )
    why = "; ".join(rejected[:6]) or "no banner string near the kallsyms table"
    raise SymbolsError(target, f"cannot place the kernel image in guest RAM: {why}")


def _btf_range(ks: Kallsyms) -> tuple[int, int] | None:
    start, stop = ks.lookup("__start_BTF"), ks.lookup("__stop_BTF")
    if start is None or stop is None or start.absolute or stop.absolute:
        return None
    size = stop.address - start.address
    if not 24 < size <= 128 << 20:
        return None
    return start.address, size


def _btf_at(read: Callable[[int, int], bytes | None], gpa: int, size: int, source: str) -> Btf:
    data = read(gpa, size)
    if data is None or len(data) != size:
        raise SymbolsError(source, f"__start_BTF..__stop_BTF (0x{size:x} bytes) is not all in guest RAM")
    btf = parse_btf(data, source)
    if btf.size != size:
        raise SymbolsError(source, f"BTF blob is 0x{btf.size:x} bytes, the section 0x{size:x}")
    return btf


def find_btf(
    backend: Backend, lo: int, hi: int, target: str, deadline: float | None = None
) -> tuple[Btf, int]:
    """The first BTF blob in guest-physical [lo, hi) that parses completely, and its GPA.

    Damaged copies (a decompressor's leftovers, a half-overwritten page) are skipped; at
    most MAX_BTF_CANDIDATES headers are tried, within the deadline."""
    deadline = deadline if deadline is not None else time.monotonic() + SEARCH_SECONDS
    rejected: list[str] = []
    tried = 0
    for region, view in _views(backend):
        start, stop = max(lo, region.gpa), min(hi, region.end)
        if start >= stop:
            continue
        for m in _BTF_MAGIC_LE.finditer(view, start - region.gpa, stop - region.gpa):
            tried += 1
            if tried > MAX_BTF_CANDIDATES or time.monotonic() > deadline:
                break
            gpa = region.gpa + m.start()
            try:
                btf = parse_btf(view[m.start() :], f"{target}:BTF@0x{gpa:x}")
            except SymbolsError as e:
                rejected.append(f"0x{gpa:x}: {e.reason}")
                continue
            return btf, gpa
    raise SymbolsError(
        target, f"no complete BTF inside the kernel image ({'; '.join(rejected[:4]) or 'no header'})"
    )


def _page_walk_check(backend: Backend, va: int, gpa: int) -> bool | None:
    """True/False when a live vCPU's page tables map `va` to/elsewhere than `gpa`;
    None when they cannot tell (no registers, paging off, KPTI user tables, holes)."""
    if not getattr(backend.capabilities, "registers", False):
        return None
    try:
        regs = backend.regs(0)
    except SvaError:
        return None
    if not regs.cr0 & (1 << 31) or not regs.cr4 & (1 << 5):  # paging, PAE
        return None
    levels = 5 if regs.cr4 & (1 << 12) else 4  # LA57
    table = regs.cr3 & 0x000FFFFFFFFFF000
    read = read_physical(backend)
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        raw = read(table + 8 * ((va >> shift) & 0x1FF), 8)
        if raw is None:
            return None
        entry = int.from_bytes(raw, "little")
        if not entry & 1:
            return None
        frame = entry & 0x000FFFFFFFFFF000
        if level in (2, 3) and entry & 0x80:  # 2 MiB / 1 GiB page
            size = 1 << shift
            return (frame & ~(size - 1)) + (va & (size - 1)) == gpa
        table = frame
    return table + (va & 0xFFF) == gpa


def _views(backend: Backend) -> Iterator[tuple[MemoryRegion, memoryview]]:
    views = getattr(backend, "region_views", None)
    if views is not None:
        yield from views()
        return
    for region in backend.memory_map:
        yield region, backend.view(region.gpa, region.size)
