"""Evidence helpers shared by the network detectors: folding flows into one finding's
evidence, and deciding which VM a frame surely came from."""

from __future__ import annotations

from typing import Any

from sva.net.inventory import Inventory, VmEntry
from sva.net.model import FlowRecord, is_multicast_mac

MAX_EXAMPLES = 8


class FlowGroup:
    """Flows of one (who, what) pair folded into one piece of evidence."""

    def __init__(self) -> None:
        self.flows: list[FlowRecord] = []
        self.packets = 0
        self.bytes = 0
        self.first = float("inf")
        self.last = 0.0

    def add(self, f: FlowRecord) -> None:
        self.flows.append(f)
        self.packets += f.packets
        self.bytes += f.bytes
        self.first = min(self.first, f.first)
        self.last = max(self.last, f.last)

    def evidence(self) -> dict[str, Any]:
        f = self.flows[0]
        return {
            **f.evidence(), "flows": len(self.flows), "packets": self.packets, "bytes": self.bytes,
            "first_seen": round(self.first, 6), "last_seen": round(self.last, 6),
            "examples": [x.five_tuple for x in self.flows[:MAX_EXAMPLES]],
        }  # fmt: skip


def from_vm_on_port(inv: Inventory, port: str, src_mac: str, dst_mac: str) -> VmEntry | None:
    """The VM whose port carried a frame with a foreign source MAC that surely came from
    the VM: the port only carries its egress, or the frame was not addressed to the VM."""
    vm = inv.vm_by_port(port)
    if vm is None or src_mac in vm.macs:
        return None
    if vm.port_traffic == "from_vm":
        return vm
    if dst_mac not in vm.macs and not is_multicast_mac(dst_mac):
        return vm
    return None


def judged(inv: Inventory, vm: VmEntry, ip_version: int) -> bool:
    """Only addresses of an IP version the VM has any binding for can be judged: a VM
    configured with IPv4 only still sends IPv6 from addresses nobody told us about."""
    if any(n.version == ip_version for n in vm.networks):
        return True
    return any((":" in ip) == (ip_version == 6) for ip in inv.learned_ips(vm.name))
