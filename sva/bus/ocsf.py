"""Alert → OCSF Detection Finding (class_uid 2004), the payload of every `alert` event.

`alert_payload(alert)` takes an alert-like mapping (or a dataclass, converted with
`dataclasses.asdict`) and returns a JSON tree that is a valid OCSF 1.3 Detection Finding,
so a SIEM can ingest it unchanged. sva's own view of the alert is kept beside it in
`unmapped.sva` (OCSF's place for source-specific attributes).

The alert mapping must contain:

    vm          {"name": str, "uuid": str (optional), "target": str (optional)};
                at least one of uuid/target identifies the VM
    detector    str, the detector module that produced the finding (topic level)
    rule        str rule id, or {"id": str, "name": str?, "version": str?}
    severity    "informational"|"info"|"low"|"medium"|"high"|"critical" or OCSF id 1..5
    title       str, one line: what was found
    mitre       list of ATT&CK ids ("T1014", "T1055.001") or of
                {"id": str, "name": str?, "tactic": str? (TA id), "tactic_name": str?}; may be []
    evidence    mapping of JSON values: what the detector saw (addresses, hashes, names)
    process     {"pid": int, "comm": str, "ppid": int?, "uid": int?, "cmdline": str?, "path": str?}
      or flow   {"proto": "tcp"|"udp"|int, "src_ip": str, "src_port": int,
                 "dst_ip": str, "dst_port": int}          (either, both, or neither)
    signature_bundle  str, the version of the signature bundle in force

Optional: description (str), time (epoch seconds or aware datetime; default now),
uid (finding id; default a new UUID), cycle (int scan cycle id), confidence (0..100).
"""

from __future__ import annotations

import dataclasses
import time as _time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sva import __version__
from sva.bus.event import Severity
from sva.errors import BusError

OCSF_VERSION = "1.3.0"
CLASS_UID = 2004
CATEGORY_UID = 2
ACTIVITY_CREATE = 1
TYPE_UID = CLASS_UID * 100 + ACTIVITY_CREATE
_PROTO_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}


def _as_mapping(alert: Any) -> Mapping[str, Any]:
    if dataclasses.is_dataclass(alert) and not isinstance(alert, type):
        return dataclasses.asdict(alert)
    if isinstance(alert, Mapping):
        return alert
    raise BusError(f"alert must be a mapping or a dataclass, not {type(alert).__name__}")


def _get(m: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    if key not in m or m[key] is None:
        raise BusError(f"alert mapping lacks {where}{key!r}")
    v = m[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        raise BusError(f"alert field {where}{key!r} must be {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
    return v


def _ms(t: Any) -> int:
    if t is None:
        return int(_time.time() * 1000)
    if isinstance(t, datetime):
        if t.tzinfo is None:
            raise BusError("alert time must be timezone-aware")
        return int(t.timestamp() * 1000)
    if isinstance(t, int | float) and not isinstance(t, bool):
        return int(t * 1000)
    raise BusError(f"alert time must be epoch seconds or a datetime, got {type(t).__name__}")


def _attacks(mitre: Sequence[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in mitre:
        entry = {"id": item} if isinstance(item, str) else item
        if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
            raise BusError(f"alert mitre entry {item!r} must be an ATT&CK id or {{'id': ...}}")
        tid: str = entry["id"].strip().upper()
        attack: dict[str, Any] = {}
        if "." in tid:
            attack["sub_technique"] = _named(tid, entry.get("name"))
            attack["technique"] = {"uid": tid.split(".", 1)[0]}
        else:
            attack["technique"] = _named(tid, entry.get("name"))
        if entry.get("tactic"):
            attack["tactic"] = _named(str(entry["tactic"]), entry.get("tactic_name"))
        out.append(attack)
    return out


def _named(uid: str, name: Any) -> dict[str, Any]:
    return {"uid": uid, "name": str(name)} if name else {"uid": uid}


def _process(p: Mapping[str, Any]) -> dict[str, Any]:
    proc: dict[str, Any] = {"pid": _get(p, "pid", int, "process."), "name": str(p.get("comm", ""))}
    if p.get("cmdline"):
        proc["cmd_line"] = str(p["cmdline"])
    if p.get("ppid") is not None:
        proc["parent_process"] = {"pid": int(p["ppid"])}
    if p.get("uid") is not None:
        proc["user"] = {"uid": str(p["uid"])}
    if p.get("path"):
        path = str(p["path"])
        proc["file"] = {"path": path, "name": path.rsplit("/", 1)[-1], "type_id": 1, "type": "Regular File"}
    return proc


def _flow(f: Mapping[str, Any]) -> dict[str, Any]:
    proto = f.get("proto", "tcp")
    if isinstance(proto, int):
        num, name = proto, next((k for k, v in _PROTO_NUMBERS.items() if v == proto), str(proto))
    else:
        name = str(proto).lower()
        num = _PROTO_NUMBERS.get(name, -1)
    conn: dict[str, Any] = {"protocol_name": name}
    if num >= 0:
        conn["protocol_num"] = num
    return {
        "src_endpoint": {"ip": str(_get(f, "src_ip", str, "flow.")), "port": int(_get(f, "src_port", int, "flow."))},
        "dst_endpoint": {"ip": str(_get(f, "dst_ip", str, "flow.")), "port": int(_get(f, "dst_port", int, "flow."))},
        "connection_info": conn,
    }


def alert_payload(alert: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The OCSF Detection Finding for one alert (see the module docstring for the input)."""
    a = _as_mapping(alert)
    vm = _get(a, "vm", Mapping)
    vm_name = str(_get(vm, "name", str, "vm."))
    vm_uid = vm.get("uuid") or vm.get("target")
    if not vm_uid:
        raise BusError("alert field 'vm' needs a 'uuid' or a 'target'")
    detector = str(_get(a, "detector", str))
    rule_raw = _get(a, "rule", (str, Mapping))
    rule: dict[str, Any] = {"id": rule_raw} if isinstance(rule_raw, str) else dict(rule_raw)
    if not isinstance(rule.get("id"), str) or not rule["id"]:
        raise BusError("alert field 'rule' needs an 'id'")
    severity = Severity.parse(_get(a, "severity", (str, int)))
    title = str(_get(a, "title", str))
    mitre = _get(a, "mitre", (list, tuple))
    evidence = dict(_get(a, "evidence", Mapping))
    bundle = str(_get(a, "signature_bundle", str))
    process = a.get("process")
    flow = a.get("flow")
    t_ms = _ms(a.get("time"))
    finding_uid = str(a.get("uid") or uuid.uuid4())

    analytic: dict[str, Any] = {
        "uid": rule["id"], "name": str(rule.get("name") or rule["id"]), "type_id": 1, "type": "Rule"
    }
    if rule.get("version"):
        analytic["version"] = str(rule["version"])
    finding_info: dict[str, Any] = {
        "uid": finding_uid,
        "title": title,
        "types": [detector],
        "created_time": t_ms,
        "analytic": analytic,
        "data_sources": ["vm-introspection"],
    }
    if a.get("description"):
        finding_info["desc"] = str(a["description"])
    attacks = _attacks(mitre)
    if attacks:
        finding_info["attacks"] = attacks

    evidence_item: dict[str, Any] = {"data": evidence}
    sva: dict[str, Any] = {
        "vm": {k: str(vm[k]) for k in ("name", "uuid", "target") if vm.get(k)},
        "detector": detector,
        "rule": {k: str(v) for k, v in rule.items() if v is not None},
        "signature_bundle": bundle,
        "evidence": evidence,
    }
    if process is not None:
        if not isinstance(process, Mapping):
            raise BusError("alert field 'process' must be a mapping")
        evidence_item["process"] = _process(process)
        sva["process"] = dict(process)
    if flow is not None:
        if not isinstance(flow, Mapping):
            raise BusError("alert field 'flow' must be a mapping")
        evidence_item.update(_flow(flow))
        sva["flow"] = dict(flow)
    if a.get("cycle") is not None:
        sva["cycle"] = int(a["cycle"])

    payload: dict[str, Any] = {
        "activity_id": ACTIVITY_CREATE,
        "activity_name": "Create",
        "category_uid": CATEGORY_UID,
        "category_name": "Findings",
        "class_uid": CLASS_UID,
        "class_name": "Detection Finding",
        "type_uid": TYPE_UID,
        "type_name": "Detection Finding: Create",
        "severity_id": int(severity),
        "severity": severity.caption,
        "status_id": 1,
        "status": "New",
        "time": t_ms,
        "message": title,
        "metadata": {
            "version": OCSF_VERSION,
            "product": {"name": "sva", "vendor_name": "sva", "version": __version__, "feature": {"name": detector}},
            "labels": [f"signature_bundle:{bundle}"],
        },
        "finding_info": finding_info,
        "resources": [{"uid": str(vm_uid), "name": vm_name, "type": "Virtual Machine"}],
        "evidences": [evidence_item],
        "unmapped": {"sva": sva},
    }
    if a.get("confidence") is not None:
        payload["confidence_score"] = int(a["confidence"])
    return payload
