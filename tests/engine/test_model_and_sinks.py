"""Findings and alerts as values, their bus payloads, and the sinks they go to."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sva.bus.ocsf import alert_payload
from sva.bus.schema import validate, validate_event
from sva.engine.model import Alert, AlertState, HealthEvent, HealthStatus, Severity, VmIdentity
from sva.engine.sinks import JsonLinesSink, MemorySink
from sva.engine.testing import TestFinding, proc

from .helpers import VM, detector, finding, make_engine


def _alert(**kw: object) -> Alert:
    f = TestFinding(rule="R1", title="miner", severity=Severity.HIGH, mitre=("T1496", "T1059.004"),
                    process=proc(102, "xmrig", "/tmp/xmrig", "-o", "stratum+tcp://x:1", ppid=1, uid=33,
                                 exe="/tmp/xmrig"),
                    parent=proc(1, "init"), evidence={"matched": "xmrig", "n": [1, 2]}, detector="pp")  # fmt: skip
    base: dict[str, object] = dict(
        finding=f, vm=VmIdentity("web01", "lab:web01", boot_id="b-1", uuid="6f1c1d4e-2b7a-4c1e-9a51-0d3f5e8b7c21"),
        state=AlertState.NEW, cycle=3, uid="u-1", first_seen=100.0, last_seen=110.0, emitted=110.5,
        detector_version="1.0.0", signature_bundle="2025.11.0", rule_name="Miner", rule_version="2",
        ruleset_version="1.0.0",
    )
    base.update(kw)
    return Alert(**base)  # type: ignore[arg-type]


def test_findings_are_frozen_values_with_class_level_kind_and_defaults() -> None:
    f = TestFinding(rule="R", title="t", evidence={"a": 1})
    assert (f.kind, f.severity, f.description) == ("test.finding", Severity.LOW, "a finding made by a test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.rule = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        f.evidence["a"] = 2  # type: ignore[index]
    assert TestFinding(rule="R", title="t", severity="critical").severity is Severity.CRITICAL  # type: ignore[arg-type]
    assert [s.rank for s in Severity] == [0, 1, 2, 3, 4]


def test_alert_mapping_is_what_the_bus_documents() -> None:
    m = _alert().to_mapping()
    assert m["vm"] == {"name": "web01", "target": "lab:web01", "uuid": "6f1c1d4e-2b7a-4c1e-9a51-0d3f5e8b7c21"}
    assert m["detector"] == "pp"
    assert m["rule"] == {"id": "R1", "name": "Miner", "version": "2"}
    assert (m["severity"], m["title"], m["mitre"]) == ("high", "miner", ["T1496", "T1059.004"])
    assert m["process"] == {"pid": 102, "comm": "xmrig", "ppid": 1, "uid": 33,
                            "cmdline": "/tmp/xmrig -o stratum+tcp://x:1", "path": "/tmp/xmrig",
                            "start_time": 102000}  # fmt: skip
    assert (m["signature_bundle"], m["cycle"], m["uid"], m["time"]) == ("2025.11.0", 3, "u-1", 110.0)
    alert_payload(m)  # the bus accepts it as is


def test_alert_event_payload_is_a_valid_ocsf_finding_with_sva_extras() -> None:
    p = _alert(state=AlertState.CHANGED, changed_fields=("matched",)).to_event_payload()
    validate(p, "alert")
    sva = p["unmapped"]["sva"]
    assert sva["state"] == "changed" and sva["changed_fields"] == ["matched"]
    assert (sva["kind"], sva["detector_version"], sva["ruleset_version"]) == ("test.finding", "1.0.0", "1.0.0")
    assert (sva["first_seen"], sva["last_seen"], sva["emitted"]) == (100_000, 110_000, 110_500)
    assert sva["vm"]["boot_id"] == "b-1"
    assert sva["parent"] == {"pid": 1, "comm": "init"}
    assert sva["process"]["start_time"] == 102000 and "start_time" not in p["evidences"][0]["process"]
    assert p["evidences"][0]["process"]["parent_process"] == {"pid": 1, "name": "init"}
    assert p["finding_info"]["uid"] == "u-1"
    assert p["finding_info"]["first_seen_time"] == 100_000
    attacks = p["finding_info"]["attacks"]
    assert [a.get("sub_technique", a["technique"])["uid"] for a in attacks] == ["T1496", "T1059.004"]


def test_alert_without_process_or_uuid_is_still_valid() -> None:
    f = TestFinding(rule="K1", title="hook", subject=("sys_call_table", 59), detector="syscalls", evidence={"slot": 59})
    a = _alert(finding=f, vm=VmIdentity("web01", "lab:web01"))
    p = a.to_event_payload()
    validate(p, "alert")
    assert p["resources"][0]["uid"] == "lab:web01"
    assert "process" not in p["evidences"][0]


def test_health_event_payload_is_valid() -> None:
    h = HealthEvent("detector:pp", HealthStatus.WARNING, "pp skipped", {"reason": "fact-unavailable"})
    validate(h.to_payload(), "health")


def test_json_lines_sink_output_parses_and_matches_the_bus_schema(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    eng = make_engine([detector("pp", lambda f, r: [finding("R1", pid=1), finding("R2", pid=2)]),
                       detector("broken", lambda f, r: 1 / 0)], sinks=[JsonLinesSink(path)])  # fmt: skip
    eng.run_cycle()
    eng.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    for e in events:
        validate_event(e)
    assert [e["type"] for e in events] == ["alert", "alert", "health"]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert events[0]["topic"] == "sva.alert.low.pp"
    assert events[0]["payload"]["unmapped"]["sva"]["vm"] == {**VM.to_json(), "boot_id": "boot-1"}
    assert events[2]["topic"] == "sva.health.detector_broken"
    assert "ZeroDivisionError" in events[2]["payload"]["message"]


def test_memory_sink_numbers_and_refuses_after_close() -> None:
    from sva.errors import BusError

    s = MemorySink()
    ev = s.publish("health", {"component": "engine", "status": "ok", "message": "hi"})
    assert (ev.seq, ev.topic) == (1, "sva.health.engine")
    s.close()
    with pytest.raises(BusError):
        s.publish("health", {"component": "engine", "status": "ok", "message": "hi"})
