"""YARA over memory: every match of the active signature bundle, attributed to a process.

Reads the `yara_matches` fact (sva.guest.memscan: incremental physical scan, then each
matched page traced back to the processes and mappings that map it) and turns each
(YARA rule, pid) into a finding under the `memory_signature` rules of rules/memory.toml;
hits that no process maps become one finding per YARA rule (scope "unattributed").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from sva.engine.facts import FactView
from sva.engine.model import Finding, Severity
from sva.engine.rules import MemoryScope, MemorySignatureRule, RuleSet
from sva.guest.memscan import AttributedMatch

MAX_EVIDENCE_HITS = 32
MAX_EVIDENCE_MAPPINGS = 16
MAX_META_TEXT = 512


@dataclass(frozen=True, kw_only=True)
class MemorySignatureMatch(Finding):
    kind: ClassVar[str] = "memory.yara"
    description: ClassVar[str] = (
        "a YARA signature of the active bundle matched guest memory"
    )
    default_severity: ClassVar[Severity] = Severity.HIGH


def _text(value: str | None) -> str | None:
    return None if value is None else value[:MAX_META_TEXT]


def _evidence(m: AttributedMatch) -> dict[str, Any]:
    namespace, _, name = m.rule.partition(":")
    ev: dict[str, Any] = {
        "signature": m.rule,
        "namespace": namespace,
        "yara_rule": name,
        "author": _text(m.meta_value("author")),
        "reference": _text(m.meta_value("reference")),
        "signature_description": _text(m.meta_value("description")),
        "tags": list(m.tags),
        "strings": [h.to_json() for h in m.hits[:MAX_EVIDENCE_HITS]],
    }
    omitted = m.hits_omitted + max(0, len(m.hits) - MAX_EVIDENCE_HITS)
    if omitted:
        ev["strings_omitted"] = omitted
    if m.process is not None:
        ev["pid"] = m.process.pid
        ev["comm"] = m.process.comm
        ev["mappings"] = [x.to_json() for x in m.mappings[:MAX_EVIDENCE_MAPPINGS]]
    else:
        ev["location"] = "unattributed"
    return ev


class YaraMemory:
    id = "yara_memory"
    version = "1.0.0"
    description = "YARA signature matches in guest RAM, attributed to process, mapping and address"
    needs = frozenset({"yara_matches"})
    material_fields = frozenset({"signature"})

    def detect(self, facts: FactView, rules: RuleSet) -> Iterator[Finding]:
        matches: Sequence[AttributedMatch] = facts["yara_matches"]
        sig_rules = rules.of_kind(MemorySignatureRule)
        for m in matches:
            scope = (
                MemoryScope.UNATTRIBUTED if m.process is None else MemoryScope.PROCESS
            )
            for rule in sig_rules:
                if rule.scope is not scope or not rule.covers(m.rule):
                    continue
                if m.process is not None:
                    paths = [x.path for x in m.mappings if x.path]
                    if m.process.exe:
                        paths.append(m.process.exe)
                    if rule.allows(m.process, paths):
                        continue
                    where = f"pid {m.process.pid} ({m.process.comm})"
                else:
                    where = "memory no process maps"
                yield MemorySignatureMatch(
                    rule=rule.id, title=f"{rule.title}: {m.rule} in {where}", severity=rule.severity,
                    mitre=m.techniques or rule.mitre, process=m.process, evidence=_evidence(m),
                    subject=(m.rule,),
                )  # fmt: skip
                break  # one finding per (YARA rule, pid): the first rule that takes it


DETECTOR = YaraMemory()
