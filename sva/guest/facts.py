"""Fact providers backed by volatility3: the bridge from a guest to the detectors.

`GuestSession` holds the one `GuestContext` of the current guest boot. It is built on
first use (symbols from cache or the guest's own RAM), kept across cycles, and rebuilt
when the guest reboots (a different kernel banner or KASLR placement). Providers read it
through `session.context_for(ctx)`; they return immutable values, as the fact contract
requires, because detectors run after the guest is thawed.

Facts provided here:
  boot_id          str: hash of the banner, the KASLR placement and pid 1's start time
  processes        tuple[ProcessInfo, ...] from the kernel's task list (with argv, exe)
  kernel_modules   tuple[KernelModule, ...] from the kernel's module list
Detector authors add providers of their own with `session.provider(name, fn)`, where
`fn(gc: GuestContext, ctx: FactContext)` computes the value from the live context.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from sva.engine.facts import FactContext, FactProvider, FunctionProvider, Unavailable
from sva.errors import SvaError
from sva.guest.context import GuestContext, place_kernel


class GuestSession:
    """The volatility3 view of one guest across cycles (rebuilt on reboot)."""

    def __init__(self, **symbol_options: Any) -> None:
        self._options = symbol_options
        self._gc: GuestContext | None = None
        self._cycle: tuple[int, int] = (-1, 0)
        self._jiffies: int | None = None  # the guest's jiffies_64 at the last boot_id
        self._boots = 0  # reboots seen by this session (jiffies went back)

    def attach(self, backend: Any) -> GuestContext:
        """Build the context ahead of the first cycle, so that the symbol work (seconds)
        happens while the guest runs rather than inside the first freeze."""
        self._gc = GuestContext.attach(backend, **self._options)
        self._gc.warm_up()
        release_resident(backend)  # the kernel search mapped the whole RAM
        return self._gc

    def context_for(self, ctx: FactContext) -> GuestContext:
        """The context for this cycle: attached once, checked once per cycle for a reboot."""
        backend = ctx.require_backend()
        if self._gc is not None and self._gc.backend is not backend:
            self._gc = None  # the engine reattached to a new backend (VM restarted)
        if self._gc is None:
            self._gc = GuestContext.attach(backend, **self._options)  # type: ignore[arg-type]
        if self._cycle != (ctx.cycle, ctx.attempt):  # a new cycle, or the engine redoes one
            self._cycle = (ctx.cycle, ctx.attempt)
            self._gc.begin_cycle()
        return self._gc

    def boot_id(self, ctx: FactContext) -> str:
        """The kernel build and its placement in RAM, the start time of the first task
        after init_task (pid 1), and how many times this session saw the guest's jiffies
        go back (a reboot starts them again). A reset can place the kernel where the last
        boot did, and early in boot the clock may tick in whole jiffies, so that pid 1
        starts at the same time as last boot: the jiffies going back still tell."""
        gc = self.context_for(ctx)
        jiffies = _read_symbol_u64(gc, "jiffies_64")
        if jiffies is not None:
            if self._jiffies is not None and jiffies < self._jiffies:
                self._boots += 1
            self._jiffies = jiffies
        p = gc.placement
        raw = f"{p.banner}|{p.virtual_slide:x}|{p.phys_base:x}|{_first_task_start(gc)}|{self._boots}".encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    def reads_running_kernel(self) -> bool:
        """False when the context's kernel page tables are no longer the ones the vCPU
        uses (a reset keeps RAM, so a context of the last boot can go on reading its
        leftovers); True when they are, or when there is no context or no registers to
        tell. Raises SvaError when the registers cannot be read now."""
        return self._gc is None or self._gc.reads_running_kernel()

    def provider(
        self,
        name: str,
        fn: Callable[[GuestContext, FactContext], Any],
        consistent: bool = True,
        requires: Iterable[str] = (),
    ) -> FactProvider:
        """A fact computed from the live volatility3 context; `requires` names the other
        facts `fn` reads through `ctx.fact`."""

        def compute(ctx: FactContext) -> Any:
            try:
                gc = self.context_for(ctx)
            except SvaError as e:
                return Unavailable(f"guest symbols/context: {e}")
            return fn(gc, ctx)

        return FunctionProvider(name=name, fn=compute, consistent=consistent, requires=frozenset(requires))

    def providers(self) -> list[FactProvider]:
        from sva.guest.processes import list_modules, list_processes

        return [
            FunctionProvider(name="boot_id", fn=self.boot_id, consistent=True),
            self.provider("processes", lambda gc, _ctx: list_processes(gc)),
            self.provider("kernel_modules", lambda gc, _ctx: list_modules(gc)),
        ]


def release_resident(backend: Any) -> None:
    """Drop the guest RAM pages a bulk read mapped into this process (see
    MappedBackend.release_resident); backends without a mapping have nothing to drop."""
    release = getattr(backend, "release_resident", None)
    if release is not None:
        release()


def _read_symbol_u64(gc: GuestContext, name: str) -> int | None:
    """The 64-bit value at kernel symbol `name` (None if it cannot be read)."""
    from sva.guest.processes import ADDRESS_MASK

    try:
        address = int(gc.isf["symbols"][name]["address"]) + gc.placement.virtual_slide
        layer = gc.context.layers[gc.module.layer_name]
        return int.from_bytes(layer.read(address & ADDRESS_MASK, 8), "little")
    except Exception:  # noqa: BLE001 - no such symbol, or unreadable: not used then
        return None


def _first_task_start(gc: GuestContext) -> int | None:
    """start_time of the task after init_task on the task list (None before there is one
    or when it cannot be read): fixed for a boot."""
    from sva.guest.processes import ADDRESS_MASK, task_layout

    try:
        lay = task_layout(gc)
        layer = gc.context.layers[gc.module.layer_name]
        head = (lay.init_task + lay.tasks) & ADDRESS_MASK
        link = int.from_bytes(layer.read(head, 8), "little") & ADDRESS_MASK
        if link == head:
            return None
        return int.from_bytes(layer.read((link - lay.tasks + lay.start_time) & ADDRESS_MASK, 8), "little")
    except Exception:  # noqa: BLE001 - early boot or a broken list: the placement alone identifies it
        return None


__all__ = ["GuestSession", "place_kernel", "release_resident"]
