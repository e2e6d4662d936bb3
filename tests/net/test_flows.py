"""The flow table and the fast path's dispatch, on frames built with scapy."""

from __future__ import annotations

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from sva.net.fastpath import FastPath
from sva.net.flows import FlowTable
from sva.net.parse import Headers, parse_frame

A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def tcp(sport: int, dport: int, flags: str, data: bytes = b"", src: str = "10.0.0.1", dst: str = "10.0.0.2", mac: str = A) -> bytes:
    return bytes(Ether(src=mac, dst=B) / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / Raw(data))


def h(frame: bytes, ts: float, port: str = "p1") -> Headers:
    return parse_frame(frame, ts, 0, port)


def test_tcp_conversation_counts_and_head() -> None:
    t = FlowTable(head_bytes=10)
    t.update(h(tcp(1000, 80, "S"), 1.0))
    t.update(h(tcp(80, 1000, "SA", src="10.0.0.2", dst="10.0.0.1", mac=B), 1.1))
    t.update(h(tcp(1000, 80, "PA", b"GET /abc HTTP/1.1\r\n"), 1.2))
    # Ethernet padding of a short frame must not end up in the payload head.
    t.update(h(tcp(1000, 80, "FA") + b"\0" * 6, 1.3))
    t.update(h(tcp(80, 1000, "R", src="10.0.0.2", dst="10.0.0.1", mac=B), 1.4))
    assert len(t) == 2
    fwd = t.get(("p1", bytes.fromhex("02000000000a"), 4, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 6, 1000, 80))
    back = t.get(("p1", bytes.fromhex("02000000000b"), 4, bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1]), 6, 80, 1000))
    assert fwd is not None and back is not None
    assert (fwd.packets, fwd.syn, fwd.synack, fwd.fin, fwd.rst, fwd.first, fwd.last) == (3, 1, 0, 1, 0, 1.0, 1.3)
    assert (back.packets, back.syn, back.synack, back.rst) == (2, 0, 1, 1)
    assert fwd.flags_or == 0x02 | 0x18 | 0x11
    assert bytes(fwd.head) == b"GET /abc H"
    assert back.head == bytearray()
    assert fwd.bytes == len(tcp(1000, 80, "S")) + len(tcp(1000, 80, "PA", b"GET /abc HTTP/1.1\r\n")) + len(tcp(1000, 80, "FA")) + 6
    assert fwd.five_tuple == (bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 6, 1000, 80)


def test_non_ip_is_not_a_flow() -> None:
    t = FlowTable()
    assert t.update(h(bytes(Ether(src=A) / ARP(psrc="10.0.0.1")), 1.0)) is None
    assert len(t) == 0


def test_lru_eviction_is_bounded_and_counted() -> None:
    t = FlowTable(max_flows=100)
    for i in range(100):
        t.update(h(tcp(10000 + i, 80, "S"), float(i)))
    t.update(h(tcp(10000, 80, "A"), 200.0))  # flow 0 is now the most recently seen
    for i in range(50):
        t.update(h(tcp(20000 + i, 80, "S"), 300.0 + i))
    assert len(t) == 100
    assert t.evicted == 50
    ports = {f.key[6] for f in t.flows()}
    assert 10000 in ports  # refreshed, kept
    assert not any(10001 <= p <= 10050 for p in ports)  # least recently seen, evicted
    assert all(10051 <= p < 10100 or p == 10000 or p >= 20000 for p in ports)


def test_expire_removes_idle_flows_only() -> None:
    t = FlowTable(idle_timeout=10.0)
    t.update(h(tcp(1, 80, "S"), 100.0))
    t.update(h(tcp(2, 80, "S"), 105.0))
    t.update(h(tcp(3, 80, "S"), 112.0))
    gone = t.expire(116.0)
    assert [f.key[6] for f in gone] == [1, 2]
    assert [f.key[6] for f in t.flows()] == [3]
    assert t.expire(116.0) == []


def test_dispatch_to_deep_path() -> None:
    frames = {
        "arp": bytes(Ether(src=A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1", pdst="10.0.0.2")),
        "dns": bytes(Ether(src=A) / IP() / UDP(sport=3333, dport=53) / DNS(qd=DNSQR(qname="x.org"))),
        "dns_tcp": tcp(4444, 53, "PA", b"\x00\x10"),
        "dhcp": bytes(Ether(src=A) / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) / BOOTP() / DHCP(options=[("message-type", "discover"), "end"])),
        "tls_443": tcp(5555, 443, "PA", b"\x16\x03\x01\x00\x10hello"),
        "tls_other_port": tcp(5556, 8443, "PA", b"\x16\x03\x03\x00\x10hello"),
        "http": tcp(5557, 8080, "PA", b"POST /x HTTP/1.1\r\n"),
        "icmp": bytes(Ether(src=A) / IP() / ICMP()),
    }
    skipped = {
        "tcp_plain": tcp(6000, 9000, "PA", b"just bytes"),
        "syn_443": tcp(6001, 443, "S"),  # no payload: nothing for a TLS decoder
        "udp_plain": bytes(Ether(src=A) / IP() / UDP(sport=1, dport=9999) / Raw(b"x")),
        "malformed": tcp(6002, 80, "PA", b"GET ")[:40],
    }
    seen: list[Headers] = []
    fp = FastPath(deep=seen.append)
    batch = [(float(i), f, len(f), "p") for i, f in enumerate([*frames.values(), *skipped.values()])]
    fp.process(batch)
    assert [x.frame for x in seen] == list(frames.values())
    assert fp.packets == len(batch)
    assert fp.non_ip == 1 and fp.malformed == 1
    assert fp.deep_calls == len(frames)


def test_deep_path_errors_are_counted_not_raised() -> None:
    def broken(h: Headers) -> None:
        raise ValueError("decoder bug")

    fp = FastPath(deep=broken)
    f = bytes(Ether(src=A) / IP() / ICMP())
    fp.process([(0.0, f, len(f), "p"), (1.0, f, len(f), "p")])
    assert fp.deep_errors == 2 and fp.last_deep_error == "ValueError: decoder bug"
    assert fp.table.flows() and next(iter(fp.table.flows())).packets == 2


def test_inline_fast_path_equals_flow_table_update() -> None:
    """FastPath writes the flow update out inline for speed; it must build the same table as FlowTable.update."""
    import random

    from scapy.layers.l2 import Dot1Q

    rnd = random.Random(3)
    frames: list[bytes] = []
    for i in range(400):
        sport, dport = rnd.choice((1000, 1001, 1002)), rnd.choice((80, 443))
        flags = rnd.choice(("S", "SA", "A", "PA", "FA", "R"))
        data = bytes([i % 256]) * rnd.choice((0, 0, 10, 700, 1400))
        f = tcp(sport, dport, flags, data, mac=rnd.choice((A, B)))
        if i % 7 == 0:
            f = bytes(Ether(src=A, dst=B) / Dot1Q(vlan=5) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=sport, dport=53) / Raw(data))
        frames.append(f + b"\0" * rnd.choice((0, 6)))
    batch = [(float(i), f, len(f), rnd.choice(("p1", "p2"))) for i, f in enumerate(frames)]

    class Subclassed(FlowTable):
        pass

    fast = FastPath(deep=lambda h: None, table=FlowTable(max_flows=20, head_bytes=900))
    generic = FastPath(deep=lambda h: None, table=Subclassed(max_flows=20, head_bytes=900))
    fast.process(batch)
    generic.process(batch)
    assert fast.counters() == generic.counters()
    assert [(f.key, f.packets, f.bytes, f.flags_or, f.syn, f.synack, f.rst, f.fin, bytes(f.head), f.first, f.last) for f in fast.table.flows()] == [
        (f.key, f.packets, f.bytes, f.flags_or, f.syn, f.synack, f.rst, f.fin, bytes(f.head), f.first, f.last) for f in generic.table.flows()
    ]
    assert fast.table.evicted == generic.table.evicted > 0
    assert fast.deep_calls == generic.deep_calls > 0
