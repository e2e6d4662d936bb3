"""The fast path: every frame is parsed, counted and put in the flow table; only the few
kinds of frame that need full decoding (ARP, DNS, DHCP, TLS handshakes, HTTP requests,
ICMP) are handed to the deep path.

Deep decoding with scapy costs about 60x the header parse, so which frames reach it is the
main lever on throughput; the tests here are ordered by how common the frames are.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

from sva.net.capture import CaptureStats, RawFrame
from sva.net.flows import FlowTable
from sva.net.parse import ETH_P_ARP, Headers, parse_frame

# First four payload bytes of an HTTP/1.x request (the method and, where short, its space).
HTTP_METHOD_PREFIXES = frozenset((b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC"))
DNS_PORT = 53
DHCP_PORTS = frozenset((67, 68))
TLS_PORT = 443


class FastPath:
    """Per batch: parse, count, update flows, dispatch to `deep`.

    `deep` sees a batch's frames, in order, after the whole batch is in the flow table (the
    dispatch loop stays free of calls out). An exception in `deep` is counted in
    `deep_errors` and the next frame goes on.
    """

    def __init__(self, deep: Callable[[Headers], None] | None = None, table: FlowTable | None = None) -> None:
        self.deep = deep
        self.table = table if table is not None else FlowTable()
        self.packets = 0
        self.bytes = 0
        self.malformed = 0
        self.malformed_reasons: Counter[str] = Counter()
        self.non_ip = 0
        self.fragments = 0
        self.vlan_tagged = 0
        self.deep_calls = 0
        self.deep_errors = 0
        self.last_deep_error = ""  # "ExceptionType: message" of the latest failure in `deep`
        self.last_ts = 0.0

    def process(self, batch: list[RawFrame]) -> None:
        parse = parse_frame
        update = self.table.update
        deep = self.deep
        malformed_reasons = self.malformed_reasons
        n_bytes = 0
        malformed = non_ip = fragments = vlan_tagged = 0
        to_deep: list[Headers] = []
        want = to_deep.append
        ts = self.last_ts
        for ts, frame, wirelen, port in batch:
            h = parse(frame, ts, wirelen, port)
            n_bytes += h.wirelen
            if h.malformed:
                malformed += 1
                malformed_reasons[h.malformed] += 1
            if h.vlan >= 0:
                vlan_tagged += 1
            ipv = h.ip_version
            if not ipv:
                non_ip += 1
                if h.ethertype == ETH_P_ARP and not h.malformed:
                    want(h)
                continue
            if h.fragment:
                fragments += 1
            update(h)
            if deep is None:
                continue
            proto = h.proto
            if proto == 6:
                pl = h.payload
                sp = h.sport
                dp = h.dport
                if sp == DNS_PORT or dp == DNS_PORT:
                    want(h)
                elif pl >= 0:
                    frame = h.frame
                    if dp == TLS_PORT or (frame[pl] == 0x16 and frame[pl + 1 : pl + 2] == b"\x03") or frame[pl : pl + 4] in HTTP_METHOD_PREFIXES:
                        want(h)
            elif proto == 17:
                sp = h.sport
                dp = h.dport
                if sp == DNS_PORT or dp == DNS_PORT or sp in DHCP_PORTS or dp in DHCP_PORTS:
                    want(h)
            elif proto == 1 or proto == 58:
                want(h)
        self.packets += len(batch)
        self.bytes += n_bytes
        self.malformed += malformed
        self.non_ip += non_ip
        self.fragments += fragments
        self.vlan_tagged += vlan_tagged
        self.last_ts = ts
        if deep is not None and to_deep:
            self.deep_calls += len(to_deep)
            for h in to_deep:
                try:
                    deep(h)
                except Exception as e:  # noqa: BLE001 - one bad decode must not stop the capture
                    self.deep_errors += 1
                    self.last_deep_error = f"{type(e).__name__}: {e}"

    def stats(self, source_stats: CaptureStats) -> CaptureStats:
        """The source's statistics with the malformed count this fast path found filled in."""
        return dataclasses.replace(source_stats, malformed=self.malformed)

    def counters(self) -> dict[str, object]:
        return {
            "packets": self.packets,
            "bytes": self.bytes,
            "malformed": self.malformed,
            "malformed_reasons": dict(self.malformed_reasons),
            "non_ip": self.non_ip,
            "fragments": self.fragments,
            "vlan_tagged": self.vlan_tagged,
            "flows": len(self.table),
            "flows_evicted": self.table.evicted,
            "deep_calls": self.deep_calls,
            "deep_errors": self.deep_errors,
        }
