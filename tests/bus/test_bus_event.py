"""Envelope, topics, the OCSF mapping, the schemas, the JSON-lines sink and the config."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sva.bus import BusConfig, Event, EventType, JsonLinesSink, Severity, Sink, alert_payload
from sva.bus.event import topic_for, topic_segment
from sva.bus.schema import load_schemas, schema_text, validate_event
from sva.bus.testing import sample_alert
from sva.errors import BusError, ConfigError


def _event(seq: int, et: EventType, payload: dict[str, Any]) -> dict[str, Any]:
    return json.loads(Event.new(seq, time.time(), et, topic_for(et, payload), payload).encode())


def test_alert_payload_is_an_ocsf_detection_finding() -> None:
    p = alert_payload(sample_alert(0, detector="hidden_process", severity="high"))
    assert (p["class_uid"], p["category_uid"], p["activity_id"], p["type_uid"]) == (2004, 2, 1, 200401)
    assert (p["severity_id"], p["severity"]) == (4, "High")
    assert p["metadata"]["product"]["name"] == "sva" and p["metadata"]["version"].startswith("1.")
    vm_uuid = "6f1c1d4e-2b7a-4c1e-9a51-0d3f5e8b7c21"
    assert p["resources"] == [{"uid": vm_uuid, "name": "web01", "type": "Virtual Machine"}]
    fi = p["finding_info"]
    assert fi["analytic"] == {"uid": "SVA-HIDDEN_PROCESS-001", "name": "hidden process", "type_id": 1, "type": "Rule",
                              "version": "1"}
    assert fi["attacks"][0] == {"technique": {"uid": "T1014"}}
    assert fi["attacks"][1]["sub_technique"] == {"uid": "T1055.001"}
    assert fi["attacks"][1]["technique"] == {"uid": "T1055"}
    assert fi["attacks"][1]["tactic"] == {"uid": "TA0005", "name": "Defense Evasion"}
    ev = p["evidences"][0]
    assert ev["process"]["pid"] == 1000 and ev["process"]["name"] == "evil"
    assert ev["process"]["parent_process"] == {"pid": 1} and ev["process"]["user"] == {"uid": "0"}
    assert ev["data"]["index"] == 0
    sva = p["unmapped"]["sva"]
    assert sva["detector"] == "hidden_process" and sva["signature_bundle"] == "2025.11.0"
    assert sva["vm"]["name"] == "web01" and sva["process"]["comm"] == "evil" and sva["cycle"] == 0
    assert topic_for(EventType.ALERT, p) == "sva.alert.high.hidden_process"


def test_flow_alert_maps_to_endpoints() -> None:
    p = alert_payload(sample_alert(3, detector="net_flow", severity="medium"))
    ev = p["evidences"][0]
    assert ev["src_endpoint"] == {"ip": "10.0.0.5", "port": 40003}
    assert ev["dst_endpoint"] == {"ip": "192.0.2.7", "port": 4444}
    assert ev["connection_info"] == {"protocol_name": "tcp", "protocol_num": 6}
    assert "process" not in ev and p["unmapped"]["sva"]["flow"]["dst_port"] == 4444


def test_alert_from_a_dataclass_and_numeric_severity() -> None:
    @dataclass(frozen=True)
    class Alert:
        vm: dict[str, str]
        detector: str
        rule: str
        severity: int
        title: str
        signature_bundle: str
        mitre: list[str] = field(default_factory=list)
        evidence: dict[str, Any] = field(default_factory=dict)

    p = alert_payload(Alert({"name": "db1", "target": "qemu:/run/db1.qmp"}, "syscall_hook", "R-7", 5, "hooked",
                            "b1"))
    assert p["severity"] == "Critical" and p["resources"][0]["uid"] == "qemu:/run/db1.qmp"
    assert "attacks" not in p["finding_info"] and p["evidences"] == [{"data": {}}]
    validate_event(_event(1, EventType.ALERT, p))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("vm"), "lacks 'vm'"),
        (lambda a: a["vm"].pop("name"), "vm.'name'"),
        (lambda a: (a["vm"].pop("uuid"), a["vm"].pop("target")), "'uuid' or a 'target'"),
        (lambda a: a.pop("detector"), "'detector'"),
        (lambda a: a.__setitem__("rule", {"name": "x"}), "needs an 'id'"),
        (lambda a: a.__setitem__("severity", "catastrophic"), "unknown severity"),
        (lambda a: a.__setitem__("severity", 9), "not one of 1..5"),
        (lambda a: a.pop("title"), "'title'"),
        (lambda a: a.__setitem__("mitre", [42]), "mitre entry"),
        (lambda a: a.pop("signature_bundle"), "'signature_bundle'"),
        (lambda a: a.__setitem__("evidence", "text"), "'evidence' must be Mapping"),
        (lambda a: a["process"].pop("pid"), "process.'pid'"),
        (lambda a: a.__setitem__("time", "yesterday"), "epoch seconds"),
    ],
)
def test_bad_alert_mappings_are_refused_with_the_field_name(change: Any, message: str) -> None:
    alert = sample_alert(0, detector="hidden_process")
    change(alert)
    with pytest.raises(BusError, match=message.replace("(", r"\(").replace(".", r"\.")):
        alert_payload(alert)


def test_every_event_type_matches_its_schema() -> None:
    for i in range(25):
        validate_event(_event(i + 1, EventType.ALERT, alert_payload(sample_alert(i))))
    validate_event(_event(26, EventType.HEALTH, {"component": "detector:hidden_process", "status": "error",
                                                  "message": "detector crashed", "details": {"reason": "exception"}}))
    validate_event(_event(27, EventType.SIGS, {"event": "updated", "message": "bundle 2025.11.1 active",
                                                "bundle_version": "2025.11.1", "previous_version": "2025.11.0"}))
    hb = {"latest_seq": 27, "oldest_seq": 1, "stream": "s", "interval_s": 2.0, "security": "curve",
          "journal": {"ok": True, "error": None, "bytes": 10, "segments": 1, "fsync": "interval"}}
    validate_event(json.loads(Event.new(27, time.time(), EventType.HEARTBEAT, "sva.heartbeat", hb).encode()))


def test_schema_rejects_what_it_should() -> None:
    good = _event(1, EventType.ALERT, alert_payload(sample_alert(1)))
    for mutate, where in [
        (lambda e: e["payload"].__setitem__("class_uid", 2001), "payload/class_uid"),
        (lambda e: e["payload"]["finding_info"].pop("uid"), "payload/finding_info"),
        (lambda e: e["payload"]["unmapped"]["sva"].pop("signature_bundle"), "payload/unmapped/sva"),
        (lambda e: e.__setitem__("id", "not-a-uuid"), "id"),
        (lambda e: e.__setitem__("topic", "sva.alert.high"), "topic"),
        (lambda e: e.__setitem__("seq", 0), "seq"),
        (lambda e: e.pop("schema_version"), "(root)"),
    ]:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(BusError, match=f"at {where.replace('(', '.').replace(')', '.')}"):
            validate_event(bad)


def test_schemas_are_package_data_with_versioned_ids() -> None:
    schemas = load_schemas()
    assert set(schemas) == {"event", "alert", "health", "sigs", "heartbeat", "replay"}
    for name, s in schemas.items():
        assert s["$id"].endswith(f"/bus/1/{name}.json")
    assert json.loads(schema_text("alert.json"))["properties"]["class_uid"] == {"const": 2004}
    with pytest.raises(BusError, match="no bus schema"):
        schema_text("nope")


def test_topics_are_hierarchical_and_sanitized() -> None:
    assert topic_segment("Hidden.Process name") == "hidden_process_name"
    assert topic_segment("...") == "unknown"
    assert topic_for(EventType.HEALTH, {"component": "VMI"}) == "sva.health.vmi"
    assert topic_for(EventType.SIGS, {"event": "rolled_back"}) == "sva.sigs.rolled_back"
    with pytest.raises(BusError, match="'component'"):
        topic_for(EventType.HEALTH, {"status": "ok"})
    assert Severity.parse("info") is Severity.INFORMATIONAL and Severity.parse("High") is Severity.HIGH


def test_event_decode_refuses_malformed_messages() -> None:
    ev = Event.new(5, time.time(), EventType.HEALTH, "sva.health.bus", {"component": "bus", "status": "ok",
                                                                        "message": "m"})
    assert Event.decode(ev.encode(), b"sva.health.bus") == ev
    for body, topic, msg in [
        (b"{not json", None, "not JSON"),
        (b"[1]", None, "not a JSON object"),
        (b'{"seq": 1}', None, "lacks envelope field"),
        (ev.encode().replace(b'"1.1"', b'"2.0"'), None, "not supported"),
        (ev.encode(), b"sva.health.other", "differs"),
    ]:
        with pytest.raises(BusError, match=msg):
            Event.decode(body, topic)


def test_json_lines_sink(tmp_path: Path) -> None:
    out = io.StringIO()
    sink = JsonLinesSink(out)
    assert isinstance(sink, Sink)
    e1 = sink.publish("alert", alert_payload(sample_alert(1)))
    e2 = sink.publish(EventType.HEALTH, {"component": "engine", "status": "ok", "message": "up"})
    with pytest.raises(BusError, match="not JSON-serialisable"):
        sink.publish("health", {"component": "engine", "status": "ok", "message": object()})
    with pytest.raises(BusError, match="sent by the publisher itself"):
        sink.publish("heartbeat", {})
    with pytest.raises(BusError, match="unknown event type"):
        sink.publish("gossip", {})
    e3 = sink.publish("sigs", {"event": "updated", "message": "m"})
    assert [e1.seq, e2.seq, e3.seq] == [1, 2, 3]
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    for line in lines:
        validate_event(json.loads(line))
    path = tmp_path / "events.jsonl"
    with_file = JsonLinesSink(path)
    with_file.publish("alert", alert_payload(sample_alert(2)))
    with_file.close()
    assert json.loads(path.read_text())["seq"] == 1


def test_config_names_the_bad_key(tmp_path: Path) -> None:
    cfg = BusConfig.from_mapping({"endpoint": "tcp://10.1.2.3:9000", "journal": str(tmp_path)})
    assert cfg.replay_endpoint == "tcp://10.1.2.3:9001"
    assert BusConfig(endpoint="ipc:///run/sva/bus").replay_endpoint == "ipc:///run/sva/bus.replay"
    for table, msg in [
        ({"endpont": "x"}, "bus.endpont: unknown setting"),
        ({"endpoint": "udp://x:1"}, "bus.endpoint: expected tcp"),
        ({"endpoint": "tcp://h:70000"}, "out of range"),
        ({"heartbeat_s": "2"}, "bus.heartbeat_s: expected float"),
        ({"heartbeat_s": 0}, "bus.heartbeat_s: must be at least"),
        ({"plaintext": "yes"}, "bus.plaintext: expected bool"),
        ({"fsync": "sometimes"}, "bus.fsync: one of"),
        ({"retention_bytes": 1000, "segment_bytes": 4096}, "bus.retention_bytes"),
        ({"endpoint": "tcp://h:1", "replay_endpoint": "tcp://h:1"}, "must differ"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            BusConfig.from_mapping(table)


def test_the_example_in_the_integrator_guide_is_valid() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "bus.md").read_text()
    block = doc.split("```json\n", 1)[1].split("```", 1)[0]
    example = json.loads(block)
    validate_event(example)
    assert example["payload"]["class_uid"] == 2004 and example["topic"] == "sva.alert.high.hidden_process"
