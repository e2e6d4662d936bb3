"""The engine publishing through the real bus: a cycle's events go out as one batch, and a
journal that fills up part way through a cycle is reported, with nothing lost: the alerts
it did not take are published again at the next cycle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sva.bus import BusPublisher, BusSubscriber, ClientSecurity
from sva.engine.engine import Engine
from sva.engine.facts import FactRegistry
from sva.engine.model import VmIdentity
from sva.engine.rules import RuleSet
from sva.engine.testing import FunctionDetector, TestFinding, proc

from .conftest import collect

VM = VmIdentity(name="web01", target="snapshot:web01.raw", boot_id="boot-1")


def _findings(n: int) -> list[TestFinding]:
    return [
        TestFinding(rule="R-BATCH", title=f"finding {i}", process=proc(1000 + i, f"evil{i}", f"/tmp/evil{i}"),
                    evidence={"pad": "x" * 2000}, mitre=("T1496",))
        for i in range(n)
    ]  # fmt: skip


def _engine(bus: BusPublisher, n: int) -> Engine:
    det = FunctionDetector("batch", lambda facts, rules: _findings(n))
    return Engine(VM, rules=RuleSet(), detectors=[det], facts=FactRegistry([]), sinks=[bus])


def test_a_cycles_alerts_are_published_as_one_batch(
    publisher: Callable[..., BusPublisher], subscriber: Callable[..., BusSubscriber], keys: ClientSecurity
) -> None:
    bus = publisher()
    sub = subscriber(bus.endpoint, bus.replay_endpoint, since=0, security=keys)
    report = _engine(bus, 40).run_cycle()
    alerts = [a for a in report.alerts if a.state.value == "new"]
    assert len(alerts) == 40 and report.published == bus.latest_seq >= 40
    got = collect(sub, bus.latest_seq)
    assert [e.seq for e in got] == list(range(1, bus.latest_seq + 1))
    alert_events = [e for e in got if e.type.value == "alert"]
    assert sorted(e.payload["unmapped"]["sva"]["process"]["pid"] for e in alert_events) == list(range(1000, 1040))
    # publish_many stamps one time per journal write: one batch, not 40 single publishes
    assert len({e.time for e in alert_events}) == 1


def test_a_journal_full_mid_cycle_is_reported_and_the_rest_is_published_next_cycle(
    publisher: Callable[..., BusPublisher], subscriber: Callable[..., BusSubscriber], keys: ClientSecurity,
    mount_tmpfs: Callable[[str], Path],
) -> None:
    disk = mount_tmpfs("512k")
    ballast = disk / "ballast"
    ballast.write_bytes(b"b" * (300 << 10))
    bus = publisher(journal=disk / "journal", segment_bytes=1 << 20, retention_bytes=4 << 20)
    sub = subscriber(bus.endpoint, bus.replay_endpoint, since=0, security=keys)
    engine = _engine(bus, 60)  # ~5.7 KiB each in the journal: more than the ~200 KiB left
    first = engine.run_cycle()
    taken = bus.latest_seq
    assert 0 < taken < 60
    assert any(h.component == "sink" and "not published" in h.message for h in first.health)
    ballast.unlink()
    second = engine.run_cycle()
    got = collect(sub, bus.latest_seq)
    assert [e.seq for e in got] == list(range(1, bus.latest_seq + 1))  # no hole, nothing twice
    pids = sorted(e.payload["unmapped"]["sva"]["process"]["pid"] for e in got if e.type.value == "alert")
    assert pids == list(range(1000, 1060)), (taken, second.published)
