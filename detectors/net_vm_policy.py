"""Inter-VM traffic policy: which VM groups may talk to which, on which services.

Reads the flows of the `net_window` and the `net_inventory` (each VM's group). For each
conversation between two VMs it finds who opened it (the sender of a TCP SYN; for UDP
and ICMP the side seen first) and checks the `net_vm_policy` rules: a service not
in a matching rule's `allow` list is a finding naming both VMs (lateral movement).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from sva.engine.facts import FactView
from sva.engine.model import Finding, Severity
from sva.engine.rules import RuleSet
from sva.net.evidence import FlowGroup
from sva.net.inventory import Inventory, VmEntry
from sva.net.model import FlowRecord, NetWindow, proto_name
from sva.net.rules import VmTrafficPolicyRule


@dataclass(frozen=True, kw_only=True)
class PolicyViolation(Finding):
    kind: ClassVar[str] = "net.vm_policy"
    description: ClassVar[str] = "two VMs talked on a service the inter-VM policy does not allow"
    default_severity: ClassVar[Severity] = Severity.MEDIUM


def _vm_of(inv: Inventory, mac: str, ip: str) -> VmEntry | None:
    vm = inv.vm_by_mac(mac)
    if vm is not None:
        return vm
    owner = inv.owner_of_ip(ip)
    return inv.vm(owner.name) if owner is not None and owner.kind == "vm" else None


def _opened(f: FlowRecord, starts: dict[tuple[str, str, int, int, int], float]) -> bool:
    if f.proto == 6:
        return f.syn > 0
    if f.proto in (1, 58) and f.sport in (0, 129, 3, 11, 1, 2, 4):
        return False  # ICMP replies and errors (type in sport): echo reply, unreachable, ...
    reverse_first = starts.get(f.reverse_key())
    return reverse_first is None or reverse_first > f.first


class NetVmPolicy:
    id = "net_vm_policy"
    version = "1.0.0"
    description = "traffic between VM groups on services the policy does not allow"
    needs = frozenset({"net_window", "net_inventory"})
    material_fields = frozenset[str]()

    def detect(self, facts: FactView, rules: RuleSet) -> Iterator[Finding]:
        window: NetWindow = facts["net_window"]
        inv: Inventory = facts["net_inventory"]
        policy = rules.of_kind(VmTrafficPolicyRule)
        if not policy:
            return
        starts = {f.key(): f.first for f in window.flows}
        found: dict[tuple[str, str, str, int, int], tuple[VmTrafficPolicyRule, VmEntry, VmEntry, FlowGroup]] = {}
        for f in window.flows:
            src = _vm_of(inv, f.src_mac, f.src_ip)
            dst = _vm_of(inv, f.dst_mac, f.dst_ip) if src is not None else None
            if src is None or dst is None or src.name == dst.name or not _opened(f, starts):
                continue
            service_port = f.dport if f.proto in (6, 17) else f.sport
            for rule in policy:
                if not rule.applies(src.group, dst.group) or rule.allowed(f.proto, f.dport):
                    continue
                if rule.allows_vm(src.name):
                    continue
                key = (rule.id, src.name, dst.name, f.proto, service_port)
                found.setdefault(key, (rule, src, dst, FlowGroup()))[3].add(f)
        for (_, _, _, proto, port), (rule, src, dst, group) in found.items():
            service = f"{proto_name(proto)}/{port}" if proto in (6, 17) else proto_name(proto)
            yield PolicyViolation(
                rule=rule.id, title=f"{rule.title}: {src.name} ({src.group}) -> {dst.name} ({dst.group}) on {service}",
                severity=rule.severity, mitre=rule.mitre, subject=(src.name, dst.name, service),
                evidence={**group.evidence(), "vm": src.name, "vm_group": src.group, "dst_vm": dst.name,
                          "dst_group": dst.group, "service": service, "allowed": list(rule.allow)},
            )  # fmt: skip


DETECTOR = NetVmPolicy()
