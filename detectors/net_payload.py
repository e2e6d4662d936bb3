"""Network YARA (signatures/network/) over the first bytes of each flow's payload.

Reads `net_payload_matches` (the monitor scans each flow's payload head, up to the flow
table's head_bytes per direction, when it grows) and the `net_inventory`; turns each
(YARA rule, flow direction) into a finding under the `net_payload_signature` rules.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from sva.engine.facts import FactView
from sva.engine.model import Finding, Severity
from sva.engine.rules import RuleSet
from sva.net.inventory import Inventory, whois
from sva.net.model import PayloadMatch
from sva.net.rules import PayloadSignatureRule

MAX_META_TEXT = 512


@dataclass(frozen=True, kw_only=True)
class PayloadSignatureMatch(Finding):
    kind: ClassVar[str] = "net.yara"
    description: ClassVar[str] = "a network YARA signature matched the start of a flow's payload"
    default_severity: ClassVar[Severity] = Severity.HIGH


class NetPayload:
    id = "net_payload"
    version = "1.0.0"
    description = "network YARA signatures over the first bytes of each flow's payload"
    needs = frozenset({"net_payload_matches", "net_inventory"})
    material_fields = frozenset[str]()

    def detect(self, facts: FactView, rules: RuleSet) -> Iterator[Finding]:
        matches: Sequence[PayloadMatch] = facts["net_payload_matches"]
        inv: Inventory = facts["net_inventory"]
        sig_rules = rules.of_kind(PayloadSignatureRule)
        for m in matches:
            f = m.flow
            who = whois(inv, port=f.port, mac=f.src_mac, ip=f.src_ip)
            for rule in sig_rules:
                if not rule.covers(m.rule) or rule.allows_vm(who.get("vm")):
                    continue
                desc = m.meta_value("description")
                yield PayloadSignatureMatch(
                    rule=rule.id, title=f"{rule.title}: {m.rule} in {f.five_tuple}", severity=rule.severity,
                    mitre=m.techniques or rule.mitre, subject=(m.rule, *f.key()),
                    evidence={**f.evidence(), **who, "signature": m.rule, "tags": list(m.tags),
                              "signature_description": desc[:MAX_META_TEXT] if desc else None,
                              "strings": [{"offset": o, "id": i, "data": d} for o, i, d in m.strings]},
                )  # fmt: skip
                break


DETECTOR = NetPayload()
