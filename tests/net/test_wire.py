"""The own DNS and ARP parsers against scapy, the reference they replace on the hot path:
on messages scapy builds (with its name compression), on every truncation of them and on
random bytes, the deep path's answer is scapy's answer."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR, DNSRRMX
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether

from sva.net.deep import DeepDecoder
from sva.net.wire import DnsSummary, parse_arp, parse_dns

# Labels of letters, and of any bytes but the dot, NUL and those scapy's encoder takes
# for an already-encoded name (a pointer's first byte).
_LABEL = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-_", min_size=1, max_size=20).map(str.encode),
    st.binary(min_size=1, max_size=12).map(lambda b: bytes(c if 0 < c < 0xC0 and c != 0x2E else 0x78 for c in b)),
)
_NAME = st.lists(_LABEL, min_size=1, max_size=4).map(b".".join)
_IP4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
_IP6 = st.binary(min_size=16, max_size=16).map(lambda b: socket.inet_ntop(socket.AF_INET6, b))


def _rr(draw: Any, owner: str) -> Any:
    kind = draw(st.sampled_from(["A", "AAAA", "CNAME", "NS", "PTR"]))
    if kind == "A":
        return DNSRR(rrname=owner, type="A", rdata=draw(_IP4))
    if kind == "AAAA":
        return DNSRR(rrname=owner, type="AAAA", rdata=draw(_IP6))
    return DNSRR(rrname=owner, type=kind, rdata=draw(_NAME))


@st.composite
def dns_messages(draw: Any) -> tuple[bytes, bool]:
    """A DNS message built by scapy, and whether it holds only record types parse_dns reads."""
    names = draw(st.lists(_NAME, min_size=0, max_size=3))
    response = draw(st.booleans())
    answers = [_rr(draw, draw(st.sampled_from(names)) if names and draw(st.booleans()) else draw(_NAME))
               for _ in range(draw(st.integers(0, 4)))]  # fmt: skip
    plain = True
    if answers and draw(st.integers(0, 5)) == 0:
        answers.append(DNSRRMX(rrname=answers[0].rrname, exchange=draw(_NAME)))
        plain = not response  # a query's answers are not read
    msg = DNS(id=draw(st.integers(0, 65535)), qr=int(response), qd=[DNSQR(qname=n) for n in names],
              an=answers)  # fmt: skip
    return bytes(msg), plain


@pytest.fixture(scope="module")
def decoder() -> DeepDecoder:
    return DeepDecoder(lambda obs: None)


def _scapy_or_error(decoder: DeepDecoder, data: bytes) -> Any:
    try:
        return decoder.scapy_dns(data)
    except Exception as e:  # noqa: BLE001 - scapy's failure is a result to compare, too
        return type(e)


def _ours_or_error(decoder: DeepDecoder, data: bytes) -> Any:
    try:
        return decoder._decode_dns(data)
    except Exception as e:  # noqa: BLE001
        return type(e)


@settings(max_examples=100, deadline=None)
@given(dns_messages())
def test_dns_parser_agrees_with_scapy(decoder: DeepDecoder, msg: tuple[bytes, bool]) -> None:
    data, plain = msg
    ours = parse_dns(data)
    if plain:
        assert ours is not None, "a plain message must not need scapy"
        assert tuple(ours) == decoder.scapy_dns(data)
    for cut in range(12, len(data)):  # every truncation: the deep path says what scapy says
        part = data[:cut]
        got = parse_dns(part)
        if got is not None:
            assert tuple(got) == decoder.scapy_dns(part)
        assert _ours_or_error(decoder, part) == _scapy_or_error(decoder, part)


def test_dns_compression_pointers_and_loops() -> None:
    q = bytes(DNS(qr=1, qd=DNSQR(qname="a.example"), an=DNSRR(rrname="a.example", type="CNAME", rdata="b.a.example")))
    assert parse_dns(q) == DnsSummary(True, ("a.example",), (("a.example", "b.a.example"),))
    header = b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert parse_dns(header + b"\xc0\x0c\x00\x01\x00\x01") is None  # pointer to itself
    assert parse_dns(header + b"\x01a\xc0\x0c\x00\x01\x00\x01") is None  # loop back to its own start
    assert parse_dns(header + b"\xc0\x20\x00\x01\x00\x01" + b"\x00" * 20) is None  # forward pointer
    assert parse_dns(header + b"\x41a\x00\x00\x01\x00\x01") is None  # extended label type
    assert parse_dns(header + b"\x3f" + b"a" * 63) is None  # cut inside a label
    deep = header[:4] + b"\x00\x01" + header[6:] + b"\x01a\x00" + b"\x00\x01\x00\x01"
    assert parse_dns(deep) == DnsSummary(False, ("a",), ())
    assert parse_dns(b"\x00" * 11) is None


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=12, max_size=200), st.integers(0, 3), st.integers(0, 3))
def test_dns_parser_on_random_bytes(decoder: DeepDecoder, tail: bytes, qd: int, an: int) -> None:
    for data in (tail, tail[:2] + b"\x81\x80" + bytes((0, qd, 0, an, 0, 0, 0, 0)) + tail[12:]):
        got = parse_dns(data)
        if got is not None:
            assert len(got.qnames) <= 32 and len(got.answers) <= 32
            assert tuple(got) == decoder.scapy_dns(data)


def _scapy_arp(frame: bytes) -> tuple[int, str, str, str, str]:
    arp = Ether(frame).getlayer(ARP)
    return int(arp.op), str(arp.hwsrc).lower(), str(arp.psrc), str(arp.hwdst).lower(), str(arp.pdst)


_MAC = st.binary(min_size=6, max_size=6).map(lambda b: b.hex(":"))


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 65535), _MAC, _IP4, _MAC, _IP4, st.lists(st.sampled_from(["q", "ad"]), max_size=2), st.binary(max_size=20))
def test_arp_parser_agrees_with_scapy(op: int, sha: str, spa: str, tha: str, tpa: str, tags: list[str], pad: bytes) -> None:
    pkt: Any = Ether(src=sha, dst="ff:ff:ff:ff:ff:ff")
    for t in tags:
        pkt = pkt / (Dot1Q(vlan=5) if t == "q" else Dot1AD(vlan=6))
    frame = bytes(pkt / ARP(op=op, hwsrc=sha, psrc=spa, hwdst=tha, pdst=tpa)) + pad
    assert tuple(parse_arp(frame)) == _scapy_arp(frame)
    for cut in range(len(frame) - len(pad) - 1, 10, -7):  # cut short: an error, never a wrong body
        with pytest.raises(ValueError):
            parse_arp(frame[:cut])


def test_arp_parser_refuses_other_hardware_and_protocols() -> None:
    for arp in (ARP(hwlen=8, plen=4), ARP(hwtype=6), ARP(ptype=0x86DD, plen=16, psrc="::1", pdst="::2")):
        with pytest.raises(ValueError, match="not Ethernet/IPv4"):
            parse_arp(bytes(Ether() / arp))
    with pytest.raises(ValueError, match="no ARP layer"):
        parse_arp(bytes(Ether(type=0x0800)) + bytes(28))
