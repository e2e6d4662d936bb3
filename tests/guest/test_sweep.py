"""The live sweeps spread over cycles (sva.guest.views.IncrementalSweep, used by the
`task_scan` and `module_carve` facts): first the cursor logic on a made-up area, then on
the lab guest, where a pass spread over four cycles must find what one whole sweep finds.
The hidden-process detection with a spread sweep is tested in tests/detectors/test_rootkit.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest

from sva.engine.facts import CycleFacts, FactContext, FactRegistry, FunctionProvider
from sva.errors import ConfigError
from sva.guest.context import GuestContext
from sva.guest.facts import GuestSession
from sva.guest.integrity import MODULE_ALIGN, ModuleCarver, _module_area_bounds, carve_modules
from sva.guest.processes import list_modules
from sva.guest.views import IncrementalSweep, TaskScanner, sweep_for_tasks, task_list_view
from sva.vmi import open_target

lab = pytest.mark.lab

ALIGN = 64
CHUNK = 1024


def plenty() -> float:
    return 60.0


def share(area: int, every: int, align: int) -> int:
    """A cycle's share: 1/every of the area, rounded up to the alignment."""
    per = -(-area // every)
    return -(-per // align) * align


class Area:
    """Leads at fixed addresses; `find` records each call, so tests see the slices."""

    def __init__(self, leads: set[int]) -> None:
        self.leads = leads
        self.calls: list[tuple[int, int]] = []

    def find(self, start: int, end: int) -> list[int]:
        self.calls.append((start, end))
        return sorted(a for a in self.leads if start <= a < end)


# -- the cursor logic (no guest) -------------------------------------------------------------


def test_every_cycle_sweeps_its_share_and_the_slices_tile_the_area() -> None:
    lo, hi = 3 * ALIGN, 3 * ALIGN + 157 * ALIGN  # 157 pieces: not a multiple of 4
    area = Area(set(range(lo, hi, 5 * ALIGN)))
    sweep = IncrementalSweep(4, CHUNK, 1000, "test", align=ALIGN)
    steps = [sweep.step(lo, hi, area.find, plenty) for _ in range(4)]
    assert [s.pass_complete for s in steps] == [False, False, False, True]
    assert all(s.swept <= share(hi - lo, 4, ALIGN) for s in steps) and sum(s.swept for s in steps) == hi - lo
    assert max(s.swept for s in steps) - min(s.swept for s in steps) <= share(hi - lo, 4, ALIGN) // 2  # even
    assert [s.covered for s in steps] == [sum(x.swept for x in steps[: i + 1]) for i in range(4)]
    assert all(s.area == hi - lo and s.truncated == "" for s in steps)
    # Contiguous, aligned, never across a chunk boundary of the absolute grid.
    assert area.calls[0][0] == lo and area.calls[-1][1] == hi
    assert all(a[1] == b[0] for a, b in itertools.pairwise(area.calls))
    assert all(s % ALIGN == 0 and e % ALIGN == 0 for s, e in area.calls)
    assert all(s // CHUNK == (e - 1) // CHUNK for s, e in area.calls)
    assert steps[-1].leads == tuple(sorted(area.leads)) and steps[-1].passes == 1


def test_every_one_is_a_whole_pass_each_cycle() -> None:
    area = Area({0, 800, 4096})
    sweep = IncrementalSweep(1, CHUNK, 1000, "test")
    for n in (1, 2):
        step = sweep.step(0, 5000, area.find, plenty)
        assert step.pass_complete and step.swept == step.covered == 5000 and step.passes == n
        assert step.leads == (0, 800, 4096)


def test_a_lead_lives_until_a_whole_pass_has_gone_by_without_it() -> None:
    area = Area({100, 3000})
    sweep = IncrementalSweep(2, CHUNK, 1000, "test")
    assert sweep.step(0, 4096, area.find, plenty).leads == (100,)  # first half only
    assert sweep.step(0, 4096, area.find, plenty).leads == (100, 3000)  # pass complete
    area.leads = {150, 3000}  # 100 moved to 150
    half = sweep.step(0, 4096, area.find, plenty)
    assert not half.pass_complete and half.leads == (100, 150, 3000)  # the last pass's leads stay
    whole = sweep.step(0, 4096, area.find, plenty)
    assert whole.pass_complete and whole.leads == (150, 3000)  # gone once a pass missed it


def test_a_cycle_cut_short_by_the_deadline_keeps_its_progress() -> None:
    area = Area({10, 2100, 4000})
    sweep = IncrementalSweep(1, CHUNK, 1000, "test")
    budget = iter([1.0, 1.0, 0.0])  # time for two chunks

    cut = sweep.step(0, 4096, area.find, lambda: next(budget))
    assert not cut.pass_complete and cut.swept == 2 * CHUNK and "deadline" in cut.truncated
    assert cut.leads == (10,)
    rest = sweep.step(0, 4096, area.find, plenty)  # goes on from the cursor
    assert rest.pass_complete and rest.swept == 2 * CHUNK and rest.covered == 4096 and not rest.truncated
    assert rest.leads == (10, 2100, 4000)
    skipped = sweep.step(0, 4096, area.find, plenty, skip="too little time")
    assert skipped.swept == 0 and skipped.truncated == "too little time" and skipped.leads == rest.leads


def test_leads_are_bounded_per_pass_and_in_the_union() -> None:
    area = Area(set(range(0, 4096, 8)))  # 512 leads
    sweep = IncrementalSweep(2, CHUNK, 100, "test")
    first = sweep.step(0, 4096, area.find, plenty)
    assert first.pass_complete and len(first.leads) == 100 and first.truncated == "stopped after 100 test leads"
    area.leads = set(range(4, 4096, 8))  # all new: the union would be 200
    second = sweep.step(0, 4096, area.find, plenty)
    assert len(second.leads) <= 100 and "stopped after 100" in second.truncated


def test_reset_forgets_the_cursor_and_the_leads() -> None:
    area = Area({100, 3000})
    sweep = IncrementalSweep(2, CHUNK, 1000, "test")
    sweep.step(0, 4096, area.find, plenty)
    sweep.step(0, 4096, area.find, plenty)
    sweep.reset()
    area.leads = set()
    again = sweep.step(0, 4096, area.find, plenty)
    assert again.leads == () and again.covered == 2048 and again.passes == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least 1 cycle"):
        TaskScanner(0)
    with pytest.raises(ConfigError, match="module carve"):
        ModuleCarver(0)
    with pytest.raises(ValueError, match="alignment"):
        IncrementalSweep(1, 100, 10, "test", align=64)


# -- on the lab guest ------------------------------------------------------------------------


def fact_context(backend: object, cycle: int) -> FactContext:
    return FactContext(
        CycleFacts(FactRegistry(), backend=backend, cycle=cycle),  # type: ignore[arg-type]
        FunctionProvider("test", lambda _c: None),
    )


@pytest.fixture(scope="module")
def live(lab_guest) -> Iterator[tuple[object, GuestContext]]:
    with open_target(f"lab:{lab_guest.name}") as backend:
        yield backend, GuestSession().attach(backend)


def run_cycles(
    compute: Callable[[GuestContext, FactContext], object], backend: object, gc: GuestContext, cycles: range
) -> list:
    out = []
    for cycle in cycles:
        gc.begin_cycle()
        out.append(compute(gc, fact_context(backend, cycle)))
    return out


@lab
def test_task_scan_over_four_cycles_finds_what_one_sweep_finds(live) -> None:
    backend, gc = live
    scanner = TaskScanner(4)
    with backend.frozen():  # the guest stands still: the two must agree exactly
        steps = run_cycles(scanner.compute, backend, gc, range(1, 9))
        full = sweep_for_tasks(gc, fact_context(backend, 100))
    area = full.area
    assert area >= 128 << 20 and full.swept == area and full.pass_complete
    assert [s.pass_complete for s in steps] == [False, False, False, True] * 2
    assert [s.covered for s in steps[:4]] == [area // 4 * k for k in (1, 2, 3, 4)]
    assert all(s.swept == area // 4 and not s.truncated for s in steps)  # one quarter each
    assert len(full.candidates) > 20
    assert steps[3].candidates == steps[7].candidates == full.candidates
    # A first partial pass has exactly the candidates of the part swept so far; a later
    # one hands out the last pass's candidates too.
    sched_off = int(gc.module.get_type("task_struct").relative_child_offset("sched_class"))
    for step in steps[:3]:
        assert step.candidates == tuple(c for c in full.candidates if c + sched_off < step.covered)
    assert steps[5].candidates == full.candidates


@lab
def test_task_scan_pass_over_a_running_guest_has_every_long_lived_task(live) -> None:
    backend, gc = live
    scanner = TaskScanner(4)
    gc.begin_cycle()
    before = {s.phys_address for s in task_list_view(gc, fact_context(backend, 0)).tasks}
    steps = run_cycles(scanner.compute, backend, gc, range(1, 5))
    gc.begin_cycle()
    after = {s.phys_address for s in task_list_view(gc, fact_context(backend, 5)).tasks}
    long_lived = before & after
    assert len(long_lived) > 20 and steps[-1].pass_complete
    assert long_lived <= set(steps[-1].candidates), sorted(long_lived - set(steps[-1].candidates))


@lab
def test_a_new_guest_context_restarts_the_task_scan(live) -> None:
    backend, gc = live
    scanner = TaskScanner(4)
    whole = run_cycles(scanner.compute, backend, gc, range(1, 5))[-1]
    assert whole.pass_complete and whole.passes == 1
    other = GuestSession().attach(backend)  # what a reattach after a reboot builds
    first = run_cycles(scanner.compute, backend, other, range(5, 6))[0]
    sched_off = int(other.module.get_type("task_struct").relative_child_offset("sched_class"))
    assert first.passes == 0 and first.covered == first.area // 4 and not first.pass_complete
    assert first.candidates and all(c + sched_off < first.covered for c in first.candidates)


@lab
def test_module_carve_over_four_cycles_finds_what_one_carve_finds(live) -> None:
    backend, gc = live
    carver = ModuleCarver(4)
    with backend.frozen():
        steps = run_cycles(carver.compute, backend, gc, range(1, 5))
        full = carve_modules(gc, fact_context(backend, 100))
        listed = {m.address for m in list_modules(gc)}
        lo, _hi = _module_area_bounds(gc)
    area = full.area
    assert [s.pass_complete for s in steps] == [False, False, False, True]
    assert all(0 < s.swept <= share(area, 4, MODULE_ALIGN) and not s.truncated for s in steps)
    assert steps[-1].covered == area == full.swept
    assert listed and listed <= set(full.addresses)
    assert steps[-1].addresses == full.addresses
    for step in steps[:3]:  # exactly the modules of the part carved so far
        assert step.addresses == tuple(a for a in full.addresses if a < lo + step.covered)
