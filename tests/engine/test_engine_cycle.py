"""One scan cycle: ordering, isolation, lazy facts, unavailable facts, freeze, stamping."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sva.engine.registry import load_detectors
from sva.engine.engine import Engine, RunStatus
from sva.engine.facts import (
    CycleFacts,
    FactRegistry,
    FactView,
    StaticFact,
    Unavailable,
    UndeclaredFactError,
    backend_fact_providers,
)
from sva.engine.model import AlertState, HealthStatus, Severity
from sva.engine.ruleload import loads_rules
from sva.engine.sinks import MemorySink
from sva.engine.testing import FunctionDetector, TestFinding, proc
from sva.testing import sample_registers, synthetic_backend

from .conftest import PausableSnapshot
from .helpers import VM, Counting, detector, finding, make_engine


# -- order and isolation ----------------------------------------------------------------


def test_detectors_run_in_the_given_order(sink: MemorySink) -> None:
    calls: list[str] = []

    def record(name: str) -> FunctionDetector:
        return detector(name, lambda f, r: calls.append(name) or [])

    eng = make_engine([record("c"), record("a"), record("b")], sinks=[sink])
    report = eng.run_cycle()
    assert calls == ["c", "a", "b"]
    assert [r.detector for r in report.detectors] == ["c", "a", "b"]
    assert all(r.status == RunStatus.OK for r in report.detectors)


def test_a_raising_detector_is_a_health_event_and_the_others_still_run(sink: MemorySink) -> None:
    def boom(facts: FactView, rules: object) -> list[TestFinding]:
        raise ValueError("walk went off the rails at 0xdead")

    def half_then_boom(facts: FactView, rules: object) -> Iterator[TestFinding]:
        yield finding("HALF", pid=7)  # partial output of a failing detector is dropped
        raise KeyError("task_struct")

    eng = make_engine([
        detector("first", lambda f, r: [finding("R-FIRST", pid=1)]),
        detector("broken", boom),
        detector("halfway", half_then_boom),
        detector("last", lambda f, r: [finding("R-LAST", pid=2)]),
    ], sinks=[sink])  # fmt: skip
    report = eng.run_cycle()

    assert [a.finding.rule for a in report.new] == ["R-FIRST", "R-LAST"]
    broken = report.run_of("broken")
    assert broken is not None and broken.status == RunStatus.ERROR
    assert "ValueError: walk went off the rails at 0xdead" in broken.message
    assert report.run_of("halfway").status == RunStatus.ERROR  # type: ignore[union-attr]
    errors = {h.component: h for h in report.health if h.status is HealthStatus.ERROR}
    assert set(errors) == {"detector:broken", "detector:halfway"}
    assert "walk went off the rails" in errors["detector:broken"].message
    assert errors["detector:broken"].details["exception"] == "ValueError"
    # Health events reach the sinks too, on topics per detector.
    topics = [e.topic for e in sink.of_type("health")]
    assert "sva.health.detector_broken" in topics and "sva.health.detector_halfway" in topics
    assert len(sink.of_type("alert")) == 2


def test_a_detector_returning_something_else_than_findings_is_an_error() -> None:
    eng = make_engine([detector("liar", lambda f, r: [{"rule": "X"}])])  # type: ignore[list-item]
    report = eng.run_cycle()
    run = report.run_of("liar")
    assert run is not None and run.status == RunStatus.ERROR
    assert "returned a dict, not a Finding" in run.message


def test_wall_time_is_measured_per_detector_and_slow_ones_are_reported() -> None:
    def slow(facts: FactView, rules: object) -> list[TestFinding]:
        time.sleep(0.05)
        return []

    eng = make_engine([detector("slow", slow), detector("fast")], slow_detector_seconds=0.02)
    report = eng.run_cycle()
    assert report.run_of("slow").seconds >= 0.05  # type: ignore[union-attr]
    assert report.run_of("fast").seconds < 0.05  # type: ignore[union-attr]
    warnings = [h for h in report.health if h.details.get("reason") == "slow"]
    assert [h.component for h in warnings] == ["detector:slow"]


def test_findings_over_the_limit_are_dropped_with_a_warning() -> None:
    eng = make_engine([detector("noisy", lambda f, r: (finding(pid=i) for i in range(25)))],
                      max_findings_per_detector=10)  # fmt: skip
    report = eng.run_cycle()
    assert len(report.new) == 10
    (warning,) = [h for h in report.health if h.details.get("reason") == "too-many-findings"]
    assert warning.details["dropped"] == 15


def test_evidence_that_is_not_json_drops_that_finding_only() -> None:
    eng = make_engine([detector("d", lambda f, r: [finding("BAD", pid=1, blob=b"\x00"), finding("GOOD", pid=2)])])
    report = eng.run_cycle()
    assert [a.finding.rule for a in report.new] == ["GOOD"]
    (h,) = report.health
    assert h.details["reason"] == "bad-evidence" and "BAD" in h.message


def test_detectors_are_checked_when_the_engine_is_built() -> None:
    from sva.errors import DetectorError

    with pytest.raises(DetectorError, match="enabled twice"):
        make_engine([detector("same"), detector("same")])
    with pytest.raises(DetectorError, match="must match"):
        make_engine([detector("Bad Id")])


# -- facts ------------------------------------------------------------------------------


def test_facts_are_computed_once_per_cycle_and_only_when_needed() -> None:
    shared = Counting("shared", 41)
    unused = Counting("unused", 0)
    seen: list[int] = []
    eng = make_engine([
        detector("one", lambda f, r: seen.append(f["shared"]) or [], needs={"shared"}),
        detector("two", lambda f, r: seen.append(f["shared"] + 1) or [], needs={"shared"}),
    ], [shared, unused])  # fmt: skip
    report = eng.run_cycle()
    assert seen == [41, 42]
    assert (shared.calls, unused.calls) == (1, 0)
    assert [r.name for r in report.facts] == ["shared"]
    eng.run_cycle()
    assert (shared.calls, unused.calls) == (2, 0)  # cached for one cycle only


def test_a_fact_reads_the_facts_it_requires_and_only_those() -> None:
    base = Counting("base", 10)
    derived = Counting("derived", requires={"base"}, fn=lambda ctx: ctx.fact("base") * 2)
    sneaky = Counting("sneaky", fn=lambda ctx: ctx.fact("base"))  # does not declare it
    got: dict[str, object] = {}

    def use(f: FactView, r: object) -> list[TestFinding]:
        got.update(f)
        return []

    eng = make_engine([detector("d", use, needs={"derived"}), detector("s", needs={"sneaky"})],
                      [base, derived, sneaky])  # fmt: skip
    report = eng.run_cycle()
    assert got == {"derived": 20}
    assert base.calls == 1
    assert report.run_of("s").status == RunStatus.SKIPPED  # type: ignore[union-attr]
    assert "without listing it in `requires`" in report.run_of("s").message  # type: ignore[union-attr]


def test_dependency_cycles_between_facts_are_unavailable_not_a_hang() -> None:
    a = Counting("a", requires={"b"}, fn=lambda ctx: ctx.fact("b"))
    b = Counting("b", requires={"a"}, fn=lambda ctx: ctx.fact("a"))
    facts = CycleFacts(FactRegistry([a, b]))
    value = facts.get("a")
    assert isinstance(value, Unavailable)
    # b saw the cycle; a got b's value, which is the Unavailable.
    assert "dependency cycle between facts: a -> b -> a" in value.reason


def test_unavailable_facts_skip_their_detectors_with_a_health_event(sink: MemorySink) -> None:
    no_symbols = Counting("kernel_symbols", Unavailable("no BTF in this kernel"))
    crashing = Counting("modules", fn=lambda ctx: 1 // 0)
    ran: list[str] = []
    eng = make_engine([
        detector("needs_symbols", lambda f, r: ran.append("needs_symbols") or [], needs={"kernel_symbols"}),
        detector("needs_modules", lambda f, r: ran.append("needs_modules") or [], needs={"modules"}),
        detector("needs_nothing_known", lambda f, r: ran.append("x") or [], needs={"no_such_fact"}),
        detector("independent", lambda f, r: ran.append("independent") or [finding()]),
    ], [no_symbols, crashing], sinks=[sink])  # fmt: skip
    report = eng.run_cycle()

    assert ran == ["independent"]
    assert len(report.new) == 1
    skipped = {r.detector: r for r in report.detectors if r.status == RunStatus.SKIPPED}
    assert set(skipped) == {"needs_symbols", "needs_modules", "needs_nothing_known"}
    events = {h.component: h for h in report.health}
    sym = events["detector:needs_symbols"]
    assert sym.status is HealthStatus.WARNING
    assert "kernel_symbols" in sym.message and "no BTF in this kernel" in sym.message
    assert sym.details == {"reason": "fact-unavailable", "facts": {"kernel_symbols": "no BTF in this kernel"}}
    assert "ZeroDivisionError: integer division or modulo by zero" in events["detector:needs_modules"].message
    assert "no provider for fact 'no_such_fact'" in events["detector:needs_nothing_known"].message
    assert {e.payload["component"] for e in sink.of_type("health")} >= {"detector:needs_symbols"}


def test_factview_gives_only_declared_facts() -> None:
    facts = CycleFacts(FactRegistry([StaticFact("a", 1), StaticFact("b", 2)]))
    view = FactView("det", frozenset({"a"}), facts)
    assert view["a"] == 1
    assert "a" in view and "b" not in view
    assert list(view) == ["a"] and len(view) == 1
    with pytest.raises(UndeclaredFactError, match="read fact 'b' but its `needs` declares only a"):
        view["b"]
    assert not facts.computed("b")  # refused before anything was computed


def test_a_detector_reading_an_undeclared_fact_fails_alone() -> None:
    eng = make_engine([detector("greedy", lambda f, r: [f["secret"]], needs={"a"}), detector("fine")],
                      [StaticFact("a", 1), StaticFact("secret", 2)])  # fmt: skip
    report = eng.run_cycle()
    run = report.run_of("greedy")
    assert run is not None and run.status == RunStatus.ERROR
    assert "UndeclaredFactError" in run.message and "'secret'" in run.message
    assert report.run_of("fine").status == RunStatus.OK  # type: ignore[union-attr]


# -- freeze -----------------------------------------------------------------------------


def test_consistent_facts_are_computed_inside_the_freeze_and_detectors_after(pausable: PausableSnapshot) -> None:
    in_freeze = Counting("task_list", fn=lambda ctx: ("paused" if ctx.backend.paused else "running"), consistent=True)
    after = Counting("config", fn=lambda ctx: ("paused" if ctx.backend.paused else "running"))
    states: list[str] = []

    def look(f: FactView, r: object) -> list[TestFinding]:
        states.extend([f["task_list"], f["config"], "paused" if pausable.paused else "running"])
        return []

    eng = make_engine([detector("d", look, needs={"task_list", "config"})], [in_freeze, after], backend=pausable,
                      snapshot_attempts=0)  # the classic freeze (short-pause copies: below)  # fmt: skip
    report = eng.run_cycle()
    assert states == ["paused", "running", "running"]
    assert pausable.log == ["pause", "resume"]
    assert report.pause_seconds is not None and report.pause_seconds >= 0
    records = {r.name: r for r in report.facts}
    assert records["task_list"].in_freeze and not records["config"].in_freeze


def test_live_prerequisites_of_frozen_facts_run_before_the_freeze(pausable: PausableSnapshot) -> None:
    seen: dict[str, Any] = {}

    def record(name: str, value: Any = None) -> Callable[[Any], Any]:
        def fn(ctx: Any) -> Any:
            seen[name] = ("paused" if ctx.backend.paused else "running", list(pausable.log), value and ctx.fact(value))
            return name

        return fn

    sweep = Counting("ram_sweep", fn=record("ram_sweep"))
    views = Counting("views", fn=record("views", "ram_sweep"), consistent=True, requires={"ram_sweep"})
    # Reads a frozen fact itself, so it cannot run before the freeze.
    derived = Counting("derived", fn=record("derived", "views"), requires={"views"})
    recheck = Counting("recheck", fn=record("recheck", "derived"), consistent=True, requires={"derived"})
    eng = make_engine([detector("d", needs={"views", "recheck"})], [sweep, derived, views, recheck], backend=pausable,
                      snapshot_attempts=0)  # fmt: skip
    assert eng.live_prerequisites(["views", "recheck"]) == ["ram_sweep"]
    report = eng.run_cycle()
    assert seen["ram_sweep"] == ("running", [], None)  # before the pause
    assert seen["views"] == ("paused", ["pause"], "ram_sweep")
    assert seen["derived"][0] == seen["recheck"][0] == "paused"
    assert sweep.calls == views.calls == derived.calls == 1
    records = {r.name: r for r in report.facts}
    assert next(iter(records)) == "ram_sweep" and not records["ram_sweep"].in_freeze
    assert records["views"].in_freeze and records["recheck"].in_freeze
    assert pausable.log == ["pause", "resume"]


def test_consistent_facts_from_short_pause_copies_and_reused_while_their_pages_hold(
    pausable: PausableSnapshot,
) -> None:
    """The walk runs with the guest running, on a copy taken in a short pause; redone from a
    bigger copy when it read outside the copy; its value reused while its pages are equal."""
    seen: list[tuple[bool, bool, bytes]] = []

    def walk(ctx: Any) -> bytes:
        data = ctx.backend.read(0x3000, 16) + ctx.backend.read(0x5FF8, 16)  # 3 pages
        seen.append((ctx.backend.paused, ctx.backend._overlay is not None, data))
        return data

    table = Counting("kernel_table", fn=walk, consistent=True)
    other = Counting("task_list", fn=lambda ctx: ctx.backend.read(0x9000, 8) and ctx.cycle, consistent=True)
    other.reusable = False  # type: ignore[attr-defined]  # its value is not only a function of memory
    eng = make_engine([detector("d", needs={"kernel_table", "task_list"})], [table, other], backend=pausable)
    first = eng.run_cycle()
    # nothing copied yet: the first try read live (misses), the second read only the copy
    assert pausable.log == ["pause", "resume", "pause", "resume"]
    assert [(p, o) for p, o, _ in seen] == [(False, True), (False, True)]
    assert eng.snapshot_stats.attempts == 2 and eng.snapshot_stats.consistent  # type: ignore[union-attr]
    assert eng.snapshot_stats.touched == 4 and first.pause_seconds is not None  # type: ignore[union-attr]
    assert all(r.in_freeze for r in first.facts)
    pausable.log.clear()
    second = eng.run_cycle()
    assert pausable.log == ["pause", "resume"] and table.calls == 2  # reused: its pages did not change
    assert {r.name: r.reused for r in second.facts} == {"kernel_table": True, "task_list": False}
    assert eng.snapshot_stats.reused == 1  # type: ignore[union-attr]
    # the guest writes one byte of a page the walk read (this test plays the guest)
    with open(pausable.path, "r+b") as f:
        f.seek(0x5FFF)
        old = f.read(1)
        f.seek(0x5FFF)
        f.write(bytes([old[0] ^ 0xFF]))
    third = eng.run_cycle()
    assert table.calls == 3 and not {r.name: r.reused for r in third.facts}["kernel_table"]
    assert seen[-1][2] != seen[0][2]


def test_no_freeze_when_no_enabled_detector_needs_a_consistent_fact(pausable: PausableSnapshot) -> None:
    eng = make_engine([detector("d", needs={"config"})],
                      [Counting("config", 1), Counting("task_list", 2, consistent=True)], backend=pausable)  # fmt: skip
    report = eng.run_cycle()
    assert pausable.log == []
    assert report.pause_seconds is None
    assert eng.needed_facts() == ["config"]
    assert [r.name for r in report.facts] == ["config"]


def test_a_guest_that_cannot_be_frozen_fails_the_cycle_without_resolving_anything(
    pausable: PausableSnapshot, sink: MemorySink
) -> None:
    det = detector("d", lambda f, r: [finding()], needs={"task_list"})
    eng = make_engine([det], [Counting("task_list", 1, consistent=True)], backend=pausable, sinks=[sink])
    assert len(eng.run_cycle().new) == 1
    pausable.fail_pause = True
    report = eng.run_cycle()
    assert report.error is not None and "QMP socket went away" in report.error
    assert report.detectors == () and report.alerts == ()
    (h,) = report.health
    assert (h.component, h.status, h.details["reason"]) == ("vmi", HealthStatus.ERROR, "freeze-failed")
    assert det.calls == 1
    assert sink.events[-1].payload["component"] == "vmi"
    pausable.fail_pause = False
    report = eng.run_cycle()
    assert [a.state for a in report.alerts] == [AlertState.STILL_PRESENT]


def test_facts_from_a_real_backend(tmp_path: Path) -> None:
    regions = [(0, 1 << 20), (1 << 32, 1 << 16)]
    with synthetic_backend(tmp_path, regions, name="a.bin") as plain, synthetic_backend(
        tmp_path, regions, name="b.bin", registers=[sample_registers(0), sample_registers(1)]
    ) as with_regs:
        seen: dict[str, object] = {}
        det = detector("mem", lambda f, r: seen.update(f) or [], needs={"phys_memory_size", "memory_map"})
        regs = detector("regs", lambda f, r: seen.update(f) or [], needs={"vcpu_registers"})

        report = make_engine([det, regs], backend_fact_providers(), backend=plain).run_cycle()
        assert seen == {"phys_memory_size": (1 << 20) + (1 << 16), "memory_map": tuple(regions)}
        assert report.run_of("regs").status == RunStatus.SKIPPED  # type: ignore[union-attr]
        assert "has no vCPU registers" in report.run_of("regs").message  # type: ignore[union-attr]
        assert report.pause_seconds == 0.0  # a snapshot's frozen() is a no-op

        seen.clear()
        report = make_engine([regs], backend_fact_providers(), backend=with_regs).run_cycle()
        assert seen["vcpu_registers"] == (sample_registers(0), sample_registers(1))
        assert [r.in_freeze for r in report.facts] == [True]


def test_without_a_backend_backend_facts_are_unavailable() -> None:
    report = make_engine([detector("mem", needs={"phys_memory_size"})], backend_fact_providers()).run_cycle()
    assert "this engine has no VMI backend" in report.run_of("mem").message  # type: ignore[union-attr]


# -- stamping -----------------------------------------------------------------------------

RULES = loads_rules('''
[ruleset]
name = "test_policy"
version = "2.3.4"

[[rule]]
id = "R1"
kind = "process_name"
version = 7
maturity = "stable"
severity = "high"
title = "Named badly"
description = "test rule"
names = ["evil"]
''', "test_policy.toml")


def test_the_engine_stamps_vm_cycle_times_and_versions(clock, uid_factory) -> None:  # type: ignore[no-untyped-def]
    impostor = TestFinding(rule="R1", title="t", process=proc(5, "evil"), detector="someone_else")
    det = detector("stamper", lambda f, r: [impostor])
    bundle = ["2025.11.0"]
    eng = make_engine([det], rules=RULES, clock=clock, uid_factory=uid_factory,
                      signature_bundle=lambda: bundle[0])  # fmt: skip
    (a,) = eng.run_cycle().alerts
    assert a.vm == VM and a.cycle == 1 and a.uid == "uid-1"
    assert a.finding.detector == "stamper"  # the engine's word, not the detector's
    assert (a.detector_version, a.signature_bundle) == ("0.0.1", "2025.11.0")
    assert (a.rule_name, a.rule_version, a.ruleset_version) == ("Named badly", "7", "2.3.4")
    assert a.first_seen == a.last_seen == a.emitted == clock.now
    assert a.severity is Severity.LOW  # TestFinding's class default

    first = clock.now
    clock.tick(30)
    bundle[0] = "2025.12.0"
    report = eng.run_cycle()
    (b,) = report.alerts
    assert (b.state, b.cycle, b.uid) == (AlertState.STILL_PRESENT, 2, "uid-1")
    assert (b.first_seen, b.last_seen) == (first, first + 30)
    assert b.signature_bundle == "2025.12.0"
    assert report.cycle == 2 and eng.cycle == 2


def test_boot_id_comes_from_its_fact_and_a_reboot_resolves_the_old_boot(clock, uid_factory) -> None:  # type: ignore[no-untyped-def]
    boot = ["boot-A"]
    det = detector("d", lambda f, r: [finding(pid=100)])
    eng = make_engine([det], [Counting("boot_id", fn=lambda ctx: boot[0])], clock=clock, uid_factory=uid_factory)
    first = eng.run_cycle()
    assert first.vm.boot_id == "boot-A" and first.new[0].vm.boot_id == "boot-A"
    boot[0] = "boot-B"
    second = eng.run_cycle()
    assert [(a.state, a.uid) for a in second.alerts] == [(AlertState.RESOLVED, "uid-1"), (AlertState.NEW, "uid-2")]
    assert second.vm.boot_id == "boot-B"
    assert any(h.details.get("reason") == "reboot" for h in second.health)


# -- the loop -----------------------------------------------------------------------------


def test_run_repeats_cycles_until_stopped() -> None:
    eng = make_engine([detector("d")])
    stop = threading.Event()
    reports: list[int] = []

    def on_cycle(report) -> None:  # type: ignore[no-untyped-def]
        reports.append(report.cycle)
        if len(reports) == 3:
            stop.set()

    assert eng.run(0.0, stop, on_cycle) == 3
    assert reports == [1, 2, 3]
    assert eng.run(0.0, threading.Event(), max_cycles=2) == 2
    assert eng.cycle == 5


def test_default_engine_uses_the_default_detectors_and_backend_facts() -> None:
    eng = Engine(VM, rules=RULES)
    from detectors import DEFAULT_DETECTORS

    assert [d.id for d in eng.detectors] == [d.id for d in load_detectors(DEFAULT_DETECTORS)]
    assert [d.id for d in eng.detectors][0] == "process_policy"
    report = eng.run_cycle()
    assert report.run_of("process_policy").status == RunStatus.SKIPPED  # type: ignore[union-attr]
