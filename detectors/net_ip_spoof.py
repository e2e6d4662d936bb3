"""IP spoofing by a VM on the virtual switch (NIST SP 800-125A HYP-T2).

Reads the `net_window` and the `net_inventory`: an IP packet from a VM (known by its MAC,
or by a port that only carries its egress) whose source address is not bound to it.
Rules: kind `net_ip_spoof`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from sva.engine.facts import FactView
from sva.engine.model import Finding, Severity
from sva.engine.rules import RuleSet
from sva.net.evidence import FlowGroup, judged
from sva.net.inventory import Inventory, whois
from sva.net.model import NetWindow
from sva.net.rules import IpSpoofRule


@dataclass(frozen=True, kw_only=True)
class IpSpoofing(Finding):
    kind: ClassVar[str] = "net.ip_spoof"
    description: ClassVar[str] = "a VM sent packets with a source IP address that is not bound to it"
    default_severity: ClassVar[Severity] = Severity.HIGH


class NetIpSpoof:
    id = "net_ip_spoof"
    version = "1.0.0"
    description = "IP packets from a VM with a source address not bound to it"
    needs = frozenset({"net_window", "net_inventory"})
    material_fields = frozenset[str]()

    def detect(self, facts: FactView, rules: RuleSet) -> Iterator[Finding]:
        window: NetWindow = facts["net_window"]
        inv: Inventory = facts["net_inventory"]
        for rule in rules.of_kind(IpSpoofRule):
            found: dict[tuple[str, str], FlowGroup] = {}
            # Decide once per distinct (port, source MAC, source IP), then gather the flows.
            verdicts: dict[tuple[str, str, str], tuple[str, str]] = {}
            for port, src_mac, src_ip, ip_version in {(f.port, f.src_mac, f.src_ip, f.ip_version) for f in window.flows}:
                vm = inv.vm_by_mac(src_mac)
                if vm is None:
                    port_vm = inv.vm_by_port(port)
                    if port_vm is None or port_vm.port_traffic != "from_vm":
                        continue
                    vm = port_vm
                if not judged(inv, vm, ip_version) or inv.may_send_from(vm, src_ip):
                    continue
                if rule.allows_source(src_ip):
                    continue
                verdicts[(port, src_mac, src_ip)] = (vm.name, src_ip)
            for f in window.flows if verdicts else ():
                key = verdicts.get((f.port, f.src_mac, f.src_ip))
                if key is not None:
                    found.setdefault(key, FlowGroup()).add(f)
            for (name, ip), agg in found.items():
                if rule.allows_vm(name):
                    continue
                vm = inv.vm(name)
                bound = [str(n) for n in vm.networks] + list(inv.learned_ips(name)) if vm else []
                owner = inv.owner_of_ip(ip)
                ev = {**agg.evidence(), **whois(inv, port=agg.flows[0].port, mac=agg.flows[0].src_mac),
                      "spoofed_ip": ip, "bound_ips": bound}  # fmt: skip
                if owner is not None:
                    ev["address_owner"] = f"{owner.kind} {owner.name}"
                yield IpSpoofing(
                    rule=rule.id, title=f"{rule.title}: VM {name} sent from {ip}" + (
                        f" (belongs to {owner.kind} {owner.name})" if owner else ""),
                    severity=rule.severity, mitre=rule.mitre, subject=(name, ip), evidence=ev,
                )  # fmt: skip



DETECTOR = NetIpSpoof()
