"""Human-readable rendering of bus events for `sva alerts tail/replay`.

An alert is one block: headline (severity, title, seq, time), then VM, what, where
(process or flow), rule (with bundle and ATT&CK ids) and evidence. Other events are one
line. Colour only when asked (the CLI asks when stdout is a terminal and NO_COLOR is unset).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sva.bus.event import Event, EventType, Severity

_RESET = "\033[0m"
_SEVERITY_COLOR = {
    Severity.INFORMATIONAL: "\033[2m",
    Severity.LOW: "\033[36m",
    Severity.MEDIUM: "\033[33m",
    Severity.HIGH: "\033[1;31m",
    Severity.CRITICAL: "\033[1;97;41m",
}
_DIM = "\033[2m"
_BOLD = "\033[1m"
_MAX_VALUE = 160


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, int | float) else str(value)
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 1] + "…"


def _paint(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color else text


def severity_of(ev: Event) -> Severity | None:
    if ev.type is not EventType.ALERT:
        return None
    try:
        return Severity.parse(int(ev.payload.get("severity_id", 0)))
    except Exception:  # a malformed payload still renders
        return None


def render(ev: Event, color: bool = False) -> str:
    if ev.type is EventType.ALERT:
        return render_alert(ev, color)
    p = ev.payload
    if ev.type is EventType.HEALTH:
        status = str(p.get("status", "?"))
        code = {"error": "\033[1;31m", "warning": "\033[33m"}.get(status, "")
        what = f"health {p.get('component', '?')} {_paint(status, code, color and bool(code))}: {p.get('message', '')}"
    elif ev.type is EventType.SIGS:
        bundle = f" {p['bundle_version']}" if p.get("bundle_version") else ""
        what = f"signatures {p.get('event', '?')}{bundle}: {p.get('message', '')}"
    else:
        what = f"heartbeat latest seq {p.get('latest_seq')}"
    return f"{_paint(f'#{ev.seq} {ev.time}', _DIM, color)} {what}"


def render_alert(ev: Event, color: bool = False) -> str:
    p = ev.payload
    sva: Mapping[str, Any] = (p.get("unmapped") or {}).get("sva") or {}
    sev = severity_of(ev)
    sev_text = f"[{(sev.label if sev else 'unknown').upper()}]"
    title = str((p.get("finding_info") or {}).get("title") or p.get("message") or "")
    sev_color = _SEVERITY_COLOR[sev] if sev is not None else ""
    head = f"{_paint(sev_text, sev_color, color and sev is not None)} {_paint(title, _BOLD, color)}"
    lines = [f"━━ {head}  {_paint(f'seq {ev.seq} · {ev.time}', _DIM, color)}"]

    vm = sva.get("vm") or {}
    vm_bits = [str(vm.get("name", "?"))]
    if vm.get("uuid"):
        vm_bits.append(f"uuid {vm['uuid']}")
    if vm.get("target"):
        vm_bits.append(f"target {vm['target']}")
    lines.append(f"   vm        {'  '.join(vm_bits)}")
    lines.append(f"   what      {sva.get('detector', '?')}: {title}")

    where: list[str] = []
    proc = sva.get("process")
    if isinstance(proc, Mapping):
        extra = ", ".join(f"{k} {proc[k]}" for k in ("ppid", "uid") if proc.get(k) is not None)
        text = f"pid {proc.get('pid')} {proc.get('comm', '')}".rstrip()
        if extra:
            text += f" ({extra})"
        if proc.get("cmdline") or proc.get("path"):
            text += f"  {_short(proc.get('cmdline') or proc.get('path'))}"
        where.append(text)
    flow = sva.get("flow")
    if isinstance(flow, Mapping):
        src = f"{flow.get('src_ip')}:{flow.get('src_port')}"
        dst = f"{flow.get('dst_ip')}:{flow.get('dst_port')}"
        where.append(f"{flow.get('proto', '?')} {src} -> {dst}")
    for i, w in enumerate(where or ["-"]):
        lines.append(f"   {'where' if i == 0 else '':<9} {w}")

    rule = sva.get("rule") or {}
    rule_text = str(rule.get("id", "?"))
    if rule.get("name") and rule.get("name") != rule.get("id"):
        rule_text += f' "{rule["name"]}"'
    if rule.get("version"):
        rule_text += f" v{rule['version']}"
    rule_text += f" · bundle {sva.get('signature_bundle', '?')}"
    attacks = (p.get("finding_info") or {}).get("attacks") or []
    ids = [
        (a.get("sub_technique") or a.get("technique") or a.get("tactic") or {}).get("uid", "?")
        for a in attacks
        if isinstance(a, Mapping)
    ]
    if ids:
        rule_text += f" · ATT&CK {', '.join(ids)}"
    lines.append(f"   rule      {rule_text}")

    evidence = sva.get("evidence") or {}
    if isinstance(evidence, Mapping) and evidence:
        items = list(evidence.items())
        for i, (k, v) in enumerate(items):
            lines.append(f"   {'evidence' if i == 0 else '':<9} {k} = {_short(v)}")
    else:
        lines.append("   evidence  -")
    return "\n".join(lines)
