"""What detection produces: findings (from detectors) and alerts (stamped by the engine).

A `Finding` is what one detector saw in one cycle. Each kind of finding is its own small
frozen dataclass with a class-level `kind`, `description` and `default_severity`
(pySigma style); detectors fill in only what they saw. The engine then stamps the
detector id onto it and wraps it in an `Alert` carrying the VM identity, the cycle, the
timestamps, the detector/rule/signature versions and the alert state across cycles.

`Alert.to_mapping()` is the alert mapping `sva.bus.ocsf.alert_payload` documents:

    vm                {"name", "target", "uuid"?}        from VmIdentity
    detector          finding.detector (stamped by the engine)
    rule              {"id", "name": rule title, "version": rule version}
    severity, title, mitre, evidence                     from the finding
    description       the finding kind's class-level description
    process           {"pid", "comm", "ppid", "uid"?, "cmdline"?, "path"?: exe}
    signature_bundle  the bundle version in force
    time              last_seen;  uid: the alert uid;  cycle: the cycle id

`Alert.to_event_payload()` is `alert_payload(to_mapping())` — the OCSF Detection Finding
published as an `alert` event — plus, under `unmapped.sva`: `state`, `kind`,
`first_seen`/`last_seen`/`emitted` (epoch ms), `detector_version`, `ruleset_version`,
`changed_fields`, `parent` {pid, comm}, `vm.boot_id`; and OCSF's own
`finding_info.first_seen_time`/`last_seen_time` and the parent process's name.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from sva.engine.facts import ProcessInfo

MAX_CMDLINE = 4096  # characters of a command line carried in an alert (guest data is hostile)


class Severity(enum.StrEnum):
    """How bad a finding is. Ordered: INFO < LOW < MEDIUM < HIGH < CRITICAL."""

    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {s: i for i, s in enumerate(Severity)}


class AlertState(enum.StrEnum):
    """Where a finding is in its life across cycles (see `sva.engine.dedup`)."""

    NEW = "new"  # first seen this cycle: alerted
    STILL_PRESENT = "still_present"  # seen before, nothing material changed: summary only
    CHANGED = "changed"  # seen before, a material evidence field changed: alerted again
    RESOLVED = "resolved"  # seen before, gone now (its detector ran and did not report it)


class HealthStatus(enum.StrEnum):
    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class HealthEvent:
    """A component's trouble or recovery: the payload of a bus `health` event.

    `component` is `engine`, `vmi`, `sink` or `detector:<id>`.
    """

    component: str
    status: HealthStatus
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "status": self.status.value,
            "message": self.message,
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class VmIdentity:
    """Which guest an alert is about.

    `boot_id` tells boots apart (pids are reused after a reboot); the engine takes it from
    the `boot_id` fact when one is registered, else from here (None: unknown).
    """

    name: str
    target: str
    boot_id: str | None = None
    uuid: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"name": self.name, "target": self.target}
        if self.uuid:
            out["uuid"] = self.uuid
        if self.boot_id:
            out["boot_id"] = self.boot_id
        return out


def _freeze_evidence(evidence: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(evidence))


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One thing a detector saw. Subclass per kind; set the class-level attributes.

    Identity across cycles is `dedup_key`: (kind, pid, start_time, rule, *subject). Give
    `subject` for findings that are not about a process (a module address, a hook slot).
    `detector` is stamped by the engine: a detector leaves it empty.
    """

    kind: ClassVar[str] = "finding"
    description: ClassVar[str] = "A finding."
    default_severity: ClassVar[Severity] = Severity.MEDIUM

    rule: str  # id of the rule that matched (every finding comes from a rule)
    title: str  # one line: what was found
    severity: Severity | None = None  # None: the class's default_severity
    mitre: tuple[str, ...] = ()  # ATT&CK technique ids: "T1496", "T1059.004"
    evidence: Mapping[str, Any] = field(default_factory=dict)  # JSON values only
    process: ProcessInfo | None = None
    parent: ProcessInfo | None = None
    subject: tuple[str | int, ...] = ()
    detector: str = ""

    def __post_init__(self) -> None:
        if self.severity is None:
            object.__setattr__(self, "severity", self.default_severity)
        elif not isinstance(self.severity, Severity):
            object.__setattr__(self, "severity", Severity(self.severity))
        object.__setattr__(self, "mitre", tuple(self.mitre))
        object.__setattr__(self, "subject", tuple(self.subject))
        object.__setattr__(self, "evidence", _freeze_evidence(self.evidence))

    @property
    def sev(self) -> Severity:
        """`severity`, typed as never None (it is filled in by __post_init__)."""
        assert self.severity is not None
        return self.severity

    @property
    def dedup_key(self) -> tuple[Any, ...]:
        p = self.process
        return (
            self.kind,
            p.pid if p is not None else None,
            p.start_time if p is not None else None,
            self.rule,
            *self.subject,
        )

    def material(self, fields: frozenset[str] | set[str]) -> dict[str, Any]:
        """The evidence fields whose change makes an alert `changed` (plus severity)."""
        out = {k: self.evidence.get(k) for k in sorted(fields)}
        out["severity"] = self.sev.value
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "detector": self.detector,
            "rule": self.rule,
            "title": self.title,
            "severity": self.sev.value,
            "mitre": list(self.mitre),
            "evidence": dict(self.evidence),
        }
        if self.process is not None:
            out["process"] = self.process.to_json()
        if self.parent is not None:
            out["parent"] = self.parent.to_json()
        if self.subject:
            out["subject"] = list(self.subject)
        return out


def check_json(evidence: Mapping[str, Any]) -> str | None:
    """None if the evidence is a tree of JSON values, else what is wrong."""
    try:
        json.dumps(dict(evidence), allow_nan=False)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def _ms(t: float) -> int:
    return int(t * 1000)


@dataclass(frozen=True)
class Alert:
    """A finding stamped by the engine: which VM, which cycle, when, which versions, what state.

    `uid` stays the same from `new` through `changed` to `resolved`, so a consumer can
    correlate the events of one finding. Times are epoch seconds: `first_seen` is the
    cycle that first saw it, `last_seen` the latest cycle that saw it, `emitted` when this
    alert was made.
    """

    finding: Finding
    vm: VmIdentity
    state: AlertState
    cycle: int
    uid: str
    first_seen: float
    last_seen: float
    emitted: float
    detector_version: str
    signature_bundle: str
    rule_name: str = ""
    rule_version: str = ""
    ruleset_version: str = ""
    changed_fields: tuple[str, ...] = ()

    @property
    def severity(self) -> Severity:
        return self.finding.sev

    def to_mapping(self) -> dict[str, Any]:
        """The alert mapping of `sva.bus.ocsf` (its module docstring lists the fields)."""
        f = self.finding
        rule: dict[str, str] = {"id": f.rule}
        if self.rule_name:
            rule["name"] = self.rule_name
        if self.rule_version:
            rule["version"] = self.rule_version
        vm = {"name": self.vm.name, "target": self.vm.target}
        if self.vm.uuid:
            vm["uuid"] = self.vm.uuid
        out: dict[str, Any] = {
            "vm": vm,
            "detector": f.detector,
            "rule": rule,
            "severity": f.sev.value,
            "title": f.title,
            "description": type(f).description,
            "mitre": list(f.mitre),
            "evidence": dict(f.evidence),
            "signature_bundle": self.signature_bundle,
            "time": self.last_seen,
            "uid": self.uid,
            "cycle": self.cycle,
        }
        if f.process is not None:
            p = f.process
            proc: dict[str, Any] = {"pid": p.pid, "comm": p.comm, "ppid": p.ppid}
            if p.uid is not None:
                proc["uid"] = p.uid
            if p.argv:
                proc["cmdline"] = p.cmdline[:MAX_CMDLINE]
            if p.exe:
                proc["path"] = p.exe
            if p.start_time is not None:
                proc["start_time"] = p.start_time  # ns since the guest booted
            out["process"] = proc
        return out

    def sva_extras(self) -> dict[str, Any]:
        """sva's fields beyond the bus mapping, added under `unmapped.sva` of the payload."""
        f = self.finding
        extras: dict[str, Any] = {
            "state": self.state.value,
            "kind": f.kind,
            "first_seen": _ms(self.first_seen),
            "last_seen": _ms(self.last_seen),
            "emitted": _ms(self.emitted),
            "detector_version": self.detector_version,
        }
        if self.ruleset_version:
            extras["ruleset_version"] = self.ruleset_version
        if self.changed_fields:
            extras["changed_fields"] = list(self.changed_fields)
        if f.parent is not None:
            extras["parent"] = {"pid": f.parent.pid, "comm": f.parent.comm}
        return extras

    def to_event_payload(self) -> dict[str, Any]:
        """The payload of the `alert` event: an OCSF Detection Finding (sva.bus.ocsf)."""
        from sva.bus.ocsf import alert_payload  # the bus pulls in pyzmq: only when publishing

        payload = alert_payload(self.to_mapping())
        sva = payload["unmapped"]["sva"]
        sva.update(self.sva_extras())
        if self.vm.boot_id:
            sva["vm"]["boot_id"] = self.vm.boot_id
        info = payload["finding_info"]
        info["first_seen_time"] = _ms(self.first_seen)
        info["last_seen_time"] = _ms(self.last_seen)
        if self.finding.parent is not None:
            for ev in payload["evidences"]:
                parent = (ev.get("process") or {}).get("parent_process")
                if parent is not None:
                    parent["name"] = self.finding.parent.comm
        return payload

    def to_json(self) -> dict[str, Any]:
        """sva's own JSON view (reports, `sva scan --json`)."""
        return {
            "uid": self.uid,
            "state": self.state.value,
            "vm": self.vm.to_json(),
            "cycle": self.cycle,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "emitted": self.emitted,
            "detector_version": self.detector_version,
            "signature_bundle": self.signature_bundle,
            "rule_name": self.rule_name,
            "rule_version": self.rule_version,
            "ruleset_version": self.ruleset_version,
            "changed_fields": list(self.changed_fields),
            "finding": self.finding.to_json(),
        }
