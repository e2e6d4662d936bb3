"""One volatility3 context per guest boot, reused every scan cycle.

Building the context is the expensive part (symbols from the guest's own BTF and kallsyms,
ISF loaded once without re-validation); a cycle only clears the page-table caches and
reads. The kernel's page tables (DTB) come from the symbol table's `init_top_pgt` placed
with this boot's KASLR slide and physical base, and are cross-checked against the live
CR3 when the backend has registers: the kernel half of the top-level table must be the
same (CR3 may hold a user process's tables, or the user copy under PTI).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sva.errors import SvaError, SymbolsError
from sva.guest.vollayer import BackendLayer, clear_translation_caches
from sva.vmi.base import MappedBackend

if TYPE_CHECKING:
    from sva.symbols.sources import SymbolTable

START_KERNEL_MAP = 0xFFFFFFFF80000000
MASK64 = (1 << 64) - 1
CR3_ADDRESS_MASK = 0x000FFFFFFFFFF000
KERNEL_ALIGN = 0x200000
KERNEL_MODULE = "kernel"
KERNEL_LAYER = "kernel_layer"
PHYSICAL_LAYER = "memory"


@dataclass(frozen=True)
class KernelPlacement:
    """Where this boot put the kernel: what volatility3 needs to read it."""

    banner: str
    virtual_slide: int
    phys_base: int
    dtb: int


def _check_dtb_against_cr3(backend: MappedBackend, dtb: int) -> None:
    """The kernel half (entries 256..511) of CR3's top-level table must equal the DTB's."""
    if not backend.capabilities.registers or backend.vcpu_count < 1:
        return
    cr3 = backend.regs(0).cr3 & CR3_ADDRESS_MASK
    if cr3 == dtb:
        return
    try:
        ours = backend.read(dtb + 256 * 8, 256 * 8)
        theirs = backend.read(cr3 + 256 * 8, 256 * 8)
    except SvaError as e:
        raise SymbolsError(backend.target, f"cannot read the kernel page tables to check the DTB: {e}") from None
    present = sum(1 for (e,) in struct.iter_unpack("<Q", ours) if e & 1)
    if present == 0 or ours != theirs:
        raise SymbolsError(
            backend.target,
            f"kernel page tables at 0x{dtb:x} (init_top_pgt) do not match CR3 0x{cr3:x}: "
            "the symbol table or the kernel placement is wrong for this boot",
        )


def _symbol(isf: dict[str, Any], name: str, source: str) -> int:
    try:
        return int(isf["symbols"][name]["address"])
    except (KeyError, TypeError, ValueError):
        raise SymbolsError(source, f"symbol table has no address for {name}") from None


def place_kernel(backend: MappedBackend, isf: dict[str, Any], source: str) -> KernelPlacement:
    """This boot's KASLR slide, physical base and DTB, for a symbol table of the kernel.

    The table's banner, found in RAM, fixes slide + phys_base (the kernel image is mapped
    linearly); init_task->files, a pointer the kernel itself wrote, then gives the virtual
    slide, as it must point at init_files. Both must be 2 MiB steps.
    """
    import base64

    from sva.symbols.guest import scan_banners

    try:
        banner = base64.b64decode(isf["symbols"]["linux_banner"]["constant_data"])
        files_off = int(isf["user_types"]["task_struct"]["fields"]["files"]["offset"])
    except (KeyError, TypeError, ValueError):
        raise SymbolsError(source, "symbol table lacks linux_banner data or task_struct.files") from None
    banner_va = _symbol(isf, "linux_banner", source)
    pgt, init_task, init_files = (_symbol(isf, n, source) for n in ("init_top_pgt", "init_task", "init_files"))
    for hit in scan_banners(backend):
        if hit.text != banner:
            continue
        delta = (hit.gpa - (banner_va - START_KERNEL_MAP)) & MASK64  # slide + phys_base
        try:
            raw = backend.read((init_task - START_KERNEL_MAP + delta + files_off) & MASK64, 8)
        except SvaError:
            continue
        slide = (struct.unpack("<Q", raw)[0] - init_files) & MASK64
        if slide >= 1 << 63:
            slide -= 1 << 64
        if slide % KERNEL_ALIGN or abs(slide) >= 1 << 31:
            continue
        phys_base = (delta - slide) & MASK64
        dtb = (pgt - START_KERNEL_MAP + delta) & MASK64
        text = banner.rstrip(b"\0").decode("latin-1")
        return KernelPlacement(text, slide, phys_base, dtb)
    raise SymbolsError(backend.target, f"the kernel of {source} is not in this guest's RAM (banner not found)")


class GuestContext:
    """volatility3 over an sva backend, for one guest boot."""

    def __init__(
        self,
        backend: MappedBackend,
        isf_path: str,
        placement: KernelPlacement | Callable[[dict[str, Any]], KernelPlacement],
    ) -> None:
        """`placement` may be a function of the loaded table, so the ISF is read only once."""
        # Imported here: volatility3 is heavy, and commands that don't need it stay fast.
        import volatility3.framework.symbols.linux.extensions.network  # noqa: F401 (registers type classes)
        from volatility3 import framework
        from volatility3.framework import contexts
        from volatility3.framework.layers import intel
        from volatility3.framework.symbols import linux

        framework.require_interface_version(2, 0, 0)
        self.backend = backend
        self.symbol_table: SymbolTable | None = None  # where the table came from, set by attach
        ctx = contexts.Context()
        ctx.add_layer(BackendLayer(ctx, "sva.memory", PHYSICAL_LAYER, backend))
        # validate=False: the table was checked against volatility3's schema when built;
        # validating a kernel-sized table again costs tens of seconds per attach.
        # symbol_mask: the Intel layer hands out 48-bit addresses, so symbol lookups must
        # mask the same way (volatility3's automagic does this too). It goes into the config
        # before the table exists, because the table caches symbols while it is built.
        ctx.config["sva.symbols.symbol_mask"] = (1 << 48) - 1
        table = linux.LinuxKernelIntermedSymbols(
            ctx, "sva.symbols", name=KERNEL_MODULE, isf_url=isf_path, validate=False,
            symbol_mask=(1 << 48) - 1,
        )
        ctx.symbol_space.append(table)
        # The parsed table, shared with volatility3 rather than read a second time: placement
        # and the raw task walk's offsets come from it.
        self.isf: dict[str, Any] = _table_json(table, isf_path)
        if callable(placement):
            placement = placement(self.isf)
        self.placement = placement
        _check_dtb_against_cr3(backend, placement.dtb)
        ctx.config["sva.kernel.memory_layer"] = PHYSICAL_LAYER
        ctx.config["sva.kernel.page_map_offset"] = placement.dtb
        ctx.config["sva.kernel.kernel_virtual_offset"] = placement.virtual_slide
        ctx.add_layer(intel.LinuxIntel32e(ctx, "sva.kernel", KERNEL_LAYER, metadata={"os": "Linux"}))
        # Context.module() registers the module under its name, which is what plugins'
        # "kernel" requirement looks up.
        module = ctx.module(KERNEL_MODULE, KERNEL_LAYER, offset=placement.virtual_slide)
        self.context = ctx
        self.module = module

    @classmethod
    def attach(
        cls,
        backend: MappedBackend,
        progress: Callable[[str], None] | None = None,
        **symbol_options: Any,
    ) -> GuestContext:
        """Symbols for this guest (cache, ISF dir, image or its own RAM), then the context."""
        from sva.symbols.sources import symbols_for_backend

        table = symbols_for_backend(backend, progress=progress, **symbol_options)
        source = str(table.path)

        def placement(isf: dict[str, Any]) -> KernelPlacement:
            if table.kaslr_slide is not None and table.phys_base is not None:
                pgt = _symbol(isf, "init_top_pgt", source)
                dtb = (pgt + table.kaslr_slide - START_KERNEL_MAP + table.phys_base) & MASK64
                return KernelPlacement(table.banner, table.kaslr_slide, table.phys_base, dtb)
            # A table from the cache or an ISF directory says nothing about this boot.
            return place_kernel(backend, isf, source)

        if progress:
            progress("loading the symbol table into volatility3")
        gc = cls(backend, table.path.as_uri(), placement)
        gc.symbol_table = table
        return gc

    def warm_up(self) -> None:
        """Build the caches volatility3 fills on first use, so that it happens before the
        first freeze rather than inside it: the address-to-symbol index (over a second for
        a kernel's symbol table) that every code-pointer check reads."""
        vmlinux = self.module
        if vmlinux.has_symbol("_stext"):
            vmlinux.get_symbols_by_absolute_location(vmlinux.get_symbol("_stext").address + vmlinux.offset)

    def begin_cycle(self) -> None:
        """Forget cached page tables: the guest ran since the last cycle."""
        clear_translation_caches()


def _table_json(table: Any, isf_path: str) -> dict[str, Any]:
    """The JSON volatility3 parsed for `table`.

    volatility3 2.x keeps it on the table's format delegate (`ISFormatTable._json_object`);
    reading the (xz-compressed) file a second time costs about a second per attach, so that
    is only the fallback for a volatility3 that keeps it elsewhere.
    """
    data = getattr(getattr(table, "_delegate", None), "_json_object", None)
    if isinstance(data, dict) and "user_types" in data and "symbols" in data:
        return data
    from urllib.parse import unquote, urlparse

    from sva.symbols.sources import load_isf

    url = urlparse(isf_path)
    return load_isf(unquote(url.path) if url.scheme == "file" else isf_path)
