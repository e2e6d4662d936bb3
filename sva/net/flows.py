"""A bounded, directional flow table.

One entry per direction: (port, src_mac, ip_version, src_ip, dst_ip, proto, sport, dport).
Keeping directions apart lets detectors tell who sent what (a scanner's SYNs, a victim's
RSTs) without a canonicalisation step per packet. The table never grows past `max_flows`:
the least recently seen flow is dropped to make room, and `evicted` counts how often, so a
flood of spoofed 5-tuples costs memory once and shows up in the statistics.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from sva.net.parse import Headers

FlowKey = tuple  # (port, src_mac, ip_version, src_ip, dst_ip, proto, sport, dport)


@dataclass(slots=True)
class Flow:
    key: FlowKey
    src_mac: bytes
    dst_mac: bytes
    vlan: int
    first: float
    last: float
    packets: int = 0
    bytes: int = 0
    flags_or: int = 0  # OR of TCP flags seen
    syn: int = 0  # SYN without ACK
    synack: int = 0
    rst: int = 0
    fin: int = 0
    head: bytearray = field(default_factory=bytearray)  # first head_bytes of L4 payload in this direction, in arrival order

    @property
    def port(self) -> str:
        return self.key[0]  # type: ignore[no-any-return]

    @property
    def five_tuple(self) -> tuple[bytes, bytes, int, int, int]:
        """(src_ip, dst_ip, proto, sport, dport)."""
        k = self.key
        return (k[3], k[4], k[5], k[6], k[7])


class FlowTable:
    """Directional flows keyed by FlowKey, least recently seen first."""

    def __init__(self, max_flows: int = 262144, idle_timeout: float = 120.0, head_bytes: int = 1024) -> None:
        if max_flows < 1:
            raise ValueError("max_flows must be >= 1")
        self.max_flows = max_flows
        self.idle_timeout = idle_timeout
        self.head_bytes = head_bytes
        self.evicted = 0
        self.evicted_flows: list[Flow] = []  # the last few evicted, for a caller that wants to report them
        self._flows: OrderedDict[FlowKey, Flow] = OrderedDict()

    def __len__(self) -> int:
        return len(self._flows)

    def update(self, h: Headers) -> Flow | None:
        """Account one parsed frame to its flow; None for frames that are not IP."""
        if not h.ip_version:
            return None
        key = (h.port, h.src_mac, h.ip_version, h.src_ip, h.dst_ip, h.proto, h.sport, h.dport)
        flows = self._flows
        f = flows.get(key)
        if f is None:
            f = self._new_flow(key, h)
        else:
            flows.move_to_end(key)
            if h.ts > f.last:
                f.last = h.ts
        f.packets += 1
        f.bytes += h.wirelen
        fl = h.tcp_flags
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
        pl = h.payload
        if pl >= 0:
            head = f.head
            room = self.head_bytes - len(head)
            if room > 0:
                end = h.payload_end
                if end < 0 or end > pl + room:
                    end = pl + room
                head += h.frame[pl:end]
        return f

    def _new_flow(self, key: FlowKey, h: Headers) -> Flow:
        """Insert an empty flow for `key` (evicting the least recently seen if full); counts are the caller's."""
        flows = self._flows
        if len(flows) >= self.max_flows:
            _, old = flows.popitem(last=False)
            self.evicted += 1
            ev = self.evicted_flows
            ev.append(old)
            if len(ev) > 64:
                del ev[:32]
        f = Flow(key, h.src_mac, h.dst_mac, h.vlan, h.ts, h.ts)
        flows[key] = f
        return f

    def expire(self, now: float) -> list[Flow]:
        """Remove and return the flows idle for longer than idle_timeout at time `now`."""
        cutoff = now - self.idle_timeout
        out: list[Flow] = []
        flows = self._flows
        # Least recently seen first: stop at the first flow still active. Timestamps that
        # run backwards (merged sources) can leave an idle flow behind a fresher one until
        # a later call; it is never lost, only reported late.
        while flows:
            key, f = next(iter(flows.items()))
            if f.last > cutoff:
                break
            del flows[key]
            out.append(f)
        return out

    def flows(self) -> list[Flow]:
        """All flows, least recently seen first (a copy: safe to hold while the table changes)."""
        return list(self._flows.values())

    def get(self, key: FlowKey) -> Flow | None:
        return self._flows.get(key)
