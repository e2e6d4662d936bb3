"""Network facts: what the monitor saw in one window, as immutable values for detectors.

The monitor (`sva.net.monitor`) turns packets into these records; the engine hands them to
the network detectors as facts, exactly as guest facts go to the memory detectors:

    net_window     NetWindow: the observations of the recent horizon (flows touched, ARP,
                   DNS, TLS SNI, HTTP Host, DHCP leases) and the capture statistics at
                   the window's end; per-port MAC/IP sightings are the flows' own keys
    net_inventory  sva.net.inventory.Inventory: which MAC/IP/port belongs to which VM
    net_iocs       sva.net.ioc.IocSet: the indicator lists in force
    net_payload_matches  tuple[PayloadMatch, ...]: network YARA hits on flow payload heads

Addresses are kept as text (`"52:54:00:12:34:56"`, `"10.0.2.15"`) because that is what
findings show and rules name; converting once per record is cheap next to the deep path.
Every collection is bounded by the monitor (see `sva.net.monitor.Limits`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}

K = TypeVar("K")
V = TypeVar("V")


def memo(cache: dict[K, V], key: K, compute: Callable[[K], V], limit: int) -> V:
    """`cache[key]`, computed on a miss; the cache is emptied when it holds `limit` entries
    (simpler than LRU, and a flood of distinct keys costs no more than without a cache)."""
    try:
        return cache[key]
    except KeyError:
        pass
    if len(cache) >= limit:
        cache.clear()
    value = cache[key] = compute(key)
    return value


def mac_text(mac: bytes) -> str:
    return mac[:6].hex(":")


def ip_text(ip: bytes) -> str:
    # inet_ntop is C: several times faster than ipaddress, and flows are converted every cycle.
    if len(ip) == 4:
        return socket.inet_ntop(socket.AF_INET, ip)
    if len(ip) == 16:
        return socket.inet_ntop(socket.AF_INET6, ip)
    return ""


def proto_name(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto))


def is_multicast_mac(mac: str) -> bool:
    """Broadcast and multicast MACs have the group bit (lowest bit of the first octet)."""
    try:
        return bool(int(mac[:2], 16) & 1)
    except ValueError:
        return False


class FlowRecord(NamedTuple):
    """One direction of a conversation, copied out of the flow table at the window's end.

    A NamedTuple rather than a frozen dataclass: every changed flow is copied every cycle,
    and a tuple is built in one C call where a frozen dataclass sets each field in Python.
    """

    port: str
    src_mac: str
    dst_mac: str
    vlan: int
    ip_version: int
    src_ip: str
    dst_ip: str
    proto: int
    sport: int
    dport: int
    first: float
    last: float
    packets: int
    bytes: int
    flags_or: int
    syn: int
    synack: int
    rst: int
    fin: int
    head: bytes = b""  # first bytes of L4 payload in this direction

    @property
    def five_tuple(self) -> str:
        """`tcp 10.0.0.1:1234 -> 10.0.0.2:80` (IPv6 addresses in brackets)."""

        def ep(ip: str, port: int) -> str:
            host = f"[{ip}]" if ":" in ip else ip
            return f"{host}:{port}" if self.proto in (6, 17) else host

        return f"{proto_name(self.proto)} {ep(self.src_ip, self.sport)} -> {ep(self.dst_ip, self.dport)}"

    def reverse_key(self) -> tuple[str, str, int, int, int]:
        return (self.dst_ip, self.src_ip, self.proto, self.dport, self.sport)

    def key(self) -> tuple[str, str, int, int, int]:
        return (self.src_ip, self.dst_ip, self.proto, self.sport, self.dport)

    def evidence(self) -> dict[str, Any]:
        return {
            "flow": self.five_tuple,
            "proto": proto_name(self.proto),
            "src_ip": self.src_ip,
            "src_port": self.sport,
            "dst_ip": self.dst_ip,
            "dst_port": self.dport,
            "src_mac": self.src_mac,
            "dst_mac": self.dst_mac,
            "packets": self.packets,
            "bytes": self.bytes,
            "first_seen": round(self.first, 6),
            "last_seen": round(self.last, 6),
        }


class ArpOp:
    REQUEST = 1
    REPLY = 2


@dataclass(frozen=True, slots=True)
class ArpObservation:
    """One ARP packet. `gratuitous`: sender IP == target IP (an announcement)."""

    ts: float
    port: str
    eth_src: str
    eth_dst: str
    op: int
    sender_mac: str
    sender_ip: str
    target_mac: str
    target_ip: str

    @property
    def gratuitous(self) -> bool:
        return self.sender_ip == self.target_ip and self.sender_ip != ""


@dataclass(frozen=True, slots=True)
class DnsObservation:
    """A DNS query or response: the question names and, for responses, the answers."""

    ts: float
    port: str
    src_mac: str
    src_ip: str
    dst_ip: str
    sport: int
    dport: int
    response: bool
    qnames: tuple[str, ...]
    answers: tuple[tuple[str, str], ...] = ()  # (name, address or target name)


@dataclass(frozen=True, slots=True)
class NameObservation:
    """A server name seen in a flow: a TLS ClientHello's SNI or an HTTP request's Host."""

    kind: str  # "tls_sni" or "http_host"
    ts: float
    port: str
    src_mac: str
    src_ip: str
    dst_ip: str
    sport: int
    dport: int
    name: str

    def flow_text(self) -> str:
        return f"tcp {self.src_ip}:{self.sport} -> {self.dst_ip}:{self.dport}"


@dataclass(frozen=True, slots=True)
class DhcpLease:
    """A DHCP ACK: the server gave `ip` to the client with hardware address `mac`."""

    ts: float
    port: str
    mac: str
    ip: str
    server_ip: str


@dataclass(frozen=True)
class CaptureCounters:
    """The capture source's and the fast path's counters at the window's end."""

    source: str
    packets: int
    bytes: int
    kernel_drops: int
    ring_drops: int
    truncated: int
    malformed: int
    non_ip: int = 0
    fragments: int = 0
    vlan_tagged: int = 0
    flows_evicted: int = 0
    deep_errors: int = 0
    records_dropped: int = 0  # deep-path observations dropped at the per-kind bound
    windows_truncated: int = 0  # cycles whose window held more flows than the detectors are given
    elapsed: float = 0.0
    malformed_reasons: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        rate = self.packets / self.elapsed if self.elapsed > 0 else 0.0
        return {
            "source": self.source,
            "packets": self.packets,
            "bytes": self.bytes,
            "kernel_drops": self.kernel_drops,
            "ring_drops": self.ring_drops,
            "truncated": self.truncated,
            "malformed": self.malformed,
            "malformed_reasons": dict(self.malformed_reasons),
            "non_ip": self.non_ip,
            "fragments": self.fragments,
            "vlan_tagged": self.vlan_tagged,
            "flows_evicted": self.flows_evicted,
            "deep_errors": self.deep_errors,
            "records_dropped": self.records_dropped,
            "windows_truncated": self.windows_truncated,
            "elapsed": round(self.elapsed, 3),
            "packets_per_second": round(rate, 1),
        }


@dataclass(frozen=True)
class NetWindow:
    """The observations of the horizon that ends at `end` (capture time, epoch seconds).

    Records stay in the window for the monitor's horizon (default 30 s) after they were
    last seen, so a finding stays present while its evidence is recent and resolves after.
    """

    start: float
    end: float
    flows: tuple[FlowRecord, ...] = ()
    arp: tuple[ArpObservation, ...] = ()
    dns: tuple[DnsObservation, ...] = ()
    tls: tuple[NameObservation, ...] = ()
    http: tuple[NameObservation, ...] = ()
    dhcp: tuple[DhcpLease, ...] = ()
    counters: CaptureCounters | None = None
    dropped_records: int = 0  # observations not kept because a per-window bound was hit


@dataclass(frozen=True, slots=True)
class PayloadMatch:
    """A network YARA rule matched the first bytes of a flow's payload."""

    flow: FlowRecord
    rule: str  # namespace:rule
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = field(default=())
    strings: tuple[tuple[int, str, str], ...] = ()  # (offset, identifier, data as hex, bounded)
    techniques: tuple[str, ...] = ()

    def meta_value(self, key: str) -> str | None:
        return next((v for k, v in self.meta if k == key), None)
