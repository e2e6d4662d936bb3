"""Kernel integrity facts: the 64-bit syscall table, the IDT and modules hidden from the list.

Facts provided (all immutable, computed inside the freeze):
  syscall_table   tuple[SyscallEntry, ...]: every entry of `sys_call_table`; the count is
                  the ISF symbol's array count (451 on 6.1, sized from the data by
                  sva.symbols.isf), not volatility3's guess.
  idt_entries     tuple[IdtEntry, ...]: the 256 gates of `idt_table`.
  hidden_modules  tuple[HiddenModule, ...]: `struct module`s carved from the module area
                  that are not on the module list (volatility3's linux.hidden_modules
                  logic, called as a library because the plugin refuses non-dwarf2json
                  tables; see sva.symbols.isf).

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

from sva.engine.facts import FactContext, FactProvider
from sva.guest.context import GuestContext
from sva.guest.processes import canonical
from sva.guest.views import forget_cached_reads

ADDR48 = (1 << 48) - 1
MAX_SYSCALLS = 2048  # a table symbol claiming more is not believed
IDT_ENTRIES = 256
GATE_SIZE = 16
MAX_MODULES = 4096
MAX_HIDDEN_MODULES = 256
MODULE_SCAN_CHUNK = 256 << 10  # bytes (a multiple of the 64-byte struct module alignment)
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
class _ModuleArea:
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
        self.areas = tuple(_module_areas(gc))

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


def _module_areas(gc: GuestContext) -> list[_ModuleArea]:
    from volatility3.framework.symbols.linux.utilities.modules import Modules

    out: list[_ModuleArea] = []
    for mod in itertools.islice(Modules.list_modules(gc.context, gc.module.name), MAX_MODULES):
        try:
            name = str(mod.get_name() or "?")
            base, size = int(mod.get_module_base()) & ADDR48, int(mod.get_core_size())
            out.append(_ModuleArea(name, base, base + size))
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


def hidden_modules(gc: GuestContext, ctx: FactContext) -> tuple[HiddenModule, ...]:
    """Modules carved from the module area that the module list does not have."""
    from volatility3.framework.symbols.linux.utilities.modules import Modules

    kernel = gc.context.layers[gc.module.layer_name]
    known = {
        kernel.canonicalize(m.vol.offset)
        for m in itertools.islice(Modules.list_modules(gc.context, gc.module.name), MAX_MODULES)
    }
    lo, hi = _module_area_bounds(gc)
    out = []

    def found() -> Iterator[Any]:
        for start in range(lo, hi, MODULE_SCAN_CHUNK):  # in chunks, to watch the deadline
            if ctx.time_left() <= 0:
                raise TimeoutError(f"cycle deadline reached carving modules at 0x{start:x}")
            end = min(start + MODULE_SCAN_CHUNK, hi)
            yield from Modules.get_hidden_modules(gc.context, gc.module.name, known, (start, end))

    for mod in itertools.islice(found(), MAX_HIDDEN_MODULES):
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


def integrity_providers(session: Any) -> list[FactProvider]:
    """`syscall_table`, `idt_entries` and `hidden_modules` for a `GuestSession`."""
    return [
        session.provider("syscall_table", _fresh(syscall_table)),
        session.provider("idt_entries", _fresh(idt_entries)),
        session.provider("hidden_modules", _fresh(hidden_modules)),
    ]
