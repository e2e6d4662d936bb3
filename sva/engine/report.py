"""A cycle's outcome for humans (`render_text`) and as JSON (`report_json`).

The text puts what needs attention first: each new or changed alert as a block (VM,
what, which process, rule with versions and ATT&CK ids, evidence), then one line per
still-present, resolved and suppressed finding, then detector timings and health.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sva.engine.model import Alert, AlertState, Finding

if TYPE_CHECKING:
    from sva.engine.engine import CycleReport

_MAX_VALUE = 200
_PROCESS_KEYS = frozenset(
    {"pid", "comm", "ppid", "uid", "argv", "cmdline", "exe", "exe_deleted", "parent_pid", "parent_comm",
     "start_time", "task_address"}
)  # fmt: skip
_STATE_LABEL = {
    AlertState.NEW: "NEW",
    AlertState.CHANGED: "CHANGED",
    AlertState.STILL_PRESENT: "STILL PRESENT",
    AlertState.RESOLVED: "RESOLVED",
}


def _time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 1] + "…"


def _headline(finding: Finding) -> str:
    return f"[{finding.sev.value.upper()}] {finding.title}"


def _process_lines(f: Finding) -> list[str]:
    p = f.process
    if p is None:
        return []
    bits = [f"ppid {p.ppid}" + (f" {f.parent.comm}" if f.parent is not None else "")]
    if p.uid is not None:
        bits.append(f"uid {p.uid}")
    lines = [f"   process   pid {p.pid} {p.comm} ({', '.join(bits)})"]
    if p.argv:
        lines.append(f"   cmdline   {_short(p.cmdline)}")
    if p.exe:
        lines.append(f"   exe       {_short(p.exe)}{' (deleted)' if p.exe_deleted else ''}")
    return lines


def render_alert(alert: Alert) -> str:
    """One alert as a block of lines."""
    f = alert.finding
    vm = alert.vm
    lines = [f"{_STATE_LABEL[alert.state]} {_headline(f)}"]
    vm_bits = [vm.name, f"target {vm.target}"]
    if vm.boot_id:
        vm_bits.append(f"boot {vm.boot_id}")
    lines.append(f"   vm        {'  '.join(vm_bits)}")
    lines.append(f"   what      {f.detector} {alert.detector_version}: {type(f).description}")
    lines.extend(_process_lines(f))
    rule = f.rule + (f' "{alert.rule_name}"' if alert.rule_name else "")
    if alert.rule_version:
        rule += f" v{alert.rule_version}"
    if alert.ruleset_version:
        rule += f" (ruleset {alert.ruleset_version})"
    rule += f" · signatures {alert.signature_bundle}"
    if f.mitre:
        rule += f" · ATT&CK {', '.join(f.mitre)}"
    lines.append(f"   rule      {rule}")
    extra = [(k, v) for k, v in f.evidence.items() if k not in _PROCESS_KEYS or f.process is None]
    for i, (k, v) in enumerate(extra or [("-", "")]):
        lines.append(f"   {'evidence' if i == 0 else '':<9} {k}" + (f" = {_short(v)}" if k != "-" else ""))
    if alert.changed_fields:
        lines.append(f"   changed   {', '.join(alert.changed_fields)}")
    seen = f"{_time(alert.first_seen)} .. {_time(alert.last_seen)}"
    lines.append(f"   seen      {seen} · cycle {alert.cycle} · uid {alert.uid}")
    return "\n".join(lines)


def _one_line(label: str, f: Finding) -> str:
    who = f" pid {f.process.pid} ({f.process.comm})" if f.process is not None else ""
    return f"{label} {_headline(f)} · {f.rule}{who}"


def render_text(report: CycleReport, *, show_still_present: bool = True) -> str:
    """The whole cycle for a terminal or a log."""
    vm = report.vm
    paused = f", paused {report.pause_seconds:.3f} s" if report.pause_seconds is not None else ""
    boot = f", boot {vm.boot_id}" if vm.boot_id else ""
    lines = [
        f"cycle {report.cycle} · {vm.name} ({vm.target}{boot}) · {_time(report.started)} · "
        f"{report.seconds:.3f} s{paused}",
        f"   {len(report.new)} new, {len(report.changed)} changed, {len(report.still_present)} still present, "
        f"{len(report.resolved)} resolved, {len(report.suppressed)} suppressed",
    ]
    if report.error:
        lines.append(f"   ERROR: {report.error}")
    for a in report.alerts:
        if a.state in (AlertState.NEW, AlertState.CHANGED):
            lines.append("")
            lines.append(render_alert(a))
    tail: list[str] = []
    if show_still_present:
        tail += [_one_line("STILL PRESENT", a.finding) for a in report.still_present]
    tail += [_one_line("RESOLVED", a.finding) for a in report.resolved]
    tail += [_one_line(f"SUPPRESSED by {s.suppression}", s.finding) for s in report.suppressed]
    if tail:
        lines.append("")
        lines.extend(tail)
    if report.detectors:
        lines.append("")
        lines.append("detectors")
        for r in report.detectors:
            msg = f"  {r.message}" if r.message and r.status != "ok" else ""
            lines.append(f"   {r.detector:<24} {r.version:<8} {r.status:<7} {r.findings:>4} findings  "
                         f"{r.seconds * 1000:8.1f} ms{msg}")  # fmt: skip
    if report.health:
        lines.append("")
        lines.append("health")
        for h in report.health:
            lines.append(f"   {h.status.value:<7} {h.component}: {h.message}")
    return "\n".join(lines)


def report_json(report: CycleReport) -> dict[str, Any]:
    """The whole cycle as one JSON tree (`sva scan --json`)."""
    counts: Mapping[str, int] = {s.value: len(report.in_state(s)) for s in AlertState}
    return {
        "cycle": report.cycle,
        "vm": report.vm.to_json(),
        "started": report.started,
        "seconds": round(report.seconds, 6),
        "pause_seconds": report.pause_seconds,
        "error": report.error,
        "counts": {**counts, "suppressed": len(report.suppressed)},
        "alerts": [a.to_json() for a in report.alerts],
        "suppressed": [s.to_json() for s in report.suppressed],
        "detectors": [r.to_json() for r in report.detectors],
        "facts": [f.to_json() for f in report.facts],
        "health": [h.to_payload() for h in report.health],
        "published": report.published,
    }
