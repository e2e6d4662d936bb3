"""Alert states across cycles: new → still_present (no re-alert) → changed → resolved."""

from __future__ import annotations

from sva.engine.dedup import AlertTracker, finding_key
from sva.engine.model import AlertState, Severity
from sva.engine.rules import RuleSet, Suppression
from sva.engine.sinks import MemorySink
from sva.engine.testing import TestFinding, proc

from .helpers import detector, finding, make_engine


def _alerts(sink: MemorySink) -> list[tuple[str, str, str]]:
    """(state, rule, uid) of each alert event published so far."""
    out = []
    for e in sink.of_type("alert"):
        sva = e.payload["unmapped"]["sva"]
        out.append((sva["state"], sva["rule"]["id"], e.payload["finding_info"]["uid"]))
    return out


def test_a_finding_lives_new_still_present_changed_resolved(sink: MemorySink, clock, uid_factory) -> None:  # type: ignore[no-untyped-def]
    world = {"present": True, "port": 4444, "counter": 0}

    def look(facts: object, rules: object) -> list[TestFinding]:
        if not world["present"]:
            return []
        return [finding("SHELL", pid=300, comm="nc", port=world["port"], counter=world["counter"])]

    eng = make_engine([detector("net", look, material={"port"})], sinks=[sink], clock=clock, uid_factory=uid_factory)

    r1 = eng.run_cycle()
    assert [a.state for a in r1.alerts] == [AlertState.NEW]
    assert _alerts(sink) == [("new", "SHELL", "uid-1")]

    clock.tick()
    world["counter"] = 1  # not a material field: no re-alert
    r2 = eng.run_cycle()
    assert [a.state for a in r2.alerts] == [AlertState.STILL_PRESENT]
    assert r2.still_present[0].finding.evidence["counter"] == 1
    assert len(sink.of_type("alert")) == 1  # reported in the cycle summary only

    clock.tick()
    world["port"] = 5555  # material: re-alerted as changed, same uid
    r3 = eng.run_cycle()
    (changed,) = r3.changed
    assert (changed.uid, changed.changed_fields) == ("uid-1", ("port",))
    assert changed.first_seen == r1.alerts[0].first_seen and changed.last_seen == clock.now
    assert _alerts(sink)[-1] == ("changed", "SHELL", "uid-1")
    assert sink.of_type("alert")[-1].payload["unmapped"]["sva"]["changed_fields"] == ["port"]

    clock.tick()
    r4 = eng.run_cycle()
    assert [a.state for a in r4.alerts] == [AlertState.STILL_PRESENT]
    assert len(sink.of_type("alert")) == 2

    clock.tick()
    last_seen = clock.now - 0.0
    world["present"] = False
    r5 = eng.run_cycle()
    (resolved,) = r5.resolved
    assert resolved.uid == "uid-1" and resolved.last_seen == last_seen - 10
    assert len(sink.of_type("alert")) == 2  # resolved is not an OCSF "New" finding ...
    (event,) = [e for e in sink.of_type("health") if e.payload["details"].get("reason") == "resolved"]
    assert event.payload["component"] == "engine"
    assert event.payload["details"]["findings"][0]["uid"] == "uid-1"  # ... it is announced here
    assert eng.tracked == 0

    clock.tick()
    world["present"] = True
    r6 = eng.run_cycle()
    assert [(a.state, a.uid) for a in r6.alerts] == [(AlertState.NEW, "uid-2")]


def test_a_severity_change_is_material_even_without_material_fields() -> None:
    sev = [Severity.MEDIUM]
    def look(facts: object, rules: object) -> list[TestFinding]:
        return [TestFinding(rule="R", title="t", severity=sev[0], process=proc(9, "x"))]

    eng = make_engine([detector("d", look)])
    eng.run_cycle()
    sev[0] = Severity.CRITICAL
    (a,) = eng.run_cycle().alerts
    assert (a.state, a.changed_fields) == (AlertState.CHANGED, ("severity",))


def test_identity_is_kind_pid_start_time_and_rule() -> None:
    a = finding("R", pid=10)
    assert a.dedup_key == ("test.finding", 10, 10_000, "R")
    same_pid_new_process = TestFinding(rule="R", title="t", process=proc(10, "evil", start_time=99))
    assert same_pid_new_process.dedup_key != a.dedup_key
    no_process = TestFinding(rule="R", title="t", subject=("module", 0xFFFFFFFFC0001000))
    assert no_process.dedup_key == ("test.finding", None, None, "R", "module", 0xFFFFFFFFC0001000)


def test_a_reused_pid_is_a_new_finding_and_the_old_one_resolves() -> None:
    start = [1000]
    def look(facts: object, rules: object) -> list[TestFinding]:
        return [TestFinding(rule="R", title="t", process=proc(42, "x", start_time=start[0]))]

    eng = make_engine([detector("d", look)])
    eng.run_cycle()
    start[0] = 2000
    report = eng.run_cycle()
    assert sorted(a.state.value for a in report.alerts) == ["new", "resolved"]


def test_findings_of_a_failed_or_skipped_detector_are_held_not_resolved(sink: MemorySink) -> None:
    mode = ["ok"]

    def flaky(facts: object, rules: object) -> list[TestFinding]:
        if mode[0] == "fail":
            raise RuntimeError("guest memory changed under us")
        return [finding("R", pid=1)]

    class Toggle:
        name = "walk"
        consistent = False

        def compute(self, ctx: object) -> object:
            from sva.engine.facts import Unavailable

            return Unavailable("symbols missing") if mode[0] == "skip" else 1

    eng = make_engine([detector("flaky", flaky, needs={"walk"})], [Toggle()], sinks=[sink])
    assert len(eng.run_cycle().new) == 1
    for m in ("fail", "skip"):
        mode[0] = m
        report = eng.run_cycle()
        assert report.alerts == () and eng.tracked == 1, m
    mode[0] = "ok"
    assert [a.state for a in eng.run_cycle().alerts] == [AlertState.STILL_PRESENT]
    assert len(sink.of_type("alert")) == 1


def test_suppressing_an_alerted_finding_holds_it_and_lifting_it_does_not_re_alert(sink: MemorySink) -> None:
    eng = make_engine([detector("d", lambda f, r: [finding("R", pid=1), finding("Q", pid=2)])], sinks=[sink])
    assert len(eng.run_cycle().new) == 2
    quiet = RuleSet(suppressions=(Suppression(id="S1", reason="known", rule=("R",)),))
    eng.set_rules(quiet)
    report = eng.run_cycle()
    assert [(s.suppression, s.finding.rule) for s in report.suppressed] == [("S1", "R")]
    assert [(a.state, a.finding.rule) for a in report.alerts] == [(AlertState.STILL_PRESENT, "Q")]
    eng.set_rules(RuleSet())
    report = eng.run_cycle()
    assert sorted((a.state.value, a.finding.rule) for a in report.alerts) == [
        ("still_present", "Q"), ("still_present", "R")
    ]  # fmt: skip
    assert len(sink.of_type("alert")) == 2


def test_a_finding_first_seen_while_suppressed_alerts_when_the_suppression_goes() -> None:
    eng = make_engine([detector("d", lambda f, r: [finding("R", pid=1)])],
                      rules=RuleSet(suppressions=(Suppression(id="S", reason="x", detector=("d",)),)))  # fmt: skip
    assert eng.run_cycle().alerts == ()
    eng.set_rules(RuleSet())
    assert [a.state for a in eng.run_cycle().alerts] == [AlertState.NEW]


def test_an_alert_no_sink_took_is_alerted_again_next_cycle(sink: MemorySink) -> None:
    dead = MemorySink()
    dead.close()
    eng = make_engine([detector("d", lambda f, r: [finding("R", pid=1)])], sinks=[sink, dead])
    r1 = eng.run_cycle()
    assert any(h.component == "sink" and "sink is closed" in h.message for h in r1.health)
    r2 = eng.run_cycle()
    assert [a.state for a in r2.alerts] == [AlertState.NEW]  # at least once, not lost
    assert [s for s, _r, _u in _alerts(sink)] == ["new", "new"]


def test_tracker_directly() -> None:
    t = AlertTracker(uid_factory=iter(["u1", "u2"]).__next__)
    f = finding("R", pid=1, port=1)
    f = TestFinding(rule=f.rule, title=f.title, process=f.process, evidence=f.evidence, detector="d")
    dup = TestFinding(rule="R", title="other title", process=f.process, detector="d")
    obs = t.observe(1.0, [f, dup], ran={"d"})
    assert [(o.state, o.uid) for o in obs] == [(AlertState.NEW, "u1")]  # the first of a key wins
    t.commit(obs)
    assert finding_key(f) in t and len(t) == 1
    # Not reported, but its detector did not run: held.
    assert t.observe(2.0, [], ran=set()) == []
    # Not reported, held by a suppression: held.
    assert t.observe(2.0, [], ran={"d"}, held=[finding_key(f)]) == []
    (gone,) = t.observe(3.0, [], ran={"d"})
    assert (gone.state, gone.uid, gone.last_seen) == (AlertState.RESOLVED, "u1", 1.0)
    t.commit([gone])
    assert len(t) == 0
