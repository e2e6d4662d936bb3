"""The fast path: every frame is parsed, counted and put in the flow table; only the few
kinds of frame that need full decoding (ARP, DNS, DHCP, TLS handshakes, HTTP requests,
ICMP) are handed to the deep path.

Deep decoding costs several times the header parse (scapy, where it is still used, about
60x), so which frames reach it is a lever on throughput; the tests here are ordered by how
common the frames are.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

from sva.net.capture import CaptureStats, RawFrame
from sva.net.flows import FlowTable
from sva.net.parse import ETH_P_ARP, Headers, fast_parse_frame, parse_frame

try:  # the optional C accelerator (built by `pip install -e .` where gcc and python3-dev are)
    from sva.net._fastpath import process_batch as _process_batch_c
except ImportError:  # pragma: no cover - depends on the build
    _process_batch_c = None

# First four payload bytes of an HTTP/1.x request (the method and, where short, its space).
# sva/net/_fastpath.c repeats these and the ports below: tests/net/test_accel.py compares.
HTTP_METHOD_PREFIXES = frozenset((b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC"))
DNS_PORT = 53
DHCP_PORTS = frozenset((67, 68))
TLS_PORT = 443


def wants_deep(h: Headers) -> bool:
    """Whether an IP frame goes to the deep path (ARP is decided before: all well-formed ARP does)."""
    proto = h.proto
    if proto == 6:
        pl = h.payload
        if h.sport == DNS_PORT or h.dport == DNS_PORT:
            return True
        if pl < 0:
            return False
        frame = h.frame
        return h.dport == TLS_PORT or (frame[pl] == 0x16 and frame[pl + 1 : pl + 2] == b"\x03") or frame[pl : pl + 4] in HTTP_METHOD_PREFIXES
    if proto == 17:
        return h.sport == DNS_PORT or h.dport == DNS_PORT or h.sport in DHCP_PORTS or h.dport in DHCP_PORTS
    return proto == 1 or proto == 58


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
        # The C loop when sva.net._fastpath is built; False: the Python loop (the reference).
        self.accelerated = True

    def process(self, batch: list[RawFrame]) -> None:
        table = self.table
        if type(table) is not FlowTable:
            self._process_generic(batch)
        elif self.accelerated and _process_batch_c is not None:
            self._process_c(batch)
        else:
            self._process_py(batch)

    def _process_c(self, batch: list[RawFrame]) -> None:
        """_process_py in C (sva/net/_fastpath.c): same table, counters and deep frames."""
        assert _process_batch_c is not None
        table = self.table
        to_deep: list[Headers] = []
        deep = self.deep
        n_bytes, malformed, non_ip, fragments, vlan_tagged, ts = _process_batch_c(
            batch, table._flows, table._new_flow, table.head_bytes, deep is not None, to_deep, self.malformed_reasons
        )
        self._account(len(batch), n_bytes, malformed, non_ip, fragments, vlan_tagged, self.last_ts if ts is None else ts)
        if deep is not None and to_deep:
            self._dispatch(deep, to_deep)

    def _process_py(self, batch: list[RawFrame]) -> None:
        table = self.table
        # The hot loop: one parse, then the flow-table update written out here (a method call
        # and a dozen NamedTuple attribute reads per frame cost more than the update itself).
        # It must do exactly what FlowTable.update does; test_flows checks both give equal tables.
        parse = fast_parse_frame  # C for common frames when built (sva.net.parse)
        flows = table._flows
        get = flows.get
        move = flows.move_to_end
        new_flow = table._new_flow
        head_bytes = table.head_bytes
        deep = self.deep
        malformed_reasons = self.malformed_reasons
        n_bytes = 0
        malformed = non_ip = fragments = vlan_tagged = 0
        to_deep: list[Headers] = []
        want = to_deep.append
        ts = self.last_ts
        for ts, frame, wirelen, port in batch:
            h = parse(frame, ts, wirelen, port)
            _t, _p, wl, smac, _d, vlan, et, ipv, sip, dip, proto, sp, dp, fl, pl, frag, bad, _f, pend = h
            n_bytes += wl
            if bad:
                malformed += 1
                malformed_reasons[bad] += 1
            if vlan >= 0:
                vlan_tagged += 1
            if not ipv:
                non_ip += 1
                if et == ETH_P_ARP and not bad:
                    want(h)
                continue
            if frag:
                fragments += 1
            key = (port, smac, ipv, sip, dip, proto, sp, dp)
            f = get(key)
            if f is None:
                f = new_flow(key, h)
            else:
                move(key)
                if ts > f.last:
                    f.last = ts
            f.packets += 1
            f.bytes += wl
            if fl:
                f.flags_or |= fl
                if fl & 0x02:
                    if fl & 0x10:
                        f.synack += 1
                    else:
                        f.syn += 1
                if fl & 0x04:
                    f.rst += 1
                if fl & 0x01:
                    f.fin += 1
            if pl >= 0:
                head = f.head
                room = head_bytes - len(head)
                if room > 0:
                    head += frame[pl : pend if pend - pl <= room else pl + room]
            if deep is None:
                continue
            if proto == 6:
                if sp == DNS_PORT or dp == DNS_PORT:
                    want(h)
                elif pl >= 0 and (dp == TLS_PORT or (frame[pl] == 0x16 and frame[pl + 1 : pl + 2] == b"\x03") or frame[pl : pl + 4] in HTTP_METHOD_PREFIXES):
                    want(h)
            elif proto == 17:
                if sp == DNS_PORT or dp == DNS_PORT or sp in DHCP_PORTS or dp in DHCP_PORTS:
                    want(h)
            elif proto == 1 or proto == 58:
                want(h)
        self._account(len(batch), n_bytes, malformed, non_ip, fragments, vlan_tagged, ts)
        if deep is not None and to_deep:
            self._dispatch(deep, to_deep)

    def _process_generic(self, batch: list[RawFrame]) -> None:
        """The same as process() through the table's own update() (for other table types)."""
        update = self.table.update
        deep = self.deep
        n_bytes = 0
        malformed = non_ip = fragments = vlan_tagged = 0
        to_deep: list[Headers] = []
        ts = self.last_ts
        for ts, frame, wirelen, port in batch:
            h = parse_frame(frame, ts, wirelen, port)
            n_bytes += h.wirelen
            if h.malformed:
                malformed += 1
                self.malformed_reasons[h.malformed] += 1
            if h.vlan >= 0:
                vlan_tagged += 1
            if not h.ip_version:
                non_ip += 1
                if h.ethertype == ETH_P_ARP and not h.malformed:
                    to_deep.append(h)
                continue
            if h.fragment:
                fragments += 1
            update(h)
            if deep is not None and wants_deep(h):
                to_deep.append(h)
        self._account(len(batch), n_bytes, malformed, non_ip, fragments, vlan_tagged, ts)
        if deep is not None and to_deep:
            self._dispatch(deep, to_deep)

    def _account(self, packets: int, n_bytes: int, malformed: int, non_ip: int, fragments: int, vlan_tagged: int, ts: float) -> None:
        self.packets += packets
        self.bytes += n_bytes
        self.malformed += malformed
        self.non_ip += non_ip
        self.fragments += fragments
        self.vlan_tagged += vlan_tagged
        self.last_ts = ts

    def _dispatch(self, deep: Callable[[Headers], None], frames: list[Headers]) -> None:
        self.deep_calls += len(frames)
        for h in frames:
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
