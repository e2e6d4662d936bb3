"""One volatility3 context per guest boot, reused every scan cycle.

Building the context is the expensive part (symbols from the guest's own BTF and kallsyms,
ISF loaded once without re-validation); a cycle only clears the page-table caches and
reads. The kernel's page tables (DTB) come from the symbol table's `init_top_pgt` placed
with this boot's KASLR slide and physical base, and are cross-checked against the live
CR3 when the backend has registers: the kernel half of the top-level table must be the
same (CR3 may hold a user process's tables, or the user copy under PTI).

The loaded symbol table (the parsed ISF, ~70 MB of dicts, plus volatility3's symbol cache
and address index, ~70 MB more for a Debian kernel) is shared by every GuestContext of the
process that uses the same ISF file: the daemon's workers watching VMs that run the same
kernel build pay for it once (see `shared_kernel_table`).
"""

from __future__ import annotations

import copy
import functools
import os
import struct
import threading
import weakref
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

        framework.require_interface_version(2, 0, 0)
        self.backend = backend
        self.symbol_table: SymbolTable | None = None  # where the table came from, set by attach
        ctx = contexts.Context()
        ctx.add_layer(BackendLayer(ctx, "sva.memory", PHYSICAL_LAYER, backend))
        table = context_view(shared_kernel_table(isf_path))
        # The table lives in a context of its own (see shared_kernel_table); this context's
        # configuration says the same, for plugins that read a table's settings from it.
        ctx.config[f"{TABLE_CONFIG_PATH}.isf_url"] = isf_path
        ctx.config[f"{TABLE_CONFIG_PATH}.symbol_mask"] = SYMBOL_MASK
        ctx.symbol_space.append(table)
        self.kernel_table = table  # holds the shared table for as long as this context lives
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
        self._base_layers = frozenset(ctx.layers)
        self._base_config = frozenset(ctx.config)  # the module's own is under `temporary.` too

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

    def reads_running_kernel(self) -> bool:
        """The check made at attach, again: does the kernel half of CR3's top-level table
        still equal this context's DTB's? (See GuestSession.reads_running_kernel.)"""
        try:
            _check_dtb_against_cr3(self.backend, self.placement.dtb)
        except SymbolsError:
            return False
        return True

    def begin_cycle(self) -> None:
        """Forget cached page tables: the guest ran since the last cycle; and drop the
        per-process layers the last cycle added."""
        clear_translation_caches()
        self._drop_cycle_layers()

    def _drop_cycle_layers(self) -> None:
        """volatility3's task_struct.add_process_layer adds a layer (and its configuration
        under `temporary.`) on every call for a new task object, which is every cycle: kept,
        they would pile up in a context that lives for the guest's whole boot. The name it
        returns is cached per task object, and a new cycle's task objects are new."""
        layers, config = self.context.layers, self.context.config
        for name in [n for n in layers if n not in self._base_layers]:
            layers.del_layer(name)
        for key in [k for k in config if k.startswith(f"{TEMPORARY_CONFIG}.") and k not in self._base_config]:
            del config[key]


TABLE_CONFIG_PATH = "sva.symbols"
TEMPORARY_CONFIG = "temporary"  # where volatility3 configures the layers it adds on the fly
# The Intel layer hands out 48-bit addresses, so symbol lookups mask the same way
# (volatility3's automagic does this too).
SYMBOL_MASK = (1 << 48) - 1

# ISF file identity -> the loaded table, for as long as some GuestContext holds it.
_TABLES: weakref.WeakValueDictionary[tuple[Any, ...], Any] = weakref.WeakValueDictionary()
# Held while a table is looked up or built: a second worker attaching to a VM of the same
# kernel waits for the first one's table instead of loading a copy of its own. Builds of
# different kernels wait for each other too (loading is GIL-bound, little is lost).
_TABLES_LOCK = threading.Lock()


def _table_key(isf_url: str) -> tuple[Any, ...]:
    """The ISF file's identity: a file rewritten in place (same name) is a new table."""
    from urllib.parse import unquote, urlparse

    url = urlparse(isf_url)
    if url.scheme not in ("", "file"):
        return (isf_url,)
    path = unquote(url.path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise SymbolsError(path, f"cannot read the symbol table: {e.strerror}") from None
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def shared_kernel_table(isf_url: str) -> Any:
    """The loaded volatility3 table of the kernel ISF at `isf_url`, one per file per process.

    Every GuestContext of the same kernel build appends this one instance to its own symbol
    space; it is dropped when the last of them is gone (a weak cache entry), so a kernel
    upgrade does not keep the old table. Sharing is sound because the table reads nothing
    from a guest: it is built in a private context that holds only its configuration (the
    symbol mask), templates hold no context (objects are built from them with the caller's),
    and each context keeps its own resolved-type cache. What the table caches itself (symbols,
    the address index) is filled lazily; two threads filling it at once at worst build the
    same entry twice, both equal. A cached symbol's type template is resolved in place by
    the first context that asks (volatility3 replaces its references with that context's
    resolved types): the same types of the same table, whichever context did it. Its
    `clear_symbol_cache` is a no-op, so no worker can empty the cache under another's lookup.
    """
    key = _table_key(isf_url)
    with _TABLES_LOCK:
        table = _TABLES.get(key)
        if table is None:
            table = _build_kernel_table(isf_url)
            _TABLES[key] = table
        return table


def context_view(shared: Any) -> Any:
    """The shared table as one context uses it: the same parsed ISF, class types and
    address index, with a symbol cache of its own. volatility3 resolves a cached symbol's
    type in place, within the context that asked, into a graph that may loop (a struct
    pointing at its own type); another context resolving that same object again would
    recurse without end. The view keeps the shared table alive."""
    view = copy.copy(shared)
    view._delegate = copy.copy(shared._delegate)
    view._delegate._symbol_cache = {}
    view._shared = shared
    return view


def loaded_kernel_tables() -> list[str]:
    """The ISF files (paths or URLs) whose tables are loaded now, for metrics and tests."""
    with _TABLES_LOCK:
        return sorted(str(key[0]) for key in list(_TABLES))


@functools.cache
def _shared_table_class() -> type:
    from volatility3.framework.symbols import linux

    class SharedLinuxKernelSymbols(linux.LinuxKernelIntermedSymbols):  # type: ignore[misc]
        """A kernel table shared by several contexts: its symbol cache is never cleared
        (it depends only on the ISF and the mask), so a lookup in one worker cannot lose
        an entry to a clear from another."""

        def clear_symbol_cache(self) -> None:
            return None

        def get_symbols_by_location(self, offset: int, size: int = 0) -> Any:
            # volatility3 builds its address index with get_symbol() on every symbol, which
            # fills the symbol cache with ~80k symbol objects and their type templates
            # (~50 MB, 1.5 s); the same (address, name) index straight from the ISF is ~8 MB.
            if not self._sort_symbols:
                index = _address_index(self._delegate._json_object, self.config.get("symbol_mask", 0))
                self._sort_symbols: list[tuple[int, str]] = index
            return super().get_symbols_by_location(offset, size)

    return SharedLinuxKernelSymbols


def _address_index(isf: dict[str, Any], mask: int) -> list[tuple[int, str]]:
    """(address, name) of every symbol with an address, sorted, masked like get_symbol()."""
    out: list[tuple[int, str]] = []
    for name, sym in isf.get("symbols", {}).items():
        address = sym.get("address") if isinstance(sym, dict) else None
        if isinstance(address, int):
            out.append((address & mask if mask else address, name))
    out.sort()
    return out


def _build_kernel_table(isf_url: str) -> Any:
    from volatility3.framework import contexts

    holder = contexts.Context()
    # Into the configuration before the table exists: the table caches symbols while it is built.
    holder.config[f"{TABLE_CONFIG_PATH}.symbol_mask"] = SYMBOL_MASK
    # validate=False: the table was checked against volatility3's schema when built;
    # validating a kernel-sized table again costs tens of seconds per attach.
    table = _shared_table_class()(
        holder, TABLE_CONFIG_PATH, name=KERNEL_MODULE, isf_url=isf_url, validate=False, symbol_mask=SYMBOL_MASK
    )
    table.get_symbols_by_location(0)  # the address index, built once for every context's view
    return table


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
