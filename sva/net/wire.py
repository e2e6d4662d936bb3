"""Small bounded parsers for the deep path's common messages: DNS and ARP.

Scapy needs ~0.3 ms to dissect a DNS message and ~0.1 ms for an ARP frame; these read the
few fields the network facts keep in a few microseconds. They are strict on purpose:
`parse_dns` gives None for anything that is not a plainly well-formed message (a record
type it does not know, a truncated section, a forward compression pointer, a name over
255 bytes, more records than are kept), and the caller lets scapy decide those rare
messages, so what comes out is what scapy would have said (tests/net/test_deep.py checks
both against each other on generated and truncated messages).

Every length is checked against the bytes present, every loop has a fixed bound.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

MAX_DNS_RECORDS = 32  # questions or answers taken from one message; more: scapy decides
MAX_NAME_TEXT = 253  # a DNS name's longest text form
MAX_NAME_WIRE = 255  # a name's longest encoded form (RFC 1035 2.3.4)
MAX_POINTERS = 16  # compression jumps followed in one name

DNS_A, DNS_NS, DNS_CNAME, DNS_PTR, DNS_AAAA = 1, 2, 5, 12, 28
_NAME_TYPES = frozenset((DNS_NS, DNS_CNAME, DNS_PTR))  # rdata is a (compressible) name

_HEADER = struct.Struct("!2xHHHHH")  # flags, qdcount, ancount, nscount, arcount (after the id)
_RR = struct.Struct("!HH4xH")  # type, class, ttl (skipped), rdlength
_ARP = struct.Struct("!H6s4s6s4s")  # Ethernet/IPv4 ARP: op, addresses
_VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
_ETH_P_ARP = 0x0806
_MAX_VLAN_TAGS = 4

_ntop = socket.inet_ntop
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6


class DnsSummary(NamedTuple):
    """What the network facts keep of a DNS message (names lower case, no trailing dot)."""

    response: bool
    qnames: tuple[str, ...]
    answers: tuple[tuple[str, str], ...]  # (owner name, address or target name)


def name_text(raw: bytes) -> str:
    """A DNS/TLS name as lower-case text without the trailing dot, bounded."""
    return raw[: MAX_NAME_TEXT + 1].decode("ascii", "replace").rstrip(".").lower()


def _read_name(data: bytes, i: int) -> tuple[bytes, int] | None:
    """The name at `i` (labels joined with dots, as scapy gives it) and the offset after
    it in the message, or None when it is not a plain well-formed name.

    A compression pointer must point before every place this name has been read from,
    so the walk only ever goes backwards through the message and cannot loop.
    """
    n = len(data)
    parts: list[bytes] = []
    wire = 0
    after = -1  # where the message continues after the first pointer
    floor = i  # pointers must point below this
    jumps = 0
    for _ in range(MAX_NAME_WIRE + MAX_POINTERS + 1):  # a label, a jump or the end per step
        if i >= n:
            return None
        ln = data[i]
        if ln == 0:
            if after < 0:
                after = i + 1
            name = b".".join(parts) + b"." if parts else b"."
            return name, after
        if ln < 64:
            end = i + 1 + ln
            wire += 1 + ln
            if end > n or wire > MAX_NAME_WIRE:
                return None
            parts.append(data[i + 1 : end])
            i = end
        elif ln >= 0xC0:
            jumps += 1
            if i + 1 >= n or jumps > MAX_POINTERS:
                return None
            target = (ln & 0x3F) << 8 | data[i + 1]
            if after < 0:
                after = i + 2
            if target >= floor:
                return None
            floor = i = target
        else:  # 0x40 / 0x80: extended label types, not in use
            return None
    return None


def parse_dns(data: bytes) -> DnsSummary | None:
    """The questions and (for a response) the A/AAAA/NS/CNAME/PTR answers of a DNS
    message, or None when scapy has to decide (see the module docstring)."""
    n = len(data)
    if n < 12:
        return None
    flags, qdcount, ancount, _ns, _ar = _HEADER.unpack_from(data)
    if qdcount > MAX_DNS_RECORDS or ancount > MAX_DNS_RECORDS:
        return None
    response = bool(flags & 0x8000)
    i = 12
    qnames: list[str] = []
    for _ in range(qdcount):
        got = _read_name(data, i)
        if got is None or got[1] + 4 > n:
            return None
        qnames.append(name_text(got[0]))
        i = got[1] + 4  # qtype, qclass
    answers: list[tuple[str, str]] = []
    if response:
        for _ in range(ancount):
            got = _read_name(data, i)
            if got is None or got[1] + 10 > n:
                return None
            owner, i = got
            rtype, _cls, rdlen = _RR.unpack_from(data, i)
            start = i + 10
            end = start + rdlen
            if end > n:
                return None
            if rtype == DNS_A and rdlen == 4:
                value = _ntop(_AF_INET, data[start:end])
            elif rtype == DNS_AAAA and rdlen == 16:
                value = _ntop(_AF_INET6, data[start:end])
            elif rtype in _NAME_TYPES:
                target = _read_name(data, start)
                if target is None or target[1] != end:
                    return None
                value = name_text(target[0])
            else:
                return None
            answers.append((name_text(owner), value))
            i = end
    return DnsSummary(response, tuple(qnames), tuple(answers))


class ArpBody(NamedTuple):
    op: int
    sender_mac: str
    sender_ip: str
    target_mac: str
    target_ip: str


def parse_arp(frame: bytes) -> ArpBody:
    """The Ethernet/IPv4 ARP body of an Ethernet frame (after any VLAN tags).
    Raises ValueError for anything else."""
    off = 12
    for _ in range(_MAX_VLAN_TAGS + 1):
        if off + 2 > len(frame):
            break
        et = frame[off] << 8 | frame[off + 1]
        if et == _ETH_P_ARP:
            if off + 10 > len(frame):
                raise ValueError("truncated ARP header")
            if frame[off + 2 : off + 8] != b"\x00\x01\x08\x00\x06\x04":  # hardware 1, IPv4, lengths 6 and 4
                raise ValueError("ARP is not Ethernet/IPv4")
            if off + 30 > len(frame):
                raise ValueError("truncated ARP body")
            op, sha, spa, tha, tpa = _ARP.unpack_from(frame, off + 8)
            return ArpBody(op, sha.hex(":"), _ntop(_AF_INET, spa), tha.hex(":"), _ntop(_AF_INET, tpa))
        if et not in _VLAN_TPIDS:
            break
        off += 4
    raise ValueError("no ARP layer")
