"""The header parser against scapy's own dissection of the same frames, and against hostile bytes."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (

    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Padding, Raw

from sva.net.fastpath import FastPath
from sva.net.parse import Headers, parse_frame

A_MAC, B_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def _frames() -> dict[str, Packet]:
    e = Ether(src=A_MAC, dst=B_MAC)
    big = b"x" * 3000
    frags = fragment(e / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5000, dport=6000) / Raw(big), fragsize=1000)
    frag6 = e / IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrFragment(id=7, m=1, offset=0) / UDP(sport=1, dport=2) / Raw(b"a" * 40)
    frag6_later = e / IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrFragment(id=7, m=0, offset=6, nh=17) / Raw(b"b" * 40)
    return {
        "tcp_syn": e / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=22, flags="S", options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)]),
        "tcp_http": e / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40001, dport=80, flags="PA") / Raw(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        "tcp_ack_padded": e / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=80, dport=40001, flags="A"),  # 54 bytes, padded to 60 below
        "ipv4_options": e / IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x94\x04\x00\x00") / TCP(sport=1, dport=2, flags="R"),
        "udp_dns": e / IP(src="10.0.0.1", dst="10.0.0.53") / UDP(sport=33333, dport=53) / DNS(qd=DNSQR(qname="example.org")),
        "icmp_echo": e / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, code=0, id=1, seq=2) / Raw(b"ping"),
        "icmp_unreach": e / IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(type=3, code=3) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=9),
        "arp_request": Ether(src=A_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=A_MAC, psrc="10.0.0.1", pdst="10.0.0.2"),
        "arp_reply": e / ARP(op=2, hwsrc=A_MAC, psrc="10.0.0.254", hwdst=B_MAC, pdst="10.0.0.2"),
        "vlan_udp": e / Dot1Q(vlan=100, prio=3) / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=67, dport=68) / Raw(b"d" * 20),
        "qinq_tcp": e / Dot1AD(vlan=200) / Dot1Q(vlan=300) / IP(src="10.2.0.1", dst="10.2.0.2") / TCP(sport=5, dport=443, flags="PA") / Raw(b"\x16\x03\x01\x00\x05hello"),
        "qinq_8100": e / Dot1Q(vlan=11) / Dot1Q(vlan=12) / IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=7, dport=8) / Raw(b"q"),
        "ipv4_frag_first": frags[0],
        "ipv4_frag_middle": frags[1],
        "ipv4_frag_last": frags[-1],
        "ipv6_tcp": e / IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=1234, dport=80, flags="SA"),
        "ipv6_ext_chain": e / IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=["fd00::9"]) / IPv6ExtHdrDestOpt() / UDP(sport=9, dport=53) / Raw(b"z" * 10),
        "ipv6_ah": e / IPv6(src="fd00::1", dst="fd00::2") / AH(nh=6, payloadlen=4, spi=1, seq=1, icv=b"\0" * 12) / TCP(sport=3, dport=4, flags="F"),
        "ipv6_frag_first": frag6,
        "ipv6_frag_later": frag6_later,
        "icmpv6_echo": e / IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=5, seq=6, data=b"hi"),
        "icmpv6_ns": e / IPv6(src="fd00::1", dst="ff02::1:ff00:2") / ICMPv6ND_NS(tgt="fd00::2"),
        "lldp_non_ip": Ether(src=A_MAC, dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(b"\x02\x07\x04" + b"\0" * 40),
    }


FRAMES = _frames()


def _layers(p: Packet) -> list[Packet]:
    out = []
    while p is not None and not isinstance(p, Raw | Padding) and p.name != "NoPayload":
        out.append(p)
        p = p.payload if p.payload else None  # type: ignore[assignment]
    return out


def scapy_view(frame: bytes) -> dict[str, object]:
    """What scapy's full dissection says about the fields parse_frame reports."""
    pkt = Ether(frame)
    layers = _layers(pkt)
    view: dict[str, object] = {
        "src_mac": bytes.fromhex(pkt.src.replace(":", "")),
        "dst_mac": bytes.fromhex(pkt.dst.replace(":", "")),
        "vlan": -1, "ethertype": pkt.type, "ip_version": 0, "src_ip": b"", "dst_ip": b"",
        "proto": 0, "sport": 0, "dport": 0, "tcp_flags": 0, "fragment": False, "payload_bytes": b"",
    }  # fmt: skip
    for lay in layers:
        if isinstance(lay, Dot1Q):  # Dot1AD is a Dot1Q too
            if view["vlan"] == -1:
                view["vlan"] = lay.vlan
            view["ethertype"] = lay.type
    l3 = next((lay for lay in layers if isinstance(lay, IP | IPv6 | ARP)), None)
    l4: Packet | None = None
    if isinstance(l3, ARP):
        view["src_ip"] = socket.inet_aton(l3.psrc)
        view["dst_ip"] = socket.inet_aton(l3.pdst)
        return view
    if isinstance(l3, IP):
        view.update(ip_version=4, src_ip=socket.inet_aton(l3.src), dst_ip=socket.inet_aton(l3.dst), proto=l3.proto)
        view["fragment"] = bool(l3.flags.MF) or l3.frag != 0
        if l3.frag == 0:
            l4 = l3.payload
    elif isinstance(l3, IPv6):
        view.update(ip_version=6, src_ip=socket.inet_pton(socket.AF_INET6, l3.src), dst_ip=socket.inet_pton(socket.AF_INET6, l3.dst))
        nh, cur = l3.nh, l3.payload
        while isinstance(cur, IPv6ExtHdrHopByHop | IPv6ExtHdrRouting | IPv6ExtHdrDestOpt | IPv6ExtHdrFragment | AH):
            nh = cur.nh
            if isinstance(cur, IPv6ExtHdrFragment):
                view["fragment"] = True
                if cur.offset != 0:
                    cur = None
                    break
            cur = cur.payload
        view["proto"] = nh
        l4 = cur
    if isinstance(l4, Raw) and view["proto"] in (6, 17):
        # scapy stops at AH (it binds no transport header after it): dissect the rest as the header AH names.
        l4 = (TCP if view["proto"] == 6 else UDP)(l4.load)
    if l4 is None or isinstance(l4, Raw | Padding) or not l4:
        return view
    if isinstance(l4, TCP | UDP):
        view["sport"], view["dport"] = l4.sport, l4.dport
        if isinstance(l4, TCP):
            view["tcp_flags"] = int(l4.flags)
    else:  # ICMP / ICMPv6: type and code
        view["sport"], view["dport"] = l4.type, l4.code
    # The bytes scapy dissected, not a rebuild: once scapy's TLS layer is loaded (the deep
    # decoder loads it), a re-built TLS record can differ from the bytes on the wire.
    body = getattr(l4.payload, "original", None) or bytes(l4.payload)
    pad = l4.getlayer(Padding)
    if pad is not None:
        body = body[: len(body) - len(pad.load)]
    if isinstance(l4, ICMP | ICMPv6EchoRequest | ICMPv6ND_NS):
        # parse_frame's ICMP payload starts right after type/code/checksum (the rest of the
        # header is message-specific); scapy keeps id/seq or the target in the header.
        body = bytes(l4)[4 : len(bytes(l4)) - (len(pad.load) if pad is not None else 0)]
    view["payload_bytes"] = body
    return view


def parser_view(h: Headers) -> dict[str, object]:
    fields = ("src_mac", "dst_mac", "vlan", "ethertype", "ip_version", "src_ip", "dst_ip", "proto", "sport", "dport", "tcp_flags", "fragment")
    view: dict[str, object] = {f: getattr(h, f) for f in fields}
    view["payload_bytes"] = h.frame[h.payload : h.payload_end] if h.payload >= 0 else b""
    return view


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_fields_match_scapy(name: str) -> None:
    frame = bytes(FRAMES[name])
    if len(frame) < 60:
        frame += b"\0" * (60 - len(frame))  # Ethernet minimum: the padding must not count as payload
    h = parse_frame(frame, 12.5, 0, "port1")
    assert h.malformed == "", h.malformed
    assert (h.ts, h.port, h.wirelen, h.frame) == (12.5, "port1", len(frame), frame)
    assert parser_view(h) == scapy_view(frame)


def test_specific_values() -> None:
    """A few facts stated directly, so the comparison above cannot pass by both sides being wrong."""
    h = parse_frame(bytes(FRAMES["qinq_tcp"]))
    assert (h.vlan, h.ethertype, h.proto, h.dport, h.tcp_flags) == (200, 0x0800, 6, 443, 0x18)
    assert h.frame[h.payload : h.payload_end] == b"\x16\x03\x01\x00\x05hello"
    h = parse_frame(bytes(FRAMES["arp_reply"]))
    assert (h.ip_version, h.src_ip, h.dst_ip, h.src_mac) == (0, bytes([10, 0, 0, 254]), bytes([10, 0, 0, 2]), bytes.fromhex("02000000000a"))
    h = parse_frame(bytes(FRAMES["ipv4_frag_middle"]))
    assert (h.fragment, h.proto, h.sport, h.payload) == (True, 17, 0, -1)
    h = parse_frame(bytes(FRAMES["ipv6_ext_chain"]))
    assert (h.ip_version, h.proto, h.sport, h.dport) == (6, 17, 9, 53)
    h = parse_frame(bytes(FRAMES["tcp_syn"]))
    assert h.payload == -1 and h.tcp_flags == 0x02


def _ipv4_tcp() -> bytearray:
    return bytearray(bytes(Ether(src=A_MAC, dst=B_MAC) / IP(src="1.2.3.4", dst="5.6.7.8") / TCP(sport=1, dport=2) / Raw(b"data")))


def test_absurd_header_lengths_are_flagged() -> None:
    f = _ipv4_tcp()
    f[14] = 0x43  # ihl 3
    assert parse_frame(bytes(f)).malformed == "ihl < 5"
    f = _ipv4_tcp()
    f[14] = 0x4F  # ihl 15: 60 bytes of header, past the frame's end
    assert parse_frame(bytes(f)).malformed in ("truncated ipv4 options", "truncated tcp header")
    f = _ipv4_tcp()
    struct.pack_into("!H", f, 16, 9000)  # total length beyond the frame
    assert parse_frame(bytes(f)).malformed == "ipv4 total length beyond frame"
    # …but not when the capture's snap length cut the frame: the wire length says so.
    assert parse_frame(bytes(f), wirelen=9014).malformed == ""
    f = _ipv4_tcp()
    struct.pack_into("!H", f, 16, 10)
    assert parse_frame(bytes(f)).malformed == "ipv4 total length < header length"
    f = _ipv4_tcp()
    f[14 + 20 + 12] = 0x30  # TCP data offset 3
    assert parse_frame(bytes(f)).malformed == "tcp data offset < 5"
    f = _ipv4_tcp()
    f[14 + 20 + 12] = 0xF0  # TCP data offset 15: options past the end
    assert parse_frame(bytes(f)).malformed == "truncated tcp options"
    u = bytearray(bytes(Ether() / IP() / UDP(sport=1, dport=2) / Raw(b"abc")))
    struct.pack_into("!H", u, 14 + 20 + 4, 4)
    assert parse_frame(bytes(u)).malformed == "udp length < 8"
    struct.pack_into("!H", u, 14 + 20 + 4, 400)
    assert parse_frame(bytes(u)).malformed == "udp length beyond ip payload"
    vlans = bytes(Ether() / Dot1Q(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / Dot1Q(vlan=4) / Dot1Q(vlan=5) / IP() / UDP())
    assert parse_frame(vlans).malformed == "too many vlan tags"
    chain = IPv6()
    for _ in range(9):
        chain = chain / IPv6ExtHdrDestOpt()
    assert parse_frame(bytes(Ether() / chain / UDP())).malformed == "too many ipv6 extension headers"
    ext = bytearray(bytes(Ether() / IPv6() / IPv6ExtHdrDestOpt() / UDP()))
    ext[14 + 40 + 1] = 200  # extension header length far past the payload
    assert parse_frame(bytes(ext)).malformed == "truncated ipv6 extension header"
    assert parse_frame(b"").malformed == "truncated ethernet header"
    assert parse_frame(bytes(Ether(type=0x0800))).malformed == "truncated ipv4 header"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    h = parse_frame(data, 1.0, 0, "x")
    assert isinstance(h, Headers) and h.frame == data
    assert h.payload == -1 or 0 <= h.payload < h.payload_end <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(FRAMES)), st.data())
def test_truncated_valid_frames_are_flagged(name: str, data: st.DataObject) -> None:
    frame = bytes(FRAMES[name])
    cut = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    h = parse_frame(frame[:cut])
    full = parse_frame(frame)
    assert full.malformed == ""
    if h.malformed == "":
        # Only frames without length fields to contradict (ARP's tail, non-IP, IPv6 jumbo-less
        # bodies of unknown protocols) may be cut without notice, and then the headers agree.
        assert (h.ethertype, h.src_ip, h.dst_ip, h.proto) == (full.ethertype, full.src_ip, full.dst_ip, full.proto)
        assert h.ethertype not in (0x0800, 0x86DD) or cut >= len(frame), f"cut at {cut} not flagged"
    # A cut that the capture reports (wire length kept) is not malformed when the headers are all there.
    snapped = parse_frame(frame[:cut], wirelen=len(frame))
    assert isinstance(snapped, Headers)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=50), st.lists(st.sampled_from(sorted(FRAMES)), max_size=20))
def test_fastpath_counts_malformed(junk: list[bytes], good: list[str]) -> None:
    frames = [bytes(FRAMES[n]) for n in good] + junk
    calls: list[Headers] = []
    fp = FastPath(deep=calls.append)
    fp.process([(float(i), f, len(f), "p") for i, f in enumerate(frames)])
    expected = sum(1 for f in frames if parse_frame(f).malformed)
    assert fp.packets == len(frames)
    assert fp.malformed == expected == sum(fp.malformed_reasons.values())


@settings(max_examples=400, deadline=None)
@given(
    proto=st.sampled_from([6, 17]),
    total=st.integers(0, 200),
    frag=st.one_of(st.sampled_from([0, 0x4000, 0x2000, 0x6000, 0x2001, 0x0001, 0x8000]), st.integers(0, 0xFFFF)),  # DF, MF, offsets
    word=st.one_of(st.integers(0, 200), st.integers(0, 0xFFFF)),  # TCP data offset/flags, or UDP length
    body=st.binary(min_size=40, max_size=160),
    wire_extra=st.sampled_from([0, 0, 100]),
)
@example(proto=6, total=80, frag=0x2000, word=0x5018, body=bytes(60), wire_extra=0)  # first fragment
@example(proto=6, total=80, frag=0x4000, word=0x8018, body=bytes(60), wire_extra=0)  # DF, TCP options
@example(proto=6, total=80, frag=0x0000, word=0x5002, body=bytes(60), wire_extra=0)  # SYN
@example(proto=6, total=200, frag=0x0000, word=0x5010, body=bytes(60), wire_extra=100)  # snapped
@example(proto=17, total=68, frag=0x0000, word=48, body=bytes(48), wire_extra=0)
@example(proto=17, total=68, frag=0x0000, word=40, body=bytes(48), wire_extra=0)  # UDP shorter than IP
@example(proto=17, total=68, frag=0x2000, word=48, body=bytes(48), wire_extra=0)
def test_ipv4_shortcut_agrees_with_general_walk(proto: int, total: int, frag: int, word: int, body: bytes, wire_extra: int) -> None:
    """parse_frame reads untagged option-less IPv4 TCP/UDP in one struct call; the same frame with a
    VLAN tag goes through the general walk. Both must report the same (offsets moved by the tag)."""
    ip = bytearray(b"\x45\x00" + struct.pack("!H", total) + b"\x00\x01" + struct.pack("!H", frag) + bytes([64, proto]) + b"\0\0" + bytes([10, 0, 0, 1, 10, 0, 0, 2]))
    l4 = bytearray(body)
    if proto == 6:
        struct.pack_into("!H", l4, 12, word)
    else:
        struct.pack_into("!H", l4, 4, word)
    eth = bytes.fromhex("02000000000b02000000000a")
    plain = eth + b"\x08\x00" + bytes(ip) + bytes(l4)
    tagged = eth + b"\x81\x00\x00\x07\x08\x00" + bytes(ip) + bytes(l4)
    a = parse_frame(plain, 1.0, len(plain) + wire_extra, "p")
    b = parse_frame(tagged, 1.0, len(tagged) + wire_extra, "p")
    shift = lambda x: x + 4 if x >= 0 else x  # noqa: E731
    assert b.vlan == 7 and a.vlan == -1
    assert a._replace(vlan=7, frame=tagged, wirelen=b.wirelen, payload=shift(a.payload), payload_end=shift(a.payload_end)) == b
