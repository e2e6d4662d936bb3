"""Port scans from or against VMs (ATT&CK T1046 network service discovery).

Reads the flows of the `net_window`. A probe is a flow of few packets that carried no
payload (TCP: it began with a SYN; UDP: any short flow that is not a reply). One source
probing `min_ports` distinct ports of one host is a vertical scan; the same port on
`min_hosts` hosts is a horizontal sweep. TCP probes that were never ACKed by the scanner
are a half-open (SYN) scan, those that were are a connect scan. Rules: kind `net_port_scan`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from sva.engine.facts import FactView
from sva.engine.model import Finding, Severity
from sva.engine.rules import RuleSet
from sva.net.inventory import Inventory, whois
from sva.net.model import TCP_ACK, FlowRecord, NetWindow
from sva.net.rules import PortScanRule

MAX_LISTED = 32


@dataclass(frozen=True, kw_only=True)
class PortScan(Finding):
    kind: ClassVar[str] = "net.port_scan"
    description: ClassVar[str] = "one source probed many ports or hosts in a short time (network service discovery)"
    default_severity: ClassVar[Severity] = Severity.MEDIUM


def _probes(rule: PortScanRule, flows: tuple[FlowRecord, ...], since: float) -> list[FlowRecord]:
    """The window's probe flows for `rule` (plain comprehensions: they run over every flow)."""
    most = rule.max_probe_packets
    if rule.protocol == "tcp":
        return [f for f in flows if f.proto == 6 and f.syn and f.packets <= most and not f.head and f.last >= since]
    udp = [f for f in flows if f.proto == 17 and f.last >= since]
    starts = {(f.src_ip, f.dst_ip, f.sport, f.dport): f.first for f in udp}
    out = []
    for f in udp:
        if f.packets > most:
            continue
        reverse_first = starts.get((f.dst_ip, f.src_ip, f.dport, f.sport))
        if reverse_first is None or reverse_first > f.first:  # a reply is not a probe
            out.append(f)
    return out


def _evidence(rule: PortScanRule, probes: list[FlowRecord]) -> dict[str, Any]:
    ports = sorted({f.dport for f in probes})
    hosts = sorted({f.dst_ip for f in probes})
    ev: dict[str, Any] = {
        "protocol": rule.protocol.value, "src_ip": probes[0].src_ip, "src_mac": probes[0].src_mac,
        "probes": len(probes), "ports": len(ports), "hosts": len(hosts), "ports_sample": ports[:MAX_LISTED],
        "hosts_sample": hosts[:MAX_LISTED], "packets": sum(f.packets for f in probes),
        "first_seen": round(min(f.first for f in probes), 6), "last_seen": round(max(f.last for f in probes), 6),
        "window_seconds": rule.window_seconds,
    }  # fmt: skip
    if rule.protocol == "tcp":
        acked = sum(1 for f in probes if f.flags_or & TCP_ACK)
        ev["scan_type"] = "connect" if acked * 2 > len(probes) else "syn (half-open)"
    return ev


class NetPortScan:
    id = "net_port_scan"
    version = "1.0.0"
    description = "TCP SYN/connect and UDP port scans and sweeps"
    needs = frozenset({"net_window", "net_inventory"})
    material_fields = frozenset[str]()

    def detect(self, facts: FactView, rules: RuleSet) -> Iterator[Finding]:
        window: NetWindow = facts["net_window"]
        inv: Inventory = facts["net_inventory"]
        for rule in rules.of_kind(PortScanRule):
            by_src: dict[tuple[str, str], list[FlowRecord]] = {}
            for f in _probes(rule, window.flows, window.end - rule.window_seconds):
                by_src.setdefault((f.src_ip, f.src_mac), []).append(f)
            for (src_ip, src_mac), probes in by_src.items():
                if rule.allows_source(src_ip):
                    continue
                who = whois(inv, port=probes[0].port, mac=src_mac, ip=src_ip)
                if rule.allows_vm(who.get("vm")):
                    continue
                name = who.get("vm", src_ip)
                per_host: dict[str, list[FlowRecord]] = {}
                per_port: dict[int, list[FlowRecord]] = {}
                for f in probes:
                    per_host.setdefault(f.dst_ip, []).append(f)
                    per_port.setdefault(f.dport, []).append(f)
                for dst, fl in per_host.items():
                    n = len({f.dport for f in fl})
                    if n >= rule.min_ports:
                        target = whois(inv, mac=fl[0].dst_mac, ip=dst)
                        yield PortScan(
                            rule=rule.id, title=f"{rule.title}: {name} probed {n} {rule.protocol.value} ports of "
                            f"{target.get('vm', dst)}", severity=rule.severity, mitre=rule.mitre,
                            subject=(src_ip, rule.protocol.value, "ports", dst),
                            evidence={**_evidence(rule, fl), **who, "dst_ip": dst,
                                      "target_vm": target.get("vm")},
                        )  # fmt: skip
                if rule.min_hosts >= 2:
                    for port, fl in per_port.items():
                        n = len({f.dst_ip for f in fl})
                        if n >= rule.min_hosts:
                            yield PortScan(
                                rule=rule.id, title=f"{rule.title}: {name} swept {rule.protocol.value}/{port} on {n} hosts",
                                severity=rule.severity, mitre=rule.mitre,
                                subject=(src_ip, rule.protocol.value, "hosts", port),
                                evidence={**_evidence(rule, fl), **who, "dst_port": port},
                            )  # fmt: skip


DETECTOR = NetPortScan()
