"""The cheap per-packet header parse: Ethernet, VLAN, ARP, IPv4, IPv6, TCP, UDP, ICMP.

Every captured frame goes through `parse_frame`, so it is written for speed: plain byte
indexing and precompiled `struct.Struct`s, no scapy, one tuple per frame. It never raises
on any input; a frame whose headers do not hold together comes back with `malformed` set
to a short reason and the fields it could read so far.

A frame cut short by the capture's snap length (wirelen > len(frame)) is not malformed
because its IP length field points past the captured bytes; headers missing entirely are
reported as truncated either way, since nothing can be read from them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple


class Headers(NamedTuple):
    ts: float
    port: str
    wirelen: int
    src_mac: bytes
    dst_mac: bytes
    vlan: int  # outermost VLAN id, -1 if untagged
    ethertype: int  # after VLAN tags
    ip_version: int  # 4, 6, or 0 if not IP
    src_ip: bytes  # ARP: sender protocol address
    dst_ip: bytes  # ARP: target protocol address
    proto: int
    sport: int  # ICMP: type
    dport: int  # ICMP: code
    tcp_flags: int
    payload: int  # offset of the L4 payload in frame, -1 if none (or empty)
    fragment: bool
    malformed: str
    frame: bytes
    payload_end: int = -1  # end of the L4 payload (IP/UDP length, Ethernet padding excluded)


ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100))
MAX_VLAN_TAGS = 4  # QinQ is two; more than four is not a real frame
MAX_IPV6_EXT = 8  # extension header chain bound: hostile chains end here

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

# IPv6 extension headers walked to find the transport header (44 fragment and 51 AH handled apart).
_IPV6_EXT = frozenset((0, 43, 60, 135, 139, 140))

_IP4 = struct.Struct("!BxHxxHxB")  # ver/ihl, total length, flags/frag offset, proto
_IP6 = struct.Struct("!HB")  # payload length, next header (from offset 4)
_TCP = struct.Struct("!HH8xBB")  # ports, data offset, flags
_UDP = struct.Struct("!HHH")  # ports, length
_ARP = struct.Struct("!HHBBH")  # htype, ptype, hlen, plen, op

# Ethernet + 20-byte IPv4 + TCP / UDP header in one read: dst, src, (type) total, frag, proto, src, dst, ports, …
_ETH_IP4_TCP = struct.Struct("!6s6s4xHxxHxB2x4s4sHH8xBB")  # … TCP data offset, flags
_ETH_IP4_UDP = struct.Struct("!6s6s4xHxxHxB2x4s4sHHH")  # … UDP length

_new = tuple.__new__  # skips NamedTuple's Python-level __new__: one C call per frame


def _bad(ts: float, port: str, wirelen: int, frame: bytes, reason: str) -> Headers:
    n = len(frame)
    src = frame[6:12] if n >= 12 else b""
    dst = frame[0:6] if n >= 6 else b""
    return _new(Headers, (ts, port, wirelen, src, dst, -1, 0, 0, b"", b"", 0, 0, 0, 0, -1, False, reason, frame, -1))


def parse_frame(
    frame: bytes,
    ts: float = 0.0,
    wirelen: int = 0,
    port: str = "",
    *,
    _ip4: Callable[[bytes, int], tuple[int, int, int, int]] = _IP4.unpack_from,  # bound once: saves lookups per frame
    _tcp: Callable[[bytes, int], tuple[int, int, int, int]] = _TCP.unpack_from,
    _udp: Callable[[bytes, int], tuple[int, int, int]] = _UDP.unpack_from,
    _H: type[Headers] = Headers,
    _e4tcp: Callable[[bytes], tuple[bytes, bytes, int, int, int, bytes, bytes, int, int, int, int]] = _ETH_IP4_TCP.unpack_from,
    _e4udp: Callable[[bytes], tuple[bytes, bytes, int, int, int, bytes, bytes, int, int, int]] = _ETH_IP4_UDP.unpack_from,
) -> Headers:
    """Parse one Ethernet frame's headers. Never raises; `malformed` says what was wrong."""
    n = len(frame)
    if wirelen < n:
        wirelen = n
    # Shortcut for most of the traffic: untagged IPv4 without options carrying TCP or UDP,
    # read with one struct call. It only returns when every check below passes; anything
    # else (options, VLAN, fragments, bad lengths) falls through to the general walk, which
    # is the reference and gives the same fields.
    if n >= 54 and frame[12] == 8 and frame[13] == 0 and frame[14] == 0x45:
        proto = frame[23]
        if proto == 6:
            dmac, smac, total, frag, _p, src, dst, sport, dport, doff, flags = _e4tcp(frame)
            end = 14 + total
            doff = (doff >> 4) * 4
            if not frag & 0x1FFF and 40 <= total and end <= n and doff >= 20 and 34 + doff <= end:
                pl = 34 + doff
                return _new(_H, (ts, port, wirelen, smac, dmac, -1, 0x0800, 4, src, dst, 6, sport, dport, flags, pl if pl < end else -1, (frag & 0x3FFF) != 0, "", frame, end))
        elif proto == 17:
            dmac, smac, total, frag, _p, src, dst, sport, dport, ulen = _e4udp(frame)
            end = 34 + ulen
            if not frag & 0x3FFF and ulen >= 8 and end <= 14 + total <= n:
                return _new(_H, (ts, port, wirelen, smac, dmac, -1, 0x0800, 4, src, dst, 17, sport, dport, 0, 42 if 42 < end else -1, False, "", frame, end))
    if n < 14:
        return _bad(ts, port, wirelen, frame, "truncated ethernet header")
    snapped = wirelen > n
    et = frame[12] << 8 | frame[13]
    off = 14
    vlan = -1
    if et == 0x8100 or et == 0x88A8 or et == 0x9100:
        tags = 0
        while et in VLAN_TPIDS:
            if tags == MAX_VLAN_TAGS:
                return _with(ts, port, wirelen, frame, vlan, et, "too many vlan tags")
            if off + 4 > n:
                return _with(ts, port, wirelen, frame, vlan, et, "truncated vlan tag")
            if vlan < 0:
                vlan = (frame[off] << 8 | frame[off + 1]) & 0x0FFF
            et = frame[off + 2] << 8 | frame[off + 3]
            off += 4
            tags += 1

    if et == 0x0800:
        if off + 20 > n:
            return _with(ts, port, wirelen, frame, vlan, et, "truncated ipv4 header")
        vihl, total, frag, proto = _ip4(frame, off)
        if vihl >> 4 != 4:
            return _with(ts, port, wirelen, frame, vlan, et, "ipv4 version is not 4")
        ihl = (vihl & 15) * 4
        if ihl < 20:
            return _with(ts, port, wirelen, frame, vlan, et, "ihl < 5")
        src = frame[off + 12 : off + 16]
        dst = frame[off + 16 : off + 20]
        if off + ihl > n:
            return _ip(ts, port, wirelen, frame, vlan, et, 4, src, dst, proto, False, "truncated ipv4 options")
        if total < ihl:
            return _ip(ts, port, wirelen, frame, vlan, et, 4, src, dst, proto, False, "ipv4 total length < header length")
        end = off + total
        if end > n:
            if not snapped:
                return _ip(ts, port, wirelen, frame, vlan, et, 4, src, dst, proto, False, "ipv4 total length beyond frame")
            end = n
        fragment = (frag & 0x3FFF) != 0
        if frag & 0x1FFF:
            # A later fragment: its bytes continue an L4 payload, there is no L4 header here.
            return _new(Headers, (ts, port, wirelen, frame[6:12], frame[0:6], vlan, et, 4, src, dst, proto, 0, 0, 0, -1, True, "", frame, -1))
        l4 = off + ihl
        ipv = 4
    elif et == ETH_P_IPV6:
        if off + 40 > n:
            return _with(ts, port, wirelen, frame, vlan, et, "truncated ipv6 header")
        if frame[off] >> 4 != 6:
            return _with(ts, port, wirelen, frame, vlan, et, "ipv6 version is not 6")
        plen, proto = _IP6.unpack_from(frame, off + 4)
        src = frame[off + 8 : off + 24]
        dst = frame[off + 24 : off + 40]
        l4 = off + 40
        end = l4 + plen
        if plen == 0:
            end = n  # jumbogram or empty: the frame's own length is all we have
        elif end > n:
            if not snapped:
                return _ip(ts, port, wirelen, frame, vlan, et, 6, src, dst, proto, False, "ipv6 payload length beyond frame")
            end = n
        fragment = False
        exts = 0
        while proto in _IPV6_EXT or proto == 44 or proto == 51:
            if exts == MAX_IPV6_EXT:
                return _ip(ts, port, wirelen, frame, vlan, et, 6, src, dst, proto, fragment, "too many ipv6 extension headers")
            if l4 + 8 > end:
                return _ip(ts, port, wirelen, frame, vlan, et, 6, src, dst, proto, fragment, "truncated ipv6 extension header")
            nxt = frame[l4]
            if proto == 44:
                fragment = True
                if (frame[l4 + 2] << 8 | frame[l4 + 3]) & 0xFFF8:
                    return _new(Headers, (ts, port, wirelen, frame[6:12], frame[0:6], vlan, et, 6, src, dst, nxt, 0, 0, 0, -1, True, "", frame, -1))
                size = 8
            elif proto == 51:
                size = (frame[l4 + 1] + 2) * 4
            else:
                size = (frame[l4 + 1] + 1) * 8
            l4 += size
            proto = nxt
            exts += 1
        if l4 > end:
            return _ip(ts, port, wirelen, frame, vlan, et, 6, src, dst, proto, fragment, "truncated ipv6 extension header")
        ipv = 6
    elif et == ETH_P_ARP:
        if off + 8 > n:
            return _with(ts, port, wirelen, frame, vlan, et, "truncated arp header")
        _htype, _ptype, hlen, plen, _op = _ARP.unpack_from(frame, off)
        spa = off + 8 + hlen
        tpa = spa + plen + hlen
        if tpa + plen > n:
            return _with(ts, port, wirelen, frame, vlan, et, "truncated arp addresses")
        return _new(
            Headers,
            (ts, port, wirelen, frame[6:12], frame[0:6], vlan, et, 0, frame[spa : spa + plen], frame[tpa : tpa + plen], 0, 0, 0, 0, -1, False, "", frame, -1),
        )
    else:
        return _new(Headers, (ts, port, wirelen, frame[6:12], frame[0:6], vlan, et, 0, b"", b"", 0, 0, 0, 0, -1, False, "", frame, -1))

    # Transport header, bounded by the IP payload's end (Ethernet padding excluded).
    if proto == 6:
        if l4 + 20 > end:
            return _ip(ts, port, wirelen, frame, vlan, et, ipv, src, dst, proto, fragment, "truncated tcp header")
        sport, dport, doff, flags = _tcp(frame, l4)
        doff = (doff >> 4) * 4
        if doff < 20:
            return _new(Headers, (ts, port, wirelen, frame[6:12], frame[0:6], vlan, et, ipv, src, dst, proto, sport, dport, flags, -1, fragment, "tcp data offset < 5", frame, -1))
        pl = l4 + doff
        if pl > end:
            return _new(Headers, (ts, port, wirelen, frame[6:12], frame[0:6], vlan, et, ipv, src, dst, proto, sport, dport, flags, -1, fragment, "truncated tcp options", frame, -1))
        return _new(_H, (ts, port, wirelen, frame[6:12], frame[0:6], vlan, et, ipv, src, dst, proto, sport, dport, flags, pl if pl < end else -1, fragment, "", frame, end))
    if proto == 17:
        if l4 + 8 > end:
            return _ip(ts, port, wirelen, frame, vlan, et, ipv, src, dst, proto, fragment, "truncated udp header")
        sport, dport, ulen = _udp(frame, l4)
        bad = ""
        if fragment:
            pass  # the UDP length covers all fragments; only this first piece is here
        elif ulen < 8:
            bad = "udp length < 8"
        elif l4 + ulen > end:
            if not snapped:
                bad = "udp length beyond ip payload"
        else:
            end = l4 + ulen
        pl = l4 + 8
        return _new(_H, (ts, port, wirelen, frame[6:12], frame[0:6], vlan, et, ipv, src, dst, proto, sport, dport, 0, pl if pl < end else -1, fragment, bad, frame, end))
    if proto == 1 or proto == 58:
        if l4 + 4 > end:
            return _ip(ts, port, wirelen, frame, vlan, et, ipv, src, dst, proto, fragment, "truncated icmp header")
        pl = l4 + 4
        return _new(Headers, (ts, port, wirelen, frame[6:12], frame[0:6], vlan, et, ipv, src, dst, proto, frame[l4], frame[l4 + 1], 0, pl if pl < end else -1, fragment, "", frame, end))
    return _new(Headers, (ts, port, wirelen, frame[6:12], frame[0:6], vlan, et, ipv, src, dst, proto, 0, 0, 0, l4 if l4 < end else -1, fragment, "", frame, end))


def _with(ts: float, port: str, wirelen: int, frame: bytes, vlan: int, et: int, reason: str) -> Headers:
    """A frame whose Ethernet header was read but whose next header was not."""
    return _new(Headers, (ts, port, wirelen, frame[6:12], frame[0:6], vlan, et, 0, b"", b"", 0, 0, 0, 0, -1, False, reason, frame, -1))


def _ip(
    ts: float, port: str, wirelen: int, frame: bytes, vlan: int, et: int, ipv: int, src: bytes, dst: bytes, proto: int, fragment: bool, reason: str
) -> Headers:
    """A frame whose IP addresses were read but whose transport header was not."""
    return _new(Headers, (ts, port, wirelen, frame[6:12], frame[0:6], vlan, et, ipv, src, dst, proto, 0, 0, 0, -1, fragment, reason, frame, -1))


def _accelerated() -> Callable[[bytes, float, int, str], Headers]:
    """`parse_frame` with its common case (the shortcut above) in C, from the optional
    sva.net._fastpath (built by `pip install -e .` where gcc and python3-dev are); the
    Python function when it is not built. Same results: tests/net/test_accel.py."""
    try:
        from sva.net import _fastpath
    except ImportError:  # pragma: no cover - depends on the build
        return parse_frame
    _fastpath.setup(Headers, parse_frame)
    return _fastpath.parse_frame  # type: ignore[no-any-return]


# What the fast path calls: four positional arguments (frame, ts, wirelen, port).
fast_parse_frame = _accelerated()
