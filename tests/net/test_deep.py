"""The deep path: scapy decodes ARP, DNS, DHCP, TLS SNI and HTTP Host from real frames,
and hostile bytes are counted, never raised."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.tls.extensions import ServerName, TLS_Ext_ServerName
from scapy.layers.tls.handshake import TLSClientHello
from scapy.layers.tls.record import TLS
from scapy.packet import Raw

from sva.net.deep import DeepDecoder, client_hello_server_names
from sva.net.model import ArpObservation, DhcpLease, DnsObservation, NameObservation
from sva.net.parse import parse_frame

A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


@pytest.fixture(scope="module")
def decoder() -> Any:
    seen: list[Any] = []
    d = DeepDecoder(seen.append)
    d.seen = seen  # type: ignore[attr-defined]
    return d


def decode(decoder: Any, pkt: Any, port: str = "p1") -> list[Any]:
    decoder.seen.clear()
    decoder(parse_frame(bytes(pkt), 12.5, len(bytes(pkt)), port))
    return list(decoder.seen)


def eth(src: str = A, dst: str = B) -> Any:
    return Ether(src=src, dst=dst)


def test_arp_reply_and_vlan_tagged_gratuitous_arp(decoder: Any) -> None:
    (a,) = decode(decoder, eth() / ARP(op=2, hwsrc=A, psrc="10.0.0.1", hwdst=B, pdst="10.0.0.2"))
    assert a == ArpObservation(12.5, "p1", A, B, 2, A, "10.0.0.1", B, "10.0.0.2")
    assert not a.gratuitous
    (g,) = decode(decoder, eth(dst="ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=7) / Dot1Q(vlan=8)
                  / ARP(op=1, hwsrc=A, psrc="10.0.0.1", hwdst="00:00:00:00:00:00", pdst="10.0.0.1"))  # fmt: skip
    assert g.gratuitous and g.sender_mac == A and g.op == 1


def test_dns_query_response_and_dns_over_tcp(decoder: Any) -> None:
    q = eth() / IP(src="10.0.0.1", dst="10.0.0.53") / UDP(sport=3333, dport=53) / DNS(rd=1, qd=DNSQR(qname="WWW.Example.COM."))
    (d,) = decode(decoder, q)
    assert isinstance(d, DnsObservation) and not d.response and d.qnames == ("www.example.com",)
    assert (d.src_ip, d.dst_ip, d.sport, d.dport, d.src_mac) == ("10.0.0.1", "10.0.0.53", 3333, 53, A)
    r = eth(B, A) / IP(src="10.0.0.53", dst="10.0.0.1") / UDP(sport=53, dport=3333) / DNS(
        qr=1, qd=DNSQR(qname="c.example"),
        an=[DNSRR(rrname="c.example", type="CNAME", rdata="evil.example"), DNSRR(rrname="evil.example", rdata="192.0.2.7")],
    )  # fmt: skip
    (d,) = decode(decoder, r)
    assert d.response and ("evil.example", "192.0.2.7") in d.answers and ("c.example", "evil.example") in d.answers
    msg = bytes(DNS(rd=1, qd=DNSQR(qname="tcp.example")))
    t = eth() / IP(src="10.0.0.1", dst="10.0.0.53") / TCP(sport=4444, dport=53, flags="PA") / Raw(len(msg).to_bytes(2, "big") + msg)
    (d,) = decode(decoder, t)
    assert d.qnames == ("tcp.example",)


def test_dhcp_ack_only(decoder: Any) -> None:
    def dhcp(kind: str) -> Any:
        return (eth("02:00:00:00:00:01", A) / IP(src="10.0.0.1", dst="255.255.255.255") / UDP(sport=67, dport=68)
                / BOOTP(op=2, yiaddr="10.0.0.77", chaddr=bytes.fromhex("02000000000a") + bytes(10))
                / DHCP(options=[("message-type", kind), ("server_id", "10.0.0.1"), "end"]))  # fmt: skip

    (lease,) = decode(decoder, dhcp("ack"))
    assert lease == DhcpLease(12.5, "p1", A, "10.0.0.77", "10.0.0.1")
    assert decode(decoder, dhcp("offer")) == []


def test_tls_client_hello_sni_and_http_host(decoder: Any) -> None:
    hello = TLS(msg=[TLSClientHello(ext=[TLS_Ext_ServerName(servernames=[ServerName(servername=b"Secret.Example")])])])
    (n,) = decode(decoder, eth() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=5555, dport=8443, flags="PA") / Raw(bytes(hello)))
    assert isinstance(n, NameObservation) and (n.kind, n.name, n.dport) == ("tls_sni", "secret.example", 8443)
    req = b"POST /x HTTP/1.1\r\nUser-Agent: t\r\nhOsT:  Web.Example:8080 \r\n\r\nbody"
    (n,) = decode(decoder, eth() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=5556, dport=80, flags="PA") / Raw(req))
    assert (n.kind, n.name) == ("http_host", "web.example")
    req6 = b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n"
    (n,) = decode(decoder, eth() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=5557, dport=80, flags="PA") / Raw(req6))
    assert n.name == "2001:db8::1"


def test_broken_messages_are_counted_not_raised(decoder: Any) -> None:
    before = decoder.errors
    bad = [
        eth() / IP(src="10.0.0.1", dst="10.0.0.53") / UDP(sport=1, dport=53) / Raw(b"\x00" * 5),  # shorter than a header
        eth() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=443, flags="PA") / Raw(b"\x16\x03\x01\xff\xff\x01"),
        eth() / ARP(op=2, hwlen=8, plen=4),
    ]
    for pkt in bad:
        assert decode(decoder, pkt) == []
    assert decoder.errors >= before + 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([53, 67, 80, 443]))
def test_random_payloads_never_raise(payload: bytes, port: int) -> None:
    seen: list[Any] = []
    d = DeepDecoder(seen.append)
    for l4 in (UDP(sport=68 if port == 67 else 1234, dport=port), TCP(sport=1234, dport=port, flags="PA")):
        frame = bytes(Ether(src=A, dst=B) / IP(src="10.0.0.1", dst="10.0.0.2") / l4 / Raw(payload))
        d(parse_frame(frame, 0.0, len(frame), ""))
        d(parse_frame(frame[: len(frame) // 2], 0.0, len(frame), ""))
    arp = bytes(Ether(src=A, dst=B, type=0x0806)) + payload
    d(parse_frame(arp, 0.0, len(arp), ""))
    assert d.decoded + d.errors >= 0


_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(_LABEL, min_size=1, max_size=5).map(".".join),
    st.binary(max_size=32),
    st.integers(min_value=0, max_value=40),
    st.booleans(),
)
def test_sni_parser_agrees_with_scapy(name: str, session_id: bytes, n_ciphers: int, more_ext: bool) -> None:
    """Our ClientHello walk against scapy's TLS layer on ClientHellos scapy builds."""
    from scapy.layers.tls.extensions import TLS_Ext_SupportedGroups

    exts: list[Any] = [TLS_Ext_SupportedGroups(groups=[29, 23])] if more_ext else []
    exts.append(TLS_Ext_ServerName(servernames=[ServerName(servername=name.encode())]))
    hello = bytes(TLS(msg=[TLSClientHello(sid=session_id, ciphers=list(range(1, n_ciphers + 1)), ext=exts)]))
    theirs = [sn.servername for m in TLS(hello).msg for e in (m.ext or []) for sn in getattr(e, "servernames", [])]
    assert client_hello_server_names(hello) == theirs == [name.encode()]
    for cut in range(len(hello)):  # every truncation: no exception, never a wrong name
        assert client_hello_server_names(hello[:cut]) in ([], [name.encode()])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_sni_parser_on_random_bytes(tail: bytes) -> None:
    for data in (tail, b"\x16\x03\x01" + tail, b"\x16\x03\x01\x01\x00\x01" + tail):
        names = client_hello_server_names(data)
        assert len(names) <= 8 and all(len(n) <= len(data) for n in names)
