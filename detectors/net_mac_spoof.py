"""MAC spoofing by a VM on the virtual switch (NIST SP 800-125A HYP-T2).

Reads the `net_window` (flows of the recent horizon) and the `net_inventory`: a frame on
a VM's port from a source MAC the VM does not own, or a VM's configured address used
from a MAC that belongs to no known VM or gateway. Rules: kind `net_mac_spoof`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from sva.engine.facts import FactView
from sva.engine.model import Finding, Severity
from sva.engine.rules import RuleSet
from sva.net.evidence import FlowGroup, from_vm_on_port
from sva.net.inventory import Inventory, whois
from sva.net.model import ArpObservation, NetWindow
from sva.net.rules import MacSpoofRule


@dataclass(frozen=True, kw_only=True)
class MacSpoofing(Finding):
    kind: ClassVar[str] = "net.mac_spoof"
    description: ClassVar[str] = "a VM sent frames with a source MAC address that is not assigned to it"
    default_severity: ClassVar[Severity] = Severity.HIGH


class NetMacSpoof:
    id = "net_mac_spoof"
    version = "1.0.0"
    description = "frames from a VM with a source MAC not assigned to it, or a VM's address used from a foreign MAC"
    needs = frozenset({"net_window", "net_inventory"})
    material_fields = frozenset[str]()

    def detect(self, facts: FactView, rules: RuleSet) -> Iterator[Finding]:
        window: NetWindow = facts["net_window"]
        inv: Inventory = facts["net_inventory"]
        for rule in rules.of_kind(MacSpoofRule):
            yield from self._check(rule, window, inv)

    def _check(self, rule: MacSpoofRule, window: NetWindow, inv: Inventory) -> Iterator[Finding]:
        on_port: dict[tuple[str, str], FlowGroup] = {}  # (vm, src mac)
        arp_on_port: dict[tuple[str, str], list[ArpObservation]] = {}  # ARP is no flow: counted apart
        borrowed: dict[tuple[str, str], FlowGroup] = {}  # (owner vm, src mac)
        # Decide once per distinct (port, source MAC, destination MAC, source IP), then
        # gather the flows of the flagged ones: many flows share few such combinations.
        verdicts: dict[tuple[str, str, str, str], tuple[dict[tuple[str, str], FlowGroup], tuple[str, str]]] = {}
        for port, src_mac, dst_mac, src_ip in {(f.port, f.src_mac, f.dst_mac, f.src_ip) for f in window.flows}:
            if src_mac in rule.allow_macs:
                continue
            vm = from_vm_on_port(inv, port, src_mac, dst_mac)
            if vm is not None:
                verdicts[(port, src_mac, dst_mac, src_ip)] = (on_port, (vm.name, src_mac))
                continue
            if not rule.check_ip_owner or inv.vm_by_mac(src_mac) or inv.gateway_by_mac(src_mac):
                continue
            owner = inv.owner_of_ip(src_ip)
            if owner is not None and owner.kind == "vm" and not owner.learned and src_mac not in owner.macs:
                verdicts[(port, src_mac, dst_mac, src_ip)] = (borrowed, (owner.name, src_mac))
        for f in window.flows if verdicts else ():
            verdict = verdicts.get((f.port, f.src_mac, f.dst_mac, f.src_ip))
            if verdict is not None:
                verdict[0].setdefault(verdict[1], FlowGroup()).add(f)
        for a in window.arp:
            if a.eth_src in rule.allow_macs:
                continue
            vm = from_vm_on_port(inv, a.port, a.eth_src, a.eth_dst)
            if vm is not None:
                arp_on_port.setdefault((vm.name, a.eth_src), []).append(a)

        for name, mac in {**on_port, **arp_on_port}:
            if rule.allows_vm(name):
                continue
            vm = inv.vm(name)
            group = on_port.get((name, mac))
            arps = arp_on_port.get((name, mac), [])
            if group is not None:
                ev = group.evidence()
                port = group.flows[0].port
            else:
                ev = {"packets": 0, "first_seen": round(min(a.ts for a in arps), 6),
                      "last_seen": round(max(a.ts for a in arps), 6)}  # fmt: skip
                port = arps[0].port
            if arps:
                ev["arp_packets"] = len(arps)
                ev["packets"] += len(arps)
            yield MacSpoofing(
                rule=rule.id, title=f"{rule.title}: VM {name} sent from MAC {mac} (its own: {', '.join(vm.macs) if vm else '?'})",
                severity=rule.severity, mitre=rule.mitre, subject=(name, mac),
                evidence={**ev, **whois(inv, port=port), "spoofed_mac": mac,
                          "assigned_macs": list(vm.macs) if vm else [], "how": "port"},
            )  # fmt: skip
        for (name, mac), group in borrowed.items():
            if rule.allows_vm(name):
                continue
            f = group.flows[0]
            owner_vm = inv.vm(name)
            yield MacSpoofing(
                rule=rule.id, title=f"{rule.title}: address {f.src_ip} of VM {name} used from unknown MAC {mac}",
                severity=rule.severity, mitre=rule.mitre, subject=(name, mac),
                evidence={**group.evidence(), "vm": name, "spoofed_mac": mac, "how": "ip owner",
                          "assigned_macs": list(owner_vm.macs) if owner_vm else []},
            )  # fmt: skip


DETECTOR = NetMacSpoof()
