"""Indicators of compromise in traffic (signatures/ioc/): bad addresses and bad domains.

Reads the `net_window` (flows, DNS questions and answers, TLS SNIs, HTTP Hosts), the
`net_iocs` lists and the `net_inventory` (to name the VM). Each (rule, indicator, VM or
local address, where) is one finding, so a VM beaconing every second is one alert while
it goes on. Rules: kind `net_ioc` (which sources, which lists).
ATT&CK: T1071 (application-layer C2), T1071.004 (DNS), T1071.001 (web), T1573 (TLS).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from sva.engine.facts import FactView
from sva.engine.model import Finding, Severity
from sva.engine.rules import RuleSet
from sva.net.inventory import Inventory, whois
from sva.net.ioc import IocHit, IocSet
from sva.net.model import NameObservation, NetWindow
from sva.net.rules import IocRule

_WHERE = {
    "ip": "traffic with", "dns_query": "DNS query for", "dns_answer": "DNS answer with",
    "tls_sni": "TLS connection to", "http_host": "HTTP request to",
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class IocMatch(Finding):
    kind: ClassVar[str] = "net.ioc"
    description: ClassVar[str] = "traffic involved an address or domain on an indicator-of-compromise list"
    default_severity: ClassVar[Severity] = Severity.HIGH


class _Seen:
    def __init__(self, hit: IocHit, where: str, ev: dict[str, Any], ts: float) -> None:
        self.hit, self.where, self.ev = hit, where, ev
        self.count, self.first, self.last = 0, ts, ts

    def add(self, ts: float, count: int = 1) -> None:
        self.count += count
        self.first = min(self.first, ts)
        self.last = max(self.last, ts)


class NetIoc:
    id = "net_ioc"
    version = "1.0.0"
    description = "IOC list matches in flow addresses, DNS queries/answers, TLS SNI and HTTP Host"
    needs = frozenset({"net_window", "net_inventory", "net_iocs"})
    material_fields = frozenset[str]()

    def detect(self, facts: FactView, rules: RuleSet) -> Iterator[Finding]:
        window: NetWindow = facts["net_window"]
        inv: Inventory = facts["net_inventory"]
        iocs: IocSet = facts["net_iocs"]
        if iocs.empty:
            return
        seen: dict[tuple[str, str, str], _Seen] = {}

        def note(hit: IocHit | None, where: str, who: dict[str, Any], local: str, ts: float, ev: dict[str, Any],
                 count: int = 1) -> None:  # fmt: skip
            if hit is None:
                return
            key = (where, hit.indicator, who.get("vm") or local)
            s = seen.get(key)
            if s is None:
                s = seen[key] = _Seen(hit, where, {**who, **ev}, ts)
            s.add(ts, count)

        ip_hits = []
        flows = window.flows
        if iocs.has_ips:
            # Each distinct address once, then only the flows of listed ones: a window holds
            # many flows between few addresses.
            seen_ips = {f.src_ip for f in flows}
            seen_ips.update(f.dst_ip for f in flows)
            bad = {ip for ip in seen_ips if iocs.match_ip(ip) is not None}
            for f in flows if bad else ():
                if f.dst_ip in bad:
                    ip_hits.append((f, iocs.match_ip(f.dst_ip), f.src_ip, f.src_mac))
                elif f.src_ip in bad:
                    ip_hits.append((f, iocs.match_ip(f.src_ip), f.dst_ip, f.dst_mac))
        # Oldest first: the flow that opened the conversation gives the evidence's 5-tuple.
        for f, hit, local, mac in sorted(ip_hits, key=lambda x: x[0].first):
            note(hit, "ip", whois(inv, port=f.port, mac=mac, ip=local), local, f.first, f.evidence(), f.packets)
        for d in window.dns:
            if not d.response:
                who = whois(inv, port=d.port, mac=d.src_mac, ip=d.src_ip)
                flow = {"flow": f"udp {d.src_ip}:{d.sport} -> {d.dst_ip}:{d.dport}", "dns_server": d.dst_ip}
                for q in d.qnames:
                    note(iocs.match_domain(q), "dns_query", who, d.src_ip, d.ts, {**flow, "query": q})
            else:
                who = whois(inv, ip=d.dst_ip)
                flow = {"flow": f"udp {d.src_ip}:{d.sport} -> {d.dst_ip}:{d.dport}", "dns_server": d.src_ip}
                for name, value in d.answers:
                    hit = iocs.match_domain(name) or iocs.match_ip(value) or iocs.match_domain(value)
                    note(hit, "dns_answer", who, d.dst_ip, d.ts, {**flow, "answer_name": name, "answer": value})
        for n in (*window.tls, *window.http):
            note(iocs.match_domain(n.name), n.kind, _who(inv, n), n.src_ip, n.ts,
                 {"flow": n.flow_text(), "server_name": n.name})  # fmt: skip

        for rule in rules.of_kind(IocRule):
            for (where, indicator, local), s in seen.items():
                if where not in rule.sources or not rule.covers(s.hit.list) or rule.allows_vm(s.ev.get("vm")):
                    continue
                name = s.ev.get("vm", local)
                yield IocMatch(
                    rule=rule.id, title=f"{rule.title}: {name}: {_WHERE[where]} {s.hit.value} ({s.hit.list})",
                    severity=rule.severity, mitre=rule.mitre, subject=(where, indicator, local),
                    evidence={**s.ev, "indicator": s.hit.indicator, "seen": s.hit.value, "ioc_list": s.hit.list,
                              "ioc_source": s.hit.source, "where": where, "count": s.count,
                              "first_seen": round(s.first, 6), "last_seen": round(s.last, 6)},
                )  # fmt: skip


def _who(inv: Inventory, n: NameObservation) -> dict[str, Any]:
    return whois(inv, port=n.port, mac=n.src_mac, ip=n.src_ip)


DETECTOR = NetIoc()
