"""The deep path: decodes the few frames the fast path dispatches, into observations.

DNS and ARP are read by the small bounded parsers of `sva.net.wire` (scapy needs ~0.3 ms
for a DNS message, they need a few microseconds, and DNS and ARP are most of what comes
here); a DNS message they do not plainly understand (a rare record type, truncation, odd
compression) goes to scapy, so results stay what scapy would say. DHCP, a handful of
frames per lease, is left to scapy, which earns its cost there with its option semantics.
Decoded DNS messages and ARP bodies are kept by their bytes: resolvers repeat themselves.
The server name of a TLS ClientHello (scapy: ~0.4 ms each, none alike) and an HTTP
request's Host are read by small bounded parsers here. Every other packet only sees the
fast path (sva.net.fastpath). A `DeepDecoder` is the `deep` callable of `FastPath`: it
takes the fast path's `Headers`, decodes what it is, and hands `sva.net.model`
observations to `emit`.

Every frame is hostile: decoding is wrapped, anything that cannot be made sense of is
counted in `errors` (with a reason) and dropped, and every list taken from a packet
(questions, answers, names) is bounded.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from sva.net.model import (
    ArpObservation,
    DhcpLease,
    DnsObservation,
    NameObservation,
    ip_text,
    mac_text,
    memo,
)
from sva.net.wire import MAX_DNS_RECORDS, name_text, parse_arp, parse_dns

log = logging.getLogger("sva.net.deep")

MAX_NAME = 253  # a DNS name's longest text form
MAX_HTTP_HEAD = 4096
MAX_TLS_EXTENSIONS = 64  # extensions walked in one ClientHello
MAX_SERVER_NAMES = 8
# Decoded DNS messages and ARP bodies are kept by their bytes (DNS: without the
# transaction id): resolvers ask the same questions over and over.
MAX_DECODE_CACHE = 4096  # entries per cache (emptied when full)
HTTP_METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")
DNS_PORTS = frozenset({53, 5353})
DHCP_PORTS = frozenset({67, 68})
ETH_ARP = 0x0806

Observation = ArpObservation | DnsObservation | NameObservation | DhcpLease


def _name(raw: Any) -> str:
    """A DNS/TLS name (bytes, or what scapy gives) as lower-case text without the trailing dot, bounded."""
    if isinstance(raw, bytes):
        return name_text(raw)
    return str(raw)[: MAX_NAME + 1].rstrip(".").lower()


def _records(field: Any) -> list[Any]:
    """scapy gives DNS sections as a list (2.6+) or as chained records (older)."""
    if field is None:
        return []
    if isinstance(field, list):
        return field[:MAX_DNS_RECORDS]
    out = []
    rec = field
    while rec is not None and len(out) < MAX_DNS_RECORDS and rec.__class__.__name__ != "NoPayload":
        out.append(rec)
        rec = rec.payload if hasattr(rec, "payload") else None
    return out


def client_hello_server_names(data: bytes) -> list[bytes]:
    """The host names of the server_name extension of a TLS ClientHello that starts `data`
    (a TLS record), or [] when it is no ClientHello or is cut before the extension.

    Own code, not scapy's TLS layer: scapy spends ~0.4 ms on a ClientHello, more than the
    fast path spends on a thousand frames, and only this one extension is wanted. Every
    length is checked against the bytes present; a ClientHello split over TCP segments is
    read as far as the first segment goes.
    """
    n = len(data)
    if n < 9 or data[0] != 0x16 or data[5] != 0x01:  # handshake record, ClientHello message
        return []
    end = min(n, 5 + int.from_bytes(data[3:5], "big"))
    i = 5 + 4 + 2 + 32  # record header, handshake header, client_version, random
    if i + 1 > end:
        return []
    i += 1 + data[i]  # session id
    if i + 2 > end:
        return []
    i += 2 + int.from_bytes(data[i : i + 2], "big")  # cipher suites
    if i + 1 > end:
        return []
    i += 1 + data[i]  # compression methods
    if i + 2 > end:
        return []
    ext_end = min(end, i + 2 + int.from_bytes(data[i : i + 2], "big"))
    i += 2
    names: list[bytes] = []
    for _ in range(MAX_TLS_EXTENSIONS):
        if i + 4 > ext_end:
            break
        ext_type = int.from_bytes(data[i : i + 2], "big")
        ext_len = int.from_bytes(data[i + 2 : i + 4], "big")
        body, i = data[i + 4 : min(i + 4 + ext_len, ext_end)], i + 4 + ext_len
        if ext_type != 0:  # server_name
            continue
        j = 2  # server_name_list length, then (type, length, name) entries
        while j + 3 <= len(body) and len(names) < MAX_SERVER_NAMES:
            name_len = int.from_bytes(body[j + 1 : j + 3], "big")
            if body[j] == 0 and j + 3 + name_len <= len(body):
                names.append(body[j + 3 : j + 3 + name_len])
            j += 3 + name_len
        break
    return names


def _payload(h: Any) -> bytes:
    """The L4 payload without Ethernet padding (the fast path's `payload_end` when it has one)."""
    end = getattr(h, "payload_end", -1)
    return h.frame[h.payload : end if end >= 0 else None]


class DeepDecoder:
    """Decodes dispatched frames; `emit` receives each observation."""

    def __init__(self, emit: Callable[[Observation], None]) -> None:
        self.emit = emit
        self.decoded = 0
        self.errors = 0
        self.error_reasons: Counter[str] = Counter()
        self._dns_cache: dict[bytes, tuple[bool, tuple[str, ...], tuple[tuple[str, str], ...]]] = {}
        self._arp_cache: dict[bytes, tuple[int, str, str, str, str]] = {}
        self.scapy_decodes = 0  # DNS messages the own parser left to scapy, and DHCP
        self._scapy: tuple[Any, Any, Any] | None = None

    def _scapy_layers(self) -> tuple[Any, Any, Any]:
        """scapy's DNS, BOOTP and DHCP layers, imported on first need (about a second)."""
        if self._scapy is None:
            from scapy.layers.dhcp import BOOTP, DHCP
            from scapy.layers.dns import DNS

            self._scapy = (DNS, BOOTP, DHCP)
        return self._scapy

    def __call__(self, h: Any) -> None:
        try:
            if h.ethertype == ETH_ARP:
                self._arp(h)
            elif h.proto == 17 and (h.sport in DNS_PORTS or h.dport in DNS_PORTS) and h.payload >= 0:
                self._dns(h, _payload(h))
            elif h.proto == 17 and h.sport in DHCP_PORTS and h.dport in DHCP_PORTS and h.payload >= 0:
                self._dhcp(h)
            elif h.proto == 6 and h.payload >= 0:
                self._tcp(h)
            else:
                return
        except Exception as e:  # noqa: BLE001 - hostile bytes must never stop capture
            self.errors += 1
            self.error_reasons[f"{type(e).__name__}"] += 1
            log.debug("deep decode failed: %s: %s", type(e).__name__, e)
            return
        self.decoded += 1

    # -- per protocol ----------------------------------------------------------------------
    def _arp(self, h: Any) -> None:
        key = h.frame[12:64]  # VLAN tags, ethertype, the ARP body (Ethernet padding at most)
        frame = h.frame
        op, sender_mac, sender_ip, target_mac, target_ip = memo(
            self._arp_cache, key, lambda _: parse_arp(frame), MAX_DECODE_CACHE
        )
        self.emit(ArpObservation(
            ts=h.ts, port=h.port, eth_src=mac_text(h.src_mac), eth_dst=mac_text(h.dst_mac), op=op,
            sender_mac=sender_mac, sender_ip=sender_ip, target_mac=target_mac, target_ip=target_ip,
        ))  # fmt: skip

    def _dns(self, h: Any, data: bytes) -> None:
        if len(data) < 12:
            raise ValueError("DNS message shorter than its header")
        response, qnames, answers = memo(
            self._dns_cache, data[2:], lambda _: self._decode_dns(data), MAX_DECODE_CACHE
        )
        self.emit(DnsObservation(
            ts=h.ts, port=h.port, src_mac=mac_text(h.src_mac), src_ip=ip_text(h.src_ip), dst_ip=ip_text(h.dst_ip),
            sport=h.sport, dport=h.dport, response=response, qnames=qnames, answers=answers,
        ))  # fmt: skip

    def _decode_dns(self, data: bytes) -> tuple[bool, tuple[str, ...], tuple[tuple[str, str], ...]]:
        own = parse_dns(data)
        if own is not None:
            return own
        return self.scapy_dns(data)

    def scapy_dns(self, data: bytes) -> tuple[bool, tuple[str, ...], tuple[tuple[str, str], ...]]:
        """The same summary by scapy's DNS layer (the fallback, and the tests' reference)."""
        self.scapy_decodes += 1
        dns = self._scapy_layers()[0](data)
        qnames = tuple(_name(q.qname) for q in _records(dns.qd) if hasattr(q, "qname"))
        answers: list[tuple[str, str]] = []
        if dns.qr:
            for rr in _records(dns.an):
                if not hasattr(rr, "rrname"):
                    continue
                rdata = rr.rdata
                value = _name(rdata) if isinstance(rdata, bytes) else str(rdata)[:MAX_NAME]
                answers.append((_name(rr.rrname), value))
        return bool(dns.qr), qnames, tuple(answers)

    def _dhcp(self, h: Any) -> None:
        _dns, BOOTP, DHCP = self._scapy_layers()  # noqa: N806 - scapy's class names
        self.scapy_decodes += 1
        bootp = BOOTP(_payload(h))
        if not bootp.haslayer(DHCP):
            return
        options = {}
        for opt in bootp[DHCP].options[:64]:
            if isinstance(opt, tuple) and len(opt) >= 2:
                options[opt[0]] = opt[1]
        if options.get("message-type") != 5:  # only ACKs bind an address
            return
        chaddr = bytes(bootp.chaddr)[:6]
        self.emit(DhcpLease(
            ts=h.ts, port=h.port, mac=mac_text(chaddr), ip=str(bootp.yiaddr),
            server_ip=str(options.get("server_id", ip_text(h.src_ip))),
        ))  # fmt: skip

    def _tcp(self, h: Any) -> None:
        # Most frames sent here are TLS application data to port 443: look at the first
        # bytes in place and copy the payload only when it is a handshake or a request.
        frame, pl = h.frame, h.payload
        if pl >= len(frame):
            return
        if h.sport in DNS_PORTS or h.dport in DNS_PORTS:
            payload = _payload(h)
            if len(payload) > 2:
                self._dns(h, payload[2:])  # DNS over TCP: 2-byte length, then the message
            return
        if frame[pl] == 0x16 and frame[pl + 1 : pl + 2] == b"\x03":
            self._tls(h, _payload(h))
        elif frame.startswith(HTTP_METHODS, pl):
            self._http(h, _payload(h)[:MAX_HTTP_HEAD])

    def _tls(self, h: Any, payload: bytes) -> None:
        for name in client_hello_server_names(payload):
            self._name_seen(h, _name(name), tls=True)

    def _http(self, h: Any, head: bytes) -> None:
        end = head.find(b"\r\n\r\n")
        lines = (head if end < 0 else head[:end]).split(b"\r\n")[1:64]
        for line in lines:
            key, sep, value = line.partition(b":")
            if sep and key.strip().lower() == b"host":
                host = value.strip().decode("ascii", "replace")
                if host.startswith("["):  # [v6]:port
                    host = host[1 : host.find("]")] if "]" in host else host[1:]
                elif host.count(":") == 1:
                    host = host.split(":", 1)[0]
                self._name_seen(h, _name(host), tls=False)
                return

    def _name_seen(self, h: Any, name: str, *, tls: bool) -> None:
        if not name:
            return
        self.emit(NameObservation(
            kind="tls_sni" if tls else "http_host", ts=h.ts, port=h.port, src_mac=mac_text(h.src_mac),
            src_ip=ip_text(h.src_ip), dst_ip=ip_text(h.dst_ip), sport=h.sport, dport=h.dport, name=name,
        ))  # fmt: skip
