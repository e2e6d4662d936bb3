"""Kernel integrity facts: the 64-bit syscall table, the IDT and modules hidden from the list.

Facts provided (all immutable, computed inside the freeze but `module_carve`):
  syscall_table   tuple[SyscallEntry, ...]: every entry of `sys_call_table`; the count is
                  the ISF symbol's array count (451 on 6.1, sized from the data by
                  sva.symbols.isf), not volatility3's guess.
  idt_entries     tuple[IdtEntry, ...]: the 256 gates of `idt_table`.
  module_carve    ModuleCarve: every `struct module` carved from the module area, with
                  the guest running (the slow part: about half a second on the lab),
                  optionally a slice per cycle (see ModuleCarver)
  hidden_modules  tuple[HiddenModule, ...]: `struct module`s of the carve that are not
                  on the module list at the frozen moment, re-checked in the freeze
                  (volatility3's linux.hidden_modules logic, called as a library because
                  the plugin refuses non-dwarf2json tables; see sva.symbols.isf).
  ftrace_hooks    sva.guest.ftrace.FtraceHooks: syscall handlers whose ftrace site is
                  patched, and the registered ftrace_ops (see that module).

Each handler address comes with what kallsyms says is there (the symbol starting at that
address, if any), whether it lies in the kernel's text (_stext.._etext, relocated by the
KASLR slide) and which module's core area holds it, if any. Judging is the
detector's job (detectors/kernel_integrity.py); this module only reads.
"""

from __future__ import annotations

import enum
import itertools
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sva.engine.facts import FactContext, FactProvider, Unavailable
from sva.guest.context import GuestContext
from sva.guest.processes import canonical
from sva.guest.views import IncrementalSweep, forget_cached_reads

ADDR48 = (1 << 48) - 1
MAX_SYSCALLS = 2048  # a table symbol claiming more is not believed
IDT_ENTRIES = 256
GATE_SIZE = 16
MAX_MODULES = 4096
MAX_HIDDEN_MODULES = 256
MODULE_ALIGN = 64  # struct module is L1-cache aligned (volatility3's carve steps by this)
MODULE_SCAN_CHUNK = 256 << 10  # bytes carved between deadline checks (a multiple of MODULE_ALIGN)
MAX_MODULE_AREA = 1 << 31  # bytes of module area carved at most (the scan reads it 8 bytes at a time)


class Region(enum.StrEnum):
    """Where in the kernel's address space a code pointer lands."""

    KERNEL_TEXT = "kernel_text"  # _stext.._etext
    KERNEL_INIT_TEXT = "kernel_init_text"  # _sinittext.._einittext (freed after boot)
    MODULE = "module"  # a listed module's core area
    OTHER = "other"  # anywhere else (heap, vmalloc, user space, garbage)


@dataclass(frozen=True, slots=True)
class CodeTarget:
    """Where a kernel code pointer points."""

    address: int  # as stored in the table (64-bit)
    symbols: tuple[str, ...]  # kallsyms names starting exactly at `address` (aliases included)
    region: Region
    module: str | None  # the module whose core area holds it

    @property
    def in_kernel_text(self) -> bool:
        return self.region is Region.KERNEL_TEXT


@dataclass(frozen=True, slots=True)
class SyscallEntry:
    number: int
    target: CodeTarget


@dataclass(frozen=True, slots=True)
class IdtEntry:
    vector: int
    present: bool
    target: CodeTarget


@dataclass(frozen=True, slots=True)
class HiddenModule:
    name: str
    address: int  # of the struct module, canonical
    base: int | None  # of its code, canonical
    size: int | None


@dataclass(frozen=True, slots=True)
class ModuleArea:
    """A listed module's core (code and data) area."""

    name: str
    start: int  # 48-bit masked, as volatility3 hands out addresses
    end: int


class _Resolver:
    """Answers `CodeTarget`s for one cycle: kernel text bounds, symbols, module areas."""

    def __init__(self, gc: GuestContext) -> None:
        self.gc = gc
        vmlinux = gc.module

        def bounds(start: str, end: str) -> tuple[int, int]:
            if not (vmlinux.has_symbol(start) and vmlinux.has_symbol(end)):
                return (0, 0)
            return (
                (vmlinux.get_symbol(start).address + vmlinux.offset) & ADDR48,
                (vmlinux.get_symbol(end).address + vmlinux.offset) & ADDR48,
            )

        self.text = bounds("_stext", "_etext")
        if self.text == (0, 0):
            raise ValueError("the symbol table has no _stext/_etext")
        self.init_text = bounds("_sinittext", "_einittext")
        self.areas = tuple(module_areas(gc))

    def target(self, address: int) -> CodeTarget:
        masked = address & ADDR48
        try:
            names = self.gc.module.get_symbols_by_absolute_location(masked)
        except Exception:  # noqa: BLE001
            names = []
        symbols = tuple(sorted(str(n).split("!", 1)[-1] for n in names))
        module = next((a.name for a in self.areas if a.start <= masked < a.end), None)
        kernel_half = address >> 48 == 0xFFFF
        if kernel_half and self.text[0] <= masked < self.text[1]:
            region = Region.KERNEL_TEXT
        elif kernel_half and self.init_text[0] <= masked < self.init_text[1]:
            region = Region.KERNEL_INIT_TEXT
        elif kernel_half and module is not None:
            region = Region.MODULE
        else:
            region = Region.OTHER
        return CodeTarget(address, symbols, region, module)


def module_areas(gc: GuestContext) -> list[ModuleArea]:
    """The core areas of the modules on the module list (at most MAX_MODULES)."""
    from volatility3.framework.symbols.linux.utilities.modules import Modules

    out: list[ModuleArea] = []
    for mod in itertools.islice(Modules.list_modules(gc.context, gc.module.name), MAX_MODULES):
        try:
            name = str(mod.get_name() or "?")
            base, size = int(mod.get_module_base()) & ADDR48, int(mod.get_core_size())
            out.append(ModuleArea(name, base, base + size))
        except Exception:  # noqa: BLE001, S112 - a module we cannot size owns nothing
            continue
    return out


def _read_pointers(gc: GuestContext, symbol: str, count: int) -> tuple[int, ...]:
    vmlinux = gc.module
    layer = gc.context.layers[vmlinux.layer_name]
    data = layer.read(vmlinux.get_symbol(symbol).address + vmlinux.offset, 8 * count)
    return struct.unpack(f"<{count}Q", data)


def syscall_table(gc: GuestContext, ctx: FactContext) -> tuple[SyscallEntry, ...]:
    """Every entry of the 64-bit sys_call_table, sized by the ISF array count."""
    sym = gc.module.get_symbol("sys_call_table")
    count = int(getattr(sym.type, "vol", {}).get("count", 0)) if sym.type is not None else 0
    if not 0 < count <= MAX_SYSCALLS:
        raise ValueError(f"sys_call_table has no usable array count in the symbol table ({count})")
    resolver = _Resolver(gc)
    return tuple(SyscallEntry(n, resolver.target(a)) for n, a in enumerate(_read_pointers(gc, "sys_call_table", count)))


def idt_entries(gc: GuestContext, ctx: FactContext) -> tuple[IdtEntry, ...]:
    """The 256 gates of idt_table (x86-64 16-byte gate descriptors)."""
    vmlinux = gc.module
    layer = gc.context.layers[vmlinux.layer_name]
    raw = layer.read(vmlinux.get_symbol("idt_table").address + vmlinux.offset, IDT_ENTRIES * GATE_SIZE)
    resolver = _Resolver(gc)
    out = []
    for vector in range(IDT_ENTRIES):
        low, _segment, bits, middle, high, _reserved = struct.unpack_from("<HHHHII", raw, vector * GATE_SIZE)
        address = low | middle << 16 | high << 32
        out.append(IdtEntry(vector, bool(bits & 0x8000), resolver.target(address)))
    return tuple(out)


def _module_area_bounds(gc: GuestContext) -> tuple[int, int]:
    """mod_tree.addr_min/addr_max (>= 5.19) or module_addr_min/max, read this cycle
    (volatility3's Modules.get_modules_memory_boundaries caches them for good)."""
    vmlinux = gc.module
    if vmlinux.has_symbol("mod_tree"):
        tree = vmlinux.object_from_symbol("mod_tree")
        lo, hi = int(tree.addr_min), int(tree.addr_max)
    else:
        lo, hi = int(vmlinux.object_from_symbol("module_addr_min")), int(vmlinux.object_from_symbol("module_addr_max"))
    if not 0 <= hi - lo <= MAX_MODULE_AREA:
        raise ValueError(f"implausible module area 0x{lo:x}..0x{hi:x}")
    return lo, hi


@dataclass(frozen=True, slots=True)
class ModuleCarve:
    """The `module_carve` fact: addresses (canonical) of `struct module`s carved from the
    module area with the guest running, listed or not. With `ModuleCarver.every` > 1 a
    cycle carves only part of the area (`swept` bytes; `covered` of `area` bytes of the
    current pass so far, `pass_complete` when this cycle finished one) and the addresses
    are those of the last complete pass plus the current one's so far. Only leads:
    `hidden_modules` re-checks, inside the freeze, those that are not on the module list
    then."""

    addresses: tuple[int, ...]
    cycle: int
    truncated: str = ""
    swept: int = 0
    covered: int = 0
    area: int = 0
    pass_complete: bool = True
    passes: int = 0


def _carve_step(sweep: IncrementalSweep, gc: GuestContext, ctx: FactContext) -> ModuleCarve:
    """This cycle's share of the module area carve (volatility3's linux.hidden_modules
    carving with no module known, so that a module unlinked after the carve is still a
    lead). The area's bounds are read each cycle: a pass follows the area as it grows."""
    from volatility3.framework.symbols.linux.utilities.modules import Modules

    kernel = gc.context.layers[gc.module.layer_name]
    lo, hi = _module_area_bounds(gc)

    def find(start: int, end: int) -> Iterator[int]:
        for mod in Modules.get_hidden_modules(gc.context, gc.module.name, set(), (start, end)):
            yield int(kernel.canonicalize(mod.vol.offset))

    step = sweep.step(lo, hi, find, ctx.time_left)
    return ModuleCarve(
        step.leads, ctx.cycle, step.truncated, step.swept, step.covered, step.area, step.pass_complete, step.passes
    )


def _module_sweep(every: int) -> IncrementalSweep:
    return IncrementalSweep(
        every, MODULE_SCAN_CHUNK, MAX_MODULES + MAX_HIDDEN_MODULES, "module carve", align=MODULE_ALIGN
    )


def carve_modules(gc: GuestContext, ctx: FactContext) -> ModuleCarve:
    """Every struct module in the module area, carved now in one pass."""
    return _carve_step(_module_sweep(1), gc, ctx)


class ModuleCarver:
    """The `module_carve` provider's state: a full carve of the module area spread over
    `every` cycles.

    Each cycle carves the next 1/`every` of the area (slices and reads start on the
    64-byte struct module alignment, so no struct module falls between two) from where
    the last cycle stopped, and hands out the leads of the last complete pass plus those
    of the current pass so far; with `every` = 1 each cycle is one whole carve. A new
    guest context (reattach, reboot) starts a new pass with no leads.

    The trade-off of `every` > 1: carving costs CPU (never pause time), spread evenly
    over the cycles; every lead handed out is still re-checked in each freeze, so only a
    module that is both new and hidden waits until the carve passes its address: within
    one pass, `every` cycles."""

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.sweep = _module_sweep(every)
        self.last: ModuleCarve | None = None
        self._gc: GuestContext | None = None

    def compute(self, gc: GuestContext, ctx: FactContext) -> ModuleCarve:
        last = self.last
        if self._gc is not gc:
            self.sweep.reset()
        elif last is not None and last.cycle == ctx.cycle and not last.truncated:
            return last  # asked twice in one cycle
        forget_cached_reads()
        self.last, self._gc = _carve_step(self.sweep, gc, ctx), gc
        return self.last


def hidden_modules(gc: GuestContext, ctx: FactContext) -> tuple[HiddenModule, ...] | Unavailable:
    """Modules of the live carve (`module_carve` fact) that the module list does not have
    at the frozen moment, each re-checked now (self-reference and volatility3's sanity
    checks) so that a module loaded or unloaded since the carve is not reported."""
    from volatility3.framework.symbols.linux.utilities.modules import Modules

    carve = ctx.fact("module_carve")
    if isinstance(carve, Unavailable):
        return Unavailable(f"module_carve: {carve.reason}")
    kernel = gc.context.layers[gc.module.layer_name]
    known = {  # canonical, as get_hidden_modules compares them with self-pointers
        kernel.canonicalize(m.vol.offset)
        for m in itertools.islice(Modules.list_modules(gc.context, gc.module.name), MAX_MODULES)
    }
    out: list[HiddenModule] = []
    for address in carve.addresses:
        if address in known or len(out) >= MAX_HIDDEN_MODULES:
            continue
        for mod in Modules.get_hidden_modules(gc.context, gc.module.name, known, (address, address + 1)):
            try:
                name = str(mod.get_name() or "?")
            except Exception:  # noqa: BLE001
                name = "?"
            base: int | None
            size: int | None
            try:
                base, size = canonical(int(mod.get_module_base()) & ADDR48), int(mod.get_core_size())
            except Exception:  # noqa: BLE001
                base, size = None, None
            out.append(HiddenModule(name, canonical(int(mod.vol.offset) & ADDR48), base, size))
    return tuple(out)


def _fresh(fn: Callable[[GuestContext, FactContext], Any]) -> Callable[[GuestContext, FactContext], Any]:
    def compute(gc: GuestContext, ctx: FactContext) -> Any:
        forget_cached_reads()
        return fn(gc, ctx)

    return compute


def integrity_providers(session: Any, carve_every: int = 1) -> list[FactProvider]:
    """`syscall_table`, `idt_entries`, `module_carve` (live, a full carve spread over
    `carve_every` cycles: see ModuleCarver), `hidden_modules` and `ftrace_hooks` (see
    sva.guest.ftrace) for a `GuestSession`."""
    from sva.guest.ftrace import ftrace_provider

    carver = ModuleCarver(carve_every)
    return [
        session.provider("syscall_table", _fresh(syscall_table)),
        session.provider("idt_entries", _fresh(idt_entries)),
        session.provider("module_carve", carver.compute, consistent=False),
        session.provider("hidden_modules", _fresh(hidden_modules), requires=("module_carve",)),
        ftrace_provider(session),
    ]
