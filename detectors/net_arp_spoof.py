"""ARP spoofing / cache poisoning (ATT&CK T1557.002) seen on the virtual switch.

Reads the ARP packets of the `net_window` and the `net_inventory`. Two signs:
- a claim: an ARP reply, announcement or request whose sender IP belongs to a VM or a
  gateway (configured or learned) and whose sender MAC is not that owner's: the sender
  wants the others' caches to send that address's traffic to it;
- flip-flop: one address claimed by several MACs within the horizon, whoever owns it.
The finding names the attacker (the VM owning the claiming MAC, or the VM on its port).
Rules: kind `net_arp_spoof`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from sva.engine.facts import FactView
from sva.engine.model import Finding, Severity
from sva.engine.rules import RuleSet
from sva.net.inventory import Inventory, whois
from sva.net.model import ArpObservation, ArpOp, NetWindow
from sva.net.rules import ArpSpoofRule

MAX_EXAMPLES = 8
_OPS = {ArpOp.REQUEST: "request", ArpOp.REPLY: "reply"}


@dataclass(frozen=True, kw_only=True)
class ArpSpoofing(Finding):
    kind: ClassVar[str] = "net.arp_spoof"
    description: ClassVar[str] = "ARP packets claim another host's IP address for the sender's MAC (cache poisoning)"
    default_severity: ClassVar[Severity] = Severity.HIGH


def _evidence(packets: list[ArpObservation]) -> dict[str, Any]:
    a = packets[0]
    return {
        "claimed_ip": a.sender_ip, "claimed_by_mac": a.sender_mac, "eth_src": a.eth_src,
        "packets": len(packets), "first_seen": round(min(p.ts for p in packets), 6),
        "last_seen": round(max(p.ts for p in packets), 6),
        "ops": sorted({_OPS.get(p.op, str(p.op)) + (" (gratuitous)" if p.gratuitous else "") for p in packets}),
        "targets": sorted({p.target_ip for p in packets})[:MAX_EXAMPLES],
        "target_macs": sorted({p.eth_dst for p in packets})[:MAX_EXAMPLES],
    }  # fmt: skip


def _attacker(inv: Inventory, a: ArpObservation) -> dict[str, Any]:
    who = whois(inv, port=a.port, mac=a.sender_mac)
    who.pop("gateway", None)
    return who


class NetArpSpoof:
    id = "net_arp_spoof"
    version = "1.0.0"
    description = "ARP replies/announcements claiming another VM's or the gateway's address, and ARP flip-flop"
    needs = frozenset({"net_window", "net_inventory"})
    material_fields = frozenset[str]()

    def detect(self, facts: FactView, rules: RuleSet) -> Iterator[Finding]:
        window: NetWindow = facts["net_window"]
        inv: Inventory = facts["net_inventory"]
        for rule in rules.of_kind(ArpSpoofRule):
            claims: dict[tuple[str, str], list[ArpObservation]] = {}
            by_ip: dict[str, dict[str, list[ArpObservation]]] = {}
            for a in window.arp:
                if a.sender_ip in ("", "0.0.0.0") or a.sender_mac in rule.allow_macs:
                    continue  # an ARP probe (RFC 5227) claims nothing
                by_ip.setdefault(a.sender_ip, {}).setdefault(a.sender_mac, []).append(a)
                if not rule.check_claims:
                    continue
                owner = inv.owner_of_ip(a.sender_ip)
                if owner is not None and owner.macs and a.sender_mac not in owner.macs:
                    claims.setdefault((a.sender_ip, a.sender_mac), []).append(a)
            for (ip, mac), packets in claims.items():
                owner = inv.owner_of_ip(ip)
                attacker = _attacker(inv, packets[0])
                if rule.allows_vm(attacker.get("vm")):
                    continue
                name = attacker.get("vm", f"MAC {mac}")
                victim = f"{owner.kind} {owner.name}" if owner else "?"
                yield ArpSpoofing(
                    rule=rule.id, title=f"{rule.title}: {name} claims {ip} of {victim}", severity=rule.severity,
                    mitre=rule.mitre, subject=("claim", ip, mac),
                    evidence={**_evidence(packets), **attacker, "attacker_mac": mac, "address_owner": victim,
                              "owner_macs": list(owner.macs) if owner else []},
                )  # fmt: skip
            if rule.flip_flop_macs < 2:
                continue
            for ip, macs in by_ip.items():
                if len(macs) < rule.flip_flop_macs:
                    continue
                packets = [p for ps in macs.values() for p in ps]
                who = [_attacker(inv, ps[0]).get("vm", m) for m, ps in sorted(macs.items())]
                if all(rule.allows_vm(w) for w in who):
                    continue
                ev = _evidence(sorted(packets, key=lambda p: p.ts))
                ev.pop("claimed_by_mac")
                yield ArpSpoofing(
                    rule=rule.id, title=f"{rule.title}: {ip} claimed by {len(macs)} MACs ({', '.join(sorted(macs))})",
                    severity=rule.severity, mitre=rule.mitre, subject=("flip-flop", ip),
                    evidence={**ev, "macs": sorted(macs), "claimants": who},
                )  # fmt: skip


DETECTOR = NetArpSpoof()
