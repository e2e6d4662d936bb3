"""GuestContexts of guests that run the same kernel share one loaded symbol table, which
goes away with the last of them; each still reads its own guest right."""

from __future__ import annotations

import gc as pygc
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from sva import lab
from sva.guest.context import GuestContext, loaded_kernel_tables
from sva.guest.processes import list_processes
from sva.lab import LabGuest
from sva.vmi import open_target

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def second_guest() -> Iterator[LabGuest]:
    """A clean guest next to the session's infected one: same lab kernel, other processes."""
    name = f"t{os.getpid()}-shared"
    guest = lab.up(name, scenario="clean")
    try:
        yield guest
    finally:
        lab.down(name)


def _check_against_guest_ps(name: str, gc: GuestContext) -> set[str]:
    """The guest's own ps, before and after our read, agrees with the context's list."""
    before = {p.pid: p for p in lab.ps(name)}
    with gc.backend.frozen():
        gc.begin_cycle()
        ours = {p.pid: p for p in list_processes(gc)}
    after = {p.pid: p for p in lab.ps(name)}
    stable = set(before) & set(after)
    assert stable and stable <= set(ours), [before[p] for p in stable - set(ours)]
    for pid in stable:
        assert ours[pid].ppid == before[pid].ppid, (ours[pid], before[pid])
        assert before[pid].comm.startswith(ours[pid].comm), (ours[pid], before[pid])
    return {p.comm for p in ours.values()}


def _forget_volatility_caches() -> None:
    """volatility3's class-wide caches keep the last objects read (and so their contexts)
    until later reads evict them, which in the daemon the other workers' cycles do; here
    nothing else runs, so empty them, then collect the contexts' reference cycles."""
    from volatility3.framework.symbols.linux.extensions import task_struct

    from sva.guest.vollayer import clear_translation_caches

    clear_translation_caches()
    task_struct.add_process_layer.cache_clear()
    pygc.collect()


def test_two_guests_of_one_kernel_share_the_table(lab_guest: LabGuest, second_guest: LabGuest) -> None:
    backends = [open_target(f"lab:{g.name}") for g in (lab_guest, second_guest)]
    try:
        contexts: list[Any] = [GuestContext.attach(b) for b in backends]
        one, two = contexts
        assert one.symbol_table is not None and two.symbol_table is not None
        assert one.symbol_table.path == two.symbol_table.path, "the lab guests should run one kernel"
        table = one.context.symbol_space["kernel"]._shared
        assert two.context.symbol_space["kernel"]._shared is table
        assert one.context.symbol_space["kernel"]._sort_symbols is two.context.symbol_space["kernel"]._sort_symbols
        assert one.isf is two.isf
        # A typed symbol whose type points at itself (struct ftrace_ops.next), looked up in
        # both: each context resolves its own copy of the type (a shared one looped forever).
        for gc in (one, two, one):
            ops = gc.module.get_symbol("ftrace_ops_list")
            assert ops.type is not None and gc.module.get_type("ftrace_ops").has_member("next")
        del gc, ops  # (they would keep a context alive for the check at the end)
        assert one.context is not two.context and one.module is not two.module
        key = str(one.symbol_table.path.resolve())
        assert key in loaded_kernel_tables()
        # Each context reads its own guest: the infected scenario's miner is in one only.
        comms_one = _check_against_guest_ps(lab_guest.name, one)
        comms_two = _check_against_guest_ps(second_guest.name, two)
        assert "xmrig" in comms_one and "xmrig" not in comms_two
        # Both at once, from two threads (the daemon's workers): still each its own guest.
        results: dict[int, set[int]] = {}
        errors: list[BaseException] = []

        def walk(i: int, gc: GuestContext) -> None:
            try:
                for _ in range(3):
                    with gc.backend.frozen():
                        gc.begin_cycle()
                        gc.warm_up()
                        results[i] = {p.pid for p in list_processes(gc)}
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=walk, args=(i, c)) for i, c in enumerate(contexts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        for i, g in enumerate((lab_guest, second_guest)):
            guest_pids = {p.pid for p in lab.ps(g.name)}
            assert {1, 2} <= results[i] and len(guest_pids - results[i]) <= 2, (g.name, guest_pids - results[i])
        # The table stays while one context uses it, and goes with the last.
        del contexts, threads, one, table
        _forget_volatility_caches()
        assert key in loaded_kernel_tables()
        del two
        _forget_volatility_caches()
        assert key not in loaded_kernel_tables()
    finally:
        for b in backends:
            b.close()


def test_address_index_is_volatilitys_own(lab_guest: LabGuest) -> None:
    """The shared table builds its address-to-symbol index from the ISF directly; it must
    be the index volatility3 builds through get_symbol() (masked addresses, all symbols)."""
    with open_target(f"lab:{lab_guest.name}") as b:
        gc = GuestContext.attach(b)
        gc.warm_up()
        table = gc.context.symbol_space["kernel"]
        index = list(table._sort_symbols)
        assert len(index) > 10000
        assert index == sorted((table.get_symbol(name).address, name) for name in table.symbols)
        stext = gc.module.get_symbol("_stext").address + gc.module.offset
        assert "kernel!_stext" in list(gc.module.get_symbols_by_absolute_location(stext))


def test_process_layers_do_not_pile_up_across_cycles(lab_guest: LabGuest) -> None:
    """Reading argv makes volatility3 add a layer per process per cycle; a new cycle drops
    the last one's, so a context that lives for the guest's whole boot stays the same size."""
    with open_target(f"lab:{lab_guest.name}") as b:
        gc = GuestContext.attach(b)
        base = len(list(gc.context.layers))
        added = []
        for _ in range(4):
            with b.frozen():
                gc.begin_cycle()
                procs = list_processes(gc)
            assert any(p.argv for p in procs)
            added.append(len(list(gc.context.layers)) - base)
            # About one layer per process with an argv in this cycle (a few more for
            # processes that exited meanwhile); kept, they would add up cycle after cycle.
            with_argv = sum(1 for p in procs if p.argv)
            assert 0 < added[-1] <= with_argv + 3, (added, with_argv)
