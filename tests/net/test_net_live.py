"""The network detectors on live traffic: real tools in real network namespaces.

The `bridge_lab` fixture (tests/net/conftest.py) gives a bridge with three "VM"
namespaces a, b, c whose ports' ingress is mirrored, one monitor interface per port; sva
reads them all (`iface:ma,mb,mc`, each frame labelled with its port). Traffic stays inside
the namespaces. Each test watches for a few seconds while one real tool runs.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from sva.engine.model import Alert
from sva.net.inventory import loads_inventory
from sva.net.ioc import default_ioc_dir, load_iocs
from sva.net.monitor import Limits, NetMonitor
from sva.scan.rules import CompiledRuleSet, signatures_dir

PY = sys.executable


def inventory_for(lab: Any) -> str:
    out = []
    for v in lab.vms.values():
        out.append(f'[[vm]]\nname = "vm-{v.name}"\nmacs = ["{v.mac}"]\nips = ["{v.ip}"]\nport = "{v.monitor}"\n'
                   f'port_traffic = "from_vm"\ngroup = "lab"\n')  # fmt: skip
    return "\n".join(out)


class Watch:
    def __init__(self) -> None:
        self.reports: list[Any] = []
        self.summary: Any = None

    def alerts(self, detector: str | None = None) -> list[Alert]:
        latest: dict[str, Alert] = {}
        for r in self.reports:
            for a in r.alerts:
                if a.state.value != "resolved" and (detector is None or a.finding.detector == detector):
                    latest[a.uid] = a
        return list(latest.values())


@pytest.fixture(scope="module")
def shared() -> dict[str, Any]:
    return {"iocs": load_iocs(default_ioc_dir()), "yara": CompiledRuleSet.load(signatures_dir() / "network")}


@contextmanager
def watching(lab: Any, shared: dict[str, Any], settle: float = 1.0) -> Iterator[Watch]:
    w = Watch()
    mon = NetMonitor(
        lab.open(",".join(v.monitor for v in lab.vms.values())), inventory=loads_inventory(inventory_for(lab)),
        iocs=shared["iocs"], payload_rules=shared["yara"], limits=Limits(interval=0.5), live=True,
    )  # fmt: skip
    stop = threading.Event()

    def run() -> None:
        w.summary = mon.run(stop, on_report=w.reports.append)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(0.3)
    try:
        yield w
    finally:
        time.sleep(settle)
        stop.set()
        t.join(15)
    assert not t.is_alive()


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it)")


def sendp(lab: Any, vm: str, expr: str) -> None:
    """Send frames built by a scapy expression from inside VM `vm` (its eth0)."""
    code = f"from scapy.all import *\nsendp({expr}, iface='eth0', verbose=False)"
    lab.run(vm, PY, "-c", code, timeout=60)


def test_normal_traffic_gives_no_findings(bridge_lab: Any, shared: dict[str, Any]) -> None:
    need("dig")
    lab = bridge_lab
    b = lab.vms["b"]
    server = lab.popen("b", PY, "-c", (
        "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', 5001)); s.listen(1); c,_=s.accept()\n"
        "n=0\nwhile (d:=c.recv(65536)): n+=len(d)\nc.sendall(str(n).encode()); c.close()"))  # fmt: skip
    time.sleep(0.5)
    with watching(lab, shared) as w:
        lab.run("a", "ping", "-c", "3", "-i", "0.2", b.ip)
        out = lab.run("a", PY, "-c", (
            "import socket\nc=socket.create_connection(('%s', 5001), timeout=5)\nc.sendall(b'x'*500000)\n"
            "c.shutdown(socket.SHUT_WR)\nprint(c.recv(100).decode())") % b.ip).stdout  # fmt: skip
        assert out.strip() == "500000"
        lab.run("c", "dig", f"@{b.ip}", "+tries=1", "+time=1", "www.debian.org", check=False)
    server.wait(5)
    assert w.alerts() == [], [a.finding.title for a in w.alerts()]
    c = w.summary.counters
    assert c.bytes > 500_000 and c.kernel_drops == 0 and c.malformed == 0  # veth offloads: few, large frames
    assert all(not r.health for r in w.reports), [h.message for r in w.reports for h in r.health]


def test_nmap_syn_scan_names_the_scanning_vm(bridge_lab: Any, shared: dict[str, Any]) -> None:
    need("nmap")
    lab = bridge_lab
    with watching(lab, shared) as w:
        lab.run("a", "nmap", "-sS", "-n", "-Pn", "-T5", "--max-retries", "0", "-p", "1-300", lab.vms["b"].ip, timeout=60)
    scans = w.alerts("net_port_scan")
    assert len(scans) == 1, [a.finding.title for a in w.alerts()]
    f = scans[0].finding
    assert f.evidence["vm"] == "vm-a" and f.evidence["target_vm"] == "vm-b" and f.evidence["ports"] >= 250
    assert f.evidence["scan_type"] == "syn (half-open)" and f.evidence["port"] == "ma"
    assert f.mitre == ("T1046",)


def test_arpspoof_names_the_attacker(bridge_lab: Any, shared: dict[str, Any]) -> None:
    need("arpspoof")
    lab = bridge_lab
    a, b, c = lab.vms["a"], lab.vms["b"], lab.vms["c"]
    with watching(lab, shared) as w:
        # dsniff's arpspoof in vm-a tells vm-b that vm-c's address is at vm-a's MAC.
        # KILL: no clean-up re-ARPing at exit (seconds more, nothing more to see).
        lab.run("a", "timeout", "-s", "KILL", "4", "arpspoof", "-i", "eth0", "-t", b.ip, c.ip, check=False, timeout=30)
    found = {x.finding.subject: x.finding for x in w.alerts("net_arp_spoof")}
    claim = found[("claim", c.ip, a.mac)]
    assert claim.evidence["vm"] == "vm-a" and claim.evidence["address_owner"] == "vm vm-c"
    assert claim.evidence["packets"] >= 2 and claim.evidence["ops"] == ["reply"] and b.ip in claim.evidence["targets"]
    assert claim.mitre == ("T1557.002",)


def test_forged_source_ip_and_forged_source_mac(bridge_lab: Any, shared: dict[str, Any]) -> None:
    lab = bridge_lab
    a, b = lab.vms["a"], lab.vms["b"]
    forged_mac = "02:00:00:66:66:66"
    with watching(lab, shared) as w:
        sendp(lab, "a", f"[Ether(dst='{b.mac}')/IP(src='10.77.0.99', dst='{b.ip}')/UDP(sport=1234, dport=9)/b'ip']*3")
    ips = w.alerts("net_ip_spoof")
    assert [x.finding.subject for x in ips] == [("vm-a", "10.77.0.99")]
    assert ips[0].finding.evidence["packets"] == 3 and ips[0].finding.evidence["flow"] == f"udp 10.77.0.99:1234 -> {b.ip}:9"
    assert w.alerts("net_mac_spoof") == []

    with watching(lab, shared) as w:
        sendp(lab, "a", f"Ether(src='{forged_mac}', dst='{b.mac}')/IP(src='{a.ip}', dst='{b.ip}')/UDP(sport=99, dport=9)/b'mac'")
    macs = w.alerts("net_mac_spoof")
    assert [x.finding.subject for x in macs] == [("vm-a", forged_mac)]
    assert macs[0].finding.evidence["how"] == "port" and macs[0].finding.evidence["port"] == "ma"
    assert w.alerts("net_ip_spoof") == []


def test_ioc_dns_query_and_tls_sni(bridge_lab: Any, shared: dict[str, Any]) -> None:
    need("dig")
    need("openssl")
    lab = bridge_lab
    b = lab.vms["b"]
    listener = lab.popen("b", PY, "-c", (
        "import socket,time\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', 443)); s.listen(1); c,_=s.accept(); c.recv(4096); time.sleep(1); c.close()"))  # fmt: skip
    time.sleep(0.5)
    with watching(lab, shared) as w:
        lab.run("c", "dig", f"@{b.ip}", "+tries=1", "+time=1", "beacon.sva-c2.example", check=False)
        lab.run("a", "timeout", "5", "openssl", "s_client", "-connect", f"{b.ip}:443", "-servername",
                "ioc-test.sva.invalid", check=False, timeout=30)  # fmt: skip
    listener.wait(5)
    found = {x.finding.evidence["where"]: x.finding for x in w.alerts("net_ioc")}
    assert set(found) == {"dns_query", "tls_sni"}, [x.finding.title for x in w.alerts()]
    assert found["dns_query"].evidence["vm"] == "vm-c" and found["dns_query"].evidence["query"] == "beacon.sva-c2.example"
    assert found["tls_sni"].evidence["vm"] == "vm-a" and found["tls_sni"].evidence["server_name"] == "ioc-test.sva.invalid"
    assert found["tls_sni"].evidence["flow"].endswith(f"-> {b.ip}:443")


def test_malformed_truncated_fragmented_and_vlan_frames_are_counted(bridge_lab: Any, shared: dict[str, Any]) -> None:
    lab = bridge_lab
    b = lab.vms["b"]
    with watching(lab, shared) as w:
        sendp(lab, "a", (
            f"[Ether(dst='{b.mac}')/IP(dst='{b.ip}', ihl=2)/UDP(), "
            f"Ether(dst='{b.mac}')/IP(dst='{b.ip}', len=9000)/TCP(dataofs=15), "
            f"Ether(dst='{b.mac}')/IP(dst='{b.ip}', proto=6)/Raw(b'\\x00' * 4), "
            f"Ether(dst='{b.mac}')/Dot1Q(vlan=5)/IP(dst='{b.ip}')/UDP(dport=53)/DNS(qd=DNSQR(qname='v.example'))]"
            f" + fragment(Ether(dst='{b.mac}')/IP(dst='{b.ip}')/UDP(dport=7)/Raw(b'f'*3000), fragsize=1000)"
        ))  # fmt: skip
    c = w.summary.counters
    assert c.malformed >= 3 and c.vlan_tagged >= 1 and c.fragments >= 3, c
    assert all(d.status == "ok" for r in w.reports for d in r.detectors)
