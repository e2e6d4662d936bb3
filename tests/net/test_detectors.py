"""The network detectors end to end on real packets: frames built with scapy, written to a
pcap, read by the pcap source, fast path, deep path, monitor windows and the engine, with
the shipped rules (rules/network/) and signatures (signatures/ioc, signatures/network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.tls.extensions import ServerName, TLS_Ext_ServerName
from scapy.layers.tls.handshake import TLSClientHello
from scapy.layers.tls.record import TLS
from scapy.packet import Raw
from scapy.utils import wrpcap

from sva.engine.engine import Engine
from sva.engine.facts import FactRegistry
from sva.engine.model import Alert, VmIdentity
from sva.engine.registry import default_detector_names, discover
from sva.engine.ruleload import check_rules, loads_rules
from sva.engine.rules import Maturity
from sva.net.capture import open_source
from sva.net.inventory import loads_inventory
from sva.net.ioc import default_ioc_dir, load_iocs
from sva.net.monitor import NETWORK_DETECTORS, Limits, NetMonitor, load_network_rules, network_rules_dirs
from sva.net.rules import NetRule
from sva.scan.rules import CompiledRuleSet, signatures_dir

A, B, C, GW = "02:00:00:77:00:01", "02:00:00:77:00:02", "02:00:00:77:00:03", "02:00:00:77:00:fe"
IA, IB, IC, IGW = "10.77.0.1", "10.77.0.2", "10.77.0.3", "10.77.0.254"
INVENTORY = f"""
[[vm]]
name = "vm-a"
macs = ["{A}"]
ips = ["{IA}"]
group = "dmz"

[[vm]]
name = "vm-b"
macs = ["{B}"]
ips = ["{IB}"]
group = "db"

[[vm]]
name = "vm-c"
macs = ["{C}"]
learn = true
group = "dmz"

[[gateway]]
name = "router"
ips = ["{IGW}"]
macs = ["{GW}"]
"""
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def iocs() -> Any:
    return load_iocs(default_ioc_dir())


@pytest.fixture(scope="module")
def yara_rules() -> CompiledRuleSet:
    return CompiledRuleSet.load(signatures_dir() / "network")


class Capture:
    """Packets with increasing timestamps (`step` apart, or `at` a given time)."""

    def __init__(self) -> None:
        self.packets: list[Any] = []
        self.t = T0

    def add(self, pkt: Any, at: float | None = None, step: float = 0.001) -> None:
        self.t = T0 + at if at is not None else self.t + step
        pkt.time = self.t
        self.packets.append(pkt)


def run(tmp_path: Path, cap: Capture, iocs: Any, yara_rules: Any, *, rules: Any = None, inventory: str = INVENTORY,
        horizon: float = 30.0) -> tuple[list[Any], Any]:  # fmt: skip
    path = tmp_path / "t.pcap"
    wrpcap(str(path), cap.packets, linktype=1)  # Ethernet, also for frames given as raw bytes
    reports: list[Any] = []
    mon = NetMonitor(
        open_source(f"pcap:{path}"), inventory=loads_inventory(inventory), iocs=iocs, payload_rules=yara_rules,
        rules=rules, limits=Limits(interval=1.0, horizon=horizon),
    )  # fmt: skip
    summary = mon.run(on_report=reports.append)
    return reports, summary


def new_alerts(reports: list[Any]) -> list[Alert]:
    return [a for r in reports for a in r.new]


def by_detector(reports: list[Any], detector: str) -> list[Alert]:
    """Each alert of `detector` as last seen (evidence grows while a finding stays present)."""
    latest: dict[str, Alert] = {}
    for r in reports:
        for a in r.alerts:
            if a.finding.detector == detector and a.state.value != "resolved":
                latest[a.uid] = a
    return list(latest.values())


def ether(src: str, dst: str) -> Any:
    return Ether(src=src, dst=dst)


def tcp_conversation(cap: Capture, src: tuple[str, str], dst: tuple[str, str], sport: int, dport: int,
                     data: bytes = b"x" * 200) -> None:  # fmt: skip
    (sm, si), (dm, di) = src, dst
    out = ether(sm, dm) / IP(src=si, dst=di)
    back = ether(dm, sm) / IP(src=di, dst=si)
    cap.add(out / TCP(sport=sport, dport=dport, flags="S", seq=100))
    cap.add(back / TCP(sport=dport, dport=sport, flags="SA", seq=500, ack=101))
    cap.add(out / TCP(sport=sport, dport=dport, flags="A", seq=101, ack=501))
    cap.add(out / TCP(sport=sport, dport=dport, flags="PA", seq=101, ack=501) / Raw(data))
    cap.add(back / TCP(sport=dport, dport=sport, flags="PA", seq=501, ack=101 + len(data)) / Raw(b"ok" * 50))
    cap.add(out / TCP(sport=sport, dport=dport, flags="FA", seq=101 + len(data), ack=601))
    cap.add(back / TCP(sport=dport, dport=sport, flags="FA", seq=601, ack=102 + len(data)))


def normal_traffic(cap: Capture) -> None:
    """What a quiet network does: ARP, pings, a TCP transfer, DNS for allowed names, DHCP."""
    cap.add(ether(A, "ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=A, psrc=IA, pdst=IB))
    cap.add(ether(B, A) / ARP(op=2, hwsrc=B, psrc=IB, hwdst=A, pdst=IA))
    cap.add(ether(GW, "ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=GW, psrc=IGW, pdst=IGW))  # the router announces itself
    for i in range(5):
        cap.add(ether(A, B) / IP(src=IA, dst=IB) / ICMP(type=8, id=7, seq=i) / Raw(b"p" * 56), step=0.2)
        cap.add(ether(B, A) / IP(src=IB, dst=IA) / ICMP(type=0, id=7, seq=i) / Raw(b"p" * 56))
    tcp_conversation(cap, (A, IA), (B, IB), 40000, 5432, b"SELECT 1;" * 50)
    for i, name in enumerate(["deb.debian.org", "www.example.com", "security.debian.org"]):
        cap.add(ether(A, GW) / IP(src=IA, dst=IGW) / UDP(sport=50000 + i, dport=53) / DNS(rd=1, qd=DNSQR(qname=name)))
        cap.add(ether(GW, A) / IP(src=IGW, dst=IA) / UDP(sport=53, dport=50000 + i)
                / DNS(qr=1, qd=DNSQR(qname=name), an=[DNSRR(rrname=name, rdata="93.184.216.34")]))  # fmt: skip
    # vm-c gets its address from DHCP, then uses it.
    cap.add(ether(C, "ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
            / BOOTP(chaddr=bytes.fromhex(C.replace(":", "")) + bytes(10)) / DHCP(options=[("message-type", "discover"), "end"]))  # fmt: skip
    cap.add(ether(GW, C) / IP(src=IGW, dst=IC) / UDP(sport=67, dport=68)
            / BOOTP(op=2, yiaddr=IC, chaddr=bytes.fromhex(C.replace(":", "")) + bytes(10))
            / DHCP(options=[("message-type", "ack"), ("server_id", IGW), "end"]))  # fmt: skip
    tcp_conversation(cap, (C, IC), (GW, "93.184.216.34"), 41000, 443, b"\x17\x03\x03" + b"e" * 100)


def test_normal_traffic_gives_no_findings(tmp_path: Path, iocs: Any, yara_rules: Any) -> None:
    cap = Capture()
    normal_traffic(cap)
    reports, summary = run(tmp_path, cap, iocs, yara_rules)
    assert new_alerts(reports) == []
    assert all(not r.health for r in reports), [h for r in reports for h in r.health]
    assert summary.counters.packets == len(cap.packets) and summary.counters.malformed == 0
    ran = {d.detector: d.status for d in reports[-1].detectors}
    assert ran == dict.fromkeys(NETWORK_DETECTORS, "ok")


def test_syn_scan_names_the_scanning_vm(tmp_path: Path, iocs: Any, yara_rules: Any) -> None:
    cap = Capture()
    for port in range(1, 101):
        cap.add(ether(A, B) / IP(src=IA, dst=IB) / TCP(sport=61000, dport=port, flags="S"))
        if port == 22:
            cap.add(ether(B, A) / IP(src=IB, dst=IA) / TCP(sport=22, dport=61000, flags="SA"))
            cap.add(ether(A, B) / IP(src=IA, dst=IB) / TCP(sport=61000, dport=22, flags="R"))
        else:
            cap.add(ether(B, A) / IP(src=IB, dst=IA) / TCP(sport=port, dport=61000, flags="RA"))
    reports, _ = run(tmp_path, cap, iocs, yara_rules)
    (scan,) = by_detector(reports, "net_port_scan")
    f = scan.finding
    assert f.rule == "SVA-NET-SCAN-TCP" and f.mitre == ("T1046",)
    assert f.evidence["vm"] == "vm-a" and f.evidence["target_vm"] == "vm-b"
    assert f.evidence["ports"] == 100 and f.evidence["scan_type"] == "syn (half-open)"
    assert f.evidence["first_seen"] == pytest.approx(T0 + 0.001) and f.evidence["packets"] >= 100
    assert "vm-a probed 100 tcp ports of vm-b" in f.title
    assert [a.uid for a in new_alerts(reports)] == [scan.uid]  # the victim's RSTs are not a scan, nothing else fires


def test_connect_and_udp_scans_and_a_sweep(tmp_path: Path, iocs: Any, yara_rules: Any) -> None:
    cap = Capture()
    for port in range(1000, 1030):  # connect scan: full handshakes to open ports, then RST
        out = ether(A, B) / IP(src=IA, dst=IB)
        cap.add(out / TCP(sport=port + 10000, dport=port, flags="S"))
        cap.add(ether(B, A) / IP(src=IB, dst=IA) / TCP(sport=port, dport=port + 10000, flags="SA"))
        cap.add(out / TCP(sport=port + 10000, dport=port, flags="A"))
        cap.add(out / TCP(sport=port + 10000, dport=port, flags="RA"))
    for port in range(2000, 2025):  # UDP scan from vm-b
        cap.add(ether(B, A) / IP(src=IB, dst=IA) / UDP(sport=53000, dport=port))
        cap.add(ether(A, B) / IP(src=IA, dst=IB) / ICMP(type=3, code=3) / IP(src=IB, dst=IA) / UDP(sport=53000, dport=port))
    for host in range(10, 40):  # a horizontal sweep of port 22 from vm-a
        cap.add(ether(A, GW) / IP(src=IA, dst=f"10.77.1.{host}") / TCP(sport=62000, dport=22, flags="S"))
    reports, _ = run(tmp_path, cap, iocs, yara_rules)
    scans = {a.finding.subject: a.finding for a in by_detector(reports, "net_port_scan")}
    connect = scans[(IA, "tcp", "ports", IB)]
    assert connect.evidence["scan_type"] == "connect" and connect.evidence["ports"] == 30
    udp = scans[(IB, "udp", "ports", IA)]
    assert udp.rule == "SVA-NET-SCAN-UDP" and udp.evidence["vm"] == "vm-b" and udp.evidence["ports"] == 25
    sweep = scans[(IA, "tcp", "hosts", 22)]
    assert sweep.evidence["hosts"] == 30 and "swept tcp/22 on 30 hosts" in sweep.title
    assert len(scans) == 3


def test_arp_spoofing_names_the_attacker(tmp_path: Path, iocs: Any, yara_rules: Any) -> None:
    cap = Capture()
    normal_traffic(cap)
    for _ in range(3):  # arpspoof style: vm-a tells vm-b that the router's address is at vm-a's MAC
        cap.add(ether(A, B) / ARP(op=2, hwsrc=A, psrc=IGW, hwdst=B, pdst=IB), step=0.5)
    reports, _ = run(tmp_path, cap, iocs, yara_rules)
    found = {a.finding.subject: a.finding for a in by_detector(reports, "net_arp_spoof")}
    claim = found[("claim", IGW, A)]
    assert claim.evidence["vm"] == "vm-a" and claim.evidence["address_owner"] == "gateway router"
    assert claim.evidence["packets"] == 3 and claim.mitre == ("T1557.002",)
    assert claim.evidence["ops"] == ["reply"] and claim.evidence["targets"] == [IB]
    flip = found[("flip-flop", IGW)]  # the router's own announcement and vm-a's replies
    assert flip.evidence["macs"] == sorted([A, GW]) and "vm-a" in flip.evidence["claimants"]
    assert len(found) == 2 and len(new_alerts(reports)) == 2


def test_ip_spoofing_and_learned_addresses(tmp_path: Path, iocs: Any, yara_rules: Any) -> None:
    cap = Capture()
    normal_traffic(cap)  # vm-c learns 10.77.0.3 from DHCP there
    cap.add(ether(A, B) / IP(src="10.77.9.9", dst=IB) / UDP(sport=1, dport=9) / Raw(b"forged"))
    cap.add(ether(A, B) / IP(src="10.77.9.9", dst=IB) / UDP(sport=2, dport=9) / Raw(b"forged"))
    cap.add(ether(C, B) / IP(src=IB, dst=IA) / TCP(sport=80, dport=3, flags="S"))  # vm-c uses vm-b's address
    reports, _ = run(tmp_path, cap, iocs, yara_rules)
    found = {a.finding.subject: a.finding for a in by_detector(reports, "net_ip_spoof")}
    assert set(found) == {("vm-a", "10.77.9.9"), ("vm-c", IB)}
    a = found[("vm-a", "10.77.9.9")]
    assert a.evidence["flows"] == 2 and a.evidence["bound_ips"] == [f"{IA}/32"] and a.evidence["vm"] == "vm-a"
    assert found[("vm-c", IB)].evidence["address_owner"] == "vm vm-b"
    assert found[("vm-c", IB)].evidence["bound_ips"] == [IC]  # learned from the DHCP ACK
    assert {x.finding.detector for x in new_alerts(reports)} == {"net_ip_spoof"}


def test_mac_spoofing_by_port_and_by_address_owner(tmp_path: Path, iocs: Any, yara_rules: Any) -> None:
    inventory = INVENTORY.replace('group = "dmz"\n', 'group = "dmz"\nport = "pa"\nport_traffic = "from_vm"\n', 1)
    cap = Capture()
    normal_traffic(cap)
    forged = "02:00:00:66:66:66"
    # On vm-a's own port (only its egress is mirrored there): a foreign source MAC.
    cap.add(ether(forged, B) / IP(src=IA, dst=IB) / UDP(sport=7, dport=7) / Raw(b"m"))
    pkts = [p for p in cap.packets]
    pkts[-1].sniffed_on = "pa"
    path = tmp_path / "ports.pcapng"
    from sva.net.pcapio import PcapNgWriter  # pcapng keeps each frame's interface: the port label

    # And an ARP request from vm-a's port with yet another forged Ethernet source.
    arp_forged = "02:00:00:66:66:67"
    pkts.append(ether(arp_forged, "ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=A, psrc=IA, pdst=IB))
    pkts[-1].time = cap.t + 0.01
    with PcapNgWriter(path) as w:  # type: ignore[call-arg]
        for p in pkts:
            w.write(float(p.time), bytes(p), port="pa" if p[Ether].src in (A, forged, arp_forged) else "")
    # Elsewhere (no port binding): vm-b's address from a MAC nobody owns.
    cap2 = Capture()
    cap2.add(ether("02:00:00:55:55:55", A) / IP(src=IB, dst=IA) / UDP(sport=8, dport=8) / Raw(b"n"))
    reports2, _ = run(tmp_path, cap2, iocs, yara_rules, inventory=inventory)
    (owner_case,) = by_detector(reports2, "net_mac_spoof")
    assert owner_case.finding.subject == ("vm-b", "02:00:00:55:55:55")
    assert owner_case.finding.evidence["how"] == "ip owner" and owner_case.finding.evidence["vm"] == "vm-b"

    reports: list[Any] = []
    mon = NetMonitor(open_source(f"pcap:{path}"), inventory=loads_inventory(inventory), iocs=iocs,
                     payload_rules=yara_rules)  # fmt: skip
    mon.run(on_report=reports.append)
    found = {a.finding.subject: a.finding for a in by_detector(reports, "net_mac_spoof")}
    assert set(found) == {("vm-a", forged), ("vm-a", arp_forged)}
    f = found[("vm-a", forged)]
    assert f.evidence["how"] == "port" and f.evidence["vm"] == "vm-a"
    assert f.evidence["port"] == "pa" and f.evidence["assigned_macs"] == [A]
    assert f.evidence["flow"] == f"udp {IA}:7 -> {IB}:7" and f.evidence["packets"] == 1
    arp = found[("vm-a", arp_forged)]
    assert arp.evidence["arp_packets"] == 1 and arp.evidence["port"] == "pa" and arp.evidence["vm"] == "vm-a"


def test_ioc_dns_tls_http_ip_and_payload_signature(tmp_path: Path, iocs: Any, yara_rules: Any) -> None:
    cap = Capture()
    normal_traffic(cap)
    for i in range(3):  # a beacon: three lookups, one finding
        cap.add(ether(A, GW) / IP(src=IA, dst=IGW) / UDP(sport=51000 + i, dport=53)
                / DNS(rd=1, qd=DNSQR(qname="beacon.sva-c2.example")), step=0.3)  # fmt: skip
    cap.add(ether(GW, B) / IP(src=IGW, dst=IB) / UDP(sport=53, dport=52000)
            / DNS(qr=1, qd=DNSQR(qname="cdn.example.net"), an=[DNSRR(rrname="cdn.example.net", rdata="192.0.2.66")]))  # fmt: skip
    hello = TLS(msg=[TLSClientHello(ext=[TLS_Ext_ServerName(servernames=[ServerName(servername=b"ioc-test.sva.invalid")])])])
    tcp_conversation(cap, (B, IB), (GW, "203.0.113.5"), 42000, 443, bytes(hello))
    tcp_conversation(cap, (C, "10.77.0.3"), (GW, "203.0.113.6"), 42001, 80, b"GET / HTTP/1.1\r\nHost: www.sva-c2.example\r\n\r\n")
    tcp_conversation(cap, (A, IA), (GW, "192.0.2.66"), 42002, 4444, b"SVA-NET-TEST-BEACON-3f9c1d hello")
    reports, _ = run(tmp_path, cap, iocs, yara_rules)
    found = {(a.finding.evidence["where"], a.finding.evidence.get("vm")): a.finding for a in by_detector(reports, "net_ioc")}
    dns = found[("dns_query", "vm-a")]
    assert dns.rule == "SVA-NET-IOC-DNS" and dns.evidence["count"] == 3 and dns.evidence["indicator"] == "sva-c2.example"
    assert dns.evidence["ioc_source"].endswith("signatures/ioc/sva_test.domains:4") and dns.mitre == ("T1071.004",)
    assert found[("dns_answer", "vm-b")].evidence["answer"] == "192.0.2.66"
    tls = found[("tls_sni", "vm-b")]
    assert tls.rule == "SVA-NET-IOC-TLS-HTTP" and tls.evidence["flow"] == f"tcp {IB}:42000 -> 203.0.113.5:443"
    assert found[("http_host", "vm-c")].evidence["server_name"] == "www.sva-c2.example"
    ip = found[("ip", "vm-a")]
    assert ip.evidence["indicator"] == "192.0.2.66/32" and ip.evidence["dst_port"] == 4444
    assert len(found) == 5
    (yara,) = by_detector(reports, "net_payload")
    assert yara.finding.evidence["signature"] == "network:SVA_Net_Test_Beacon" and yara.finding.evidence["vm"] == "vm-a"
    assert yara.finding.evidence["strings"][0]["offset"] == 0
    assert {a.finding.detector for a in new_alerts(reports)} == {"net_ioc", "net_payload"}


def test_findings_stay_while_seen_and_resolve_after_the_horizon(tmp_path: Path, iocs: Any, yara_rules: Any) -> None:
    cap = Capture()
    for second in range(0, 20, 2):  # a DNS beacon every 2 s for 20 s, then quiet traffic for 20 s
        cap.add(ether(A, GW) / IP(src=IA, dst=IGW) / UDP(sport=51000 + second, dport=53)
                / DNS(rd=1, qd=DNSQR(qname="sva-c2.example")), at=second)  # fmt: skip
    for second in range(20, 40):
        cap.add(ether(A, B) / IP(src=IA, dst=IB) / ICMP(id=1, seq=second), at=second)
    reports, summary = run(tmp_path, cap, iocs, yara_rules, horizon=5.0)
    assert summary.cycles >= 25  # one per second of capture time (a 2 s gap gets one)
    news = new_alerts(reports)
    assert len(news) == 1 and news[0].finding.detector == "net_ioc"
    resolved = [a for r in reports for a in r.resolved]
    assert [a.uid for a in resolved] == [news[0].uid]
    assert resolved[0].last_seen > news[0].first_seen


def test_inter_vm_policy(tmp_path: Path, iocs: Any, yara_rules: Any) -> None:
    rules = loads_rules("""
[ruleset]
version = "1"
[[rule]]
id = "T-POLICY"
kind = "net_vm_policy"
version = 1
maturity = "stable"
severity = "medium"
mitre = ["T1021"]
title = "policy"
description = "dmz to db only on postgres and ping"
from_groups = ["dmz"]
to_groups = ["db"]
allow = ["tcp/5432", "icmp"]
""")
    cap = Capture()
    normal_traffic(cap)  # vm-a (dmz) -> vm-b (db) on tcp/5432 and ICMP: allowed
    tcp_conversation(cap, (A, IA), (B, IB), 40001, 22)  # ssh: not allowed
    tcp_conversation(cap, (B, IB), (A, IA), 40002, 8080)  # db -> dmz: not governed by this rule
    reports, _ = run(tmp_path, cap, iocs, yara_rules, rules=rules)
    (v,) = new_alerts(reports)
    assert v.finding.subject == ("vm-a", "vm-b", "tcp/22") and v.finding.evidence["vm"] == "vm-a"
    assert v.finding.evidence["dst_vm"] == "vm-b" and v.finding.evidence["packets"] == 4


def test_hostile_frames_are_counted_never_fatal(tmp_path: Path, iocs: Any, yara_rules: Any) -> None:
    cap = Capture()
    good = ether(A, B) / IP(src=IA, dst=IB) / UDP(sport=1, dport=2) / Raw(b"x" * 40)
    cap.add(Raw(bytes(good)[:20]))  # truncated inside the IP header
    cap.add(Raw(bytes(ether(A, B) / IP(src=IA, dst=IB, ihl=2) / UDP())))  # ihl < 5
    cap.add(Raw(bytes(ether(A, B) / IP(src=IA, dst=IB, len=60000) / TCP(dataofs=15))))  # absurd lengths
    cap.add(Raw(bytes(ether(A, B) / IP(src=IA, dst=IB) / TCP(dataofs=2))))  # TCP header shorter than 20
    frags = fragment(ether(A, B) / IP(src=IA, dst=IB) / UDP(sport=5, dport=6) / Raw(b"f" * 3000), fragsize=1000)
    for frag in frags:
        cap.add(frag)
    cap.add(ether(A, B) / Dot1Q(vlan=10) / Dot1Q(vlan=20) / IP(src=IA, dst=IB) / UDP(sport=3, dport=53)
            / DNS(rd=1, qd=DNSQR(qname="vlan.example")))  # fmt: skip
    cap.add(ether(A, B) / IP(src=IA, dst=IB) / UDP(sport=3, dport=53) / Raw(b"\xff" * 5))  # a DNS message cut short
    cap.add(Raw(b"\x00" * 3))
    reports, summary = run(tmp_path, cap, iocs, yara_rules)
    c = summary.counters
    assert c.packets == len(cap.packets) and c.malformed >= 4 and c.fragments == len(frags) > 1 and c.vlan_tagged == 1
    assert dict(c.malformed_reasons) and c.deep_errors >= 1
    assert all(d.status == "ok" for r in reports for d in r.detectors)


def test_shipped_network_rules_and_detector_sets() -> None:
    ruleset, errors = check_rules(network_rules_dirs()[1:], frozenset(Maturity))
    assert errors == []
    # Prefixed: the network kinds sort after the memory ones in "unknown kind (one of …)" messages.
    assert {r.KIND for r in ruleset.rules} == {"net_mac_spoof", "net_ip_spoof", "net_arp_spoof", "net_port_scan",
                                               "net_ioc", "net_payload_signature", "net_vm_policy"}  # fmt: skip
    for r in ruleset.rules:
        assert isinstance(r, NetRule) and r.mitre and "False positives" in r.description and "Tune" in r.description
        assert r.allow_vms == (), r.id
    assert load_network_rules().get("SVA-PROC-REVSHELL") is not None  # the whole rules dir: suppressions apply
    # The memory scan's default list has no network detector; every network detector is discoverable.
    assert not set(default_detector_names()) & set(NETWORK_DETECTORS)
    found = {d.name: d for d in discover()}
    assert all(found[n].detector is not None and not found[n].default for n in NETWORK_DETECTORS)


def test_network_detector_in_a_memory_cycle_is_skipped_not_crashing() -> None:
    from sva.engine.registry import load_detectors

    engine = Engine(VmIdentity("g", "file:x"), rules=load_network_rules(), detectors=load_detectors(["net_ioc"]),
                    facts=FactRegistry())  # fmt: skip
    report = engine.run_cycle()
    (run_,) = report.detectors
    assert run_.status == "skipped" and "net_window" in run_.message


def test_floods_hit_the_bounds_and_are_counted(tmp_path: Path, iocs: Any, yara_rules: Any) -> None:
    from sva.net.flows import FlowTable

    cap = Capture()
    for i in range(200):  # 200 spoofed-looking 5-tuples, 30 DNS questions
        cap.add(ether(A, B) / IP(src=IA, dst=IB) / UDP(sport=10000 + i, dport=7) / Raw(b"f"))
    for i in range(30):
        cap.add(ether(A, GW) / IP(src=IA, dst=IGW) / UDP(sport=20000 + i, dport=53) / DNS(rd=1, qd=DNSQR(qname=f"n{i}.example")))
    path = tmp_path / "flood.pcap"
    wrpcap(str(path), cap.packets)
    reports: list[Any] = []
    mon = NetMonitor(open_source(f"pcap:{path}"), inventory=loads_inventory(INVENTORY), iocs=iocs, payload_rules=yara_rules,
                     limits=Limits(max_records=10, max_window_flows=50), table=FlowTable(max_flows=100))  # fmt: skip
    summary = mon.run(on_report=reports.append)
    c = summary.counters
    assert c.flows_evicted >= 130 and c.records_dropped == 20 and c.windows_truncated >= 1
    assert len(mon.window.dns) == 10 and len(mon.window.flows) == 50
    assert all(d.status == "ok" for r in reports for d in r.detectors)


def test_ipv6_sources_judged_only_where_the_vm_has_an_ipv6_binding(tmp_path: Path, iocs: Any, yara_rules: Any) -> None:
    from scapy.layers.inet6 import IPv6

    inventory = INVENTORY.replace(f'ips = ["{IA}"]', f'ips = ["{IA}", "fd00:77::1/128"]')
    cap = Capture()
    cap.add(ether(A, B) / IPv6(src="fd00:77::1", dst="fd00:77::2") / UDP(sport=1, dport=2))  # its own address
    cap.add(ether(A, B) / IPv6(src="fe80::1", dst="fd00:77::2") / UDP(sport=3, dport=4))  # link-local: fine
    cap.add(ether(A, B) / IPv6(src="fd00:77::99", dst="fd00:77::2") / UDP(sport=5, dport=6))  # not vm-a's
    cap.add(ether(B, A) / IPv6(src="fd00:77::55", dst="fd00:77::1") / UDP(sport=7, dport=8))  # vm-b: no IPv6 binding
    reports, _ = run(tmp_path, cap, iocs, yara_rules, inventory=inventory)
    found = [a.finding for a in by_detector(reports, "net_ip_spoof")]
    assert [f.subject for f in found] == [("vm-a", "fd00:77::99")]
    assert found[0].evidence["flow"] == "udp [fd00:77::99]:5 -> [fd00:77::2]:6"
