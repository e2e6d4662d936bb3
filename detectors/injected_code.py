"""Injected code: malfind-style mappings whose first bytes look like code.

Reads the `suspicious_mappings` fact (sva.guest.memscan: W+X mappings, executable
mappings with no file behind them, executable file mappings with a written page) and the
`injected_code` rules of rules/memory.toml, which say which of those reasons count,
what code looks like (byte patterns) and which processes (JIT runtimes) are allowed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from sva.engine.facts import FactView
from sva.engine.model import Finding, Severity
from sva.engine.rules import InjectedCodeRule, RuleSet
from sva.guest.memscan import SuspiciousMapping

HEAD_SHOWN = 64  # bytes of the mapping's start copied into the evidence


@dataclass(frozen=True, kw_only=True)
class InjectedCode(Finding):
    kind: ClassVar[str] = "memory.injected_code"
    description: ClassVar[str] = (
        "a writable+executable or file-less executable mapping holding code"
    )
    default_severity: ClassVar[Severity] = Severity.HIGH


def code_pattern(head: bytes, patterns: Sequence[bytes]) -> bytes | None:
    """The first of `patterns` found in `head` (None: it does not look like code)."""
    if not head.strip(b"\0"):
        return None
    return next((p for p in patterns if p in head), None)


def _evidence(s: SuspiciousMapping, matched: bytes | None) -> dict[str, Any]:
    m = s.mapping
    ev: dict[str, Any] = {
        "pid": s.process.pid,
        "comm": s.process.comm,
        "start": f"0x{m.start:x}",
        "end": f"0x{m.end:x}",
        "size": m.size,
        "protection": m.perms,
        "path": m.path,
        "mapping": m.name,
        "reason": s.reason,
        "head": s.head[:HEAD_SHOWN].hex(),
    }
    if s.head_va is not None:
        ev["head_address"] = f"0x{s.head_va:x}"
    if matched is not None:
        ev["code_pattern"] = matched.hex(" ")
    return ev


class InjectedCodeDetector:
    id = "injected_code"
    version = "1.0.0"
    description = (
        "code in writable+executable or file-less executable process mappings (malfind)"
    )
    needs = frozenset({"suspicious_mappings"})
    material_fields = frozenset({"protection", "end"})

    def detect(self, facts: FactView, rules: RuleSet) -> Iterator[Finding]:
        candidates: Sequence[SuspiciousMapping] = facts["suspicious_mappings"]
        code_rules = rules.of_kind(InjectedCodeRule)
        for s in candidates:
            for rule in code_rules:
                if s.reason not in rule.reasons:
                    continue
                matched = code_pattern(s.head, rule.patterns)
                if rule.require_code and matched is None:
                    continue
                paths = [s.mapping.path] if s.mapping.path else []
                if s.process.exe:
                    paths.append(s.process.exe)
                if rule.allows(s.process, paths):
                    continue
                m = s.mapping
                yield InjectedCode(
                    rule=rule.id, severity=rule.severity, mitre=rule.mitre, process=s.process,
                    title=f"{rule.title}: pid {s.process.pid} ({s.process.comm}) 0x{m.start:x}-0x{m.end:x} {m.perms}",
                    evidence=_evidence(s, matched), subject=(m.start,),
                )  # fmt: skip
                break


DETECTOR = InjectedCodeDetector()
