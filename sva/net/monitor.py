"""The network pipeline: source → fast path → deep path → per-window facts → Engine → sinks.

    monitor = NetMonitor(open_source("pcap:/tmp/x.pcap"), inventory=inv)
    summary = monitor.run(stop_event, on_report=print_new_alerts)

Every packet goes through the fast path (header parse, flow table); the few it dispatches
go through the deep path (`DeepDecoder`: own bounded parsers; scapy for DHCP and odd DNS)
into bounded per-kind queues (`Observations`). Every `interval` seconds (of capture time
for a pcap, of wall time for a live source) the monitor builds a `NetWindow` of the recent
`horizon` and runs one cycle of sva's detection `Engine` with the network detectors and
facts: the same dedup, suppressions, rules and sinks as the memory scan. A finding stays
present while its evidence is in the horizon, and is resolved after.

The network detectors are not in the memory scan's default list (detectors.DEFAULT_DETECTORS):
they need these facts, which a memory cycle does not have. `NETWORK_DETECTORS` is theirs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sva.engine.engine import CycleReport, Engine
from sva.engine.facts import FactContext, FactRegistry, FunctionProvider
from sva.engine.model import VmIdentity
from sva.engine.rules import RuleSet
from sva.net.deep import DeepDecoder
from sva.net.inventory import Inventory, Learner
from sva.net.ioc import IocSet
from sva.net.model import (
    ArpObservation,
    CaptureCounters,
    DhcpLease,
    DnsObservation,
    FlowRecord,
    NameObservation,
    NetWindow,
    PayloadMatch,
    ip_text,
    mac_text,
)

if TYPE_CHECKING:
    from sva.bus.sink import Sink
    from sva.engine.detector import Detector
    from sva.net.capture import CaptureSource
    from sva.net.flows import FlowTable
    from sva.scan.rules import CompiledRuleSet

log = logging.getLogger("sva.net.monitor")

NETWORK_DETECTORS: tuple[str, ...] = (
    "net_mac_spoof",
    "net_ip_spoof",
    "net_arp_spoof",
    "net_port_scan",
    "net_ioc",
    "net_payload",
    "net_vm_policy",
)

MAX_YARA_STRINGS = 16  # string hits kept per payload match
MAX_HIT_HEX = 64  # bytes of each hit shown (hex)


@dataclass(frozen=True)
class Limits:
    """Bounds of what the monitor keeps between cycles."""

    interval: float = 1.0  # seconds between detection cycles
    horizon: float = 30.0  # seconds an observation stays in the window after it was seen
    max_records: int = 20000  # per observation kind in the horizon (oldest dropped, counted)
    max_window_flows: int = 100000  # flows handed to the detectors per cycle (most recent first)
    max_payload_scans: int = 20000  # flow heads scanned with YARA per cycle
    # Live sources: a cycle that took c seconds delays the next one to c / max_cycle_share
    # after it, so detection never takes more than this share of the time that packets
    # need (under load, findings come later; packets are not dropped for detection's sake).
    max_cycle_share: float = 0.25


def network_rules_dirs(base: Path | None = None) -> list[Path]:
    """The rules `sva net` loads by default: the rules directory (its suppressions apply
    to network findings too) and its `network/` subdirectory."""
    from sva.engine.rules import default_rules_dir

    root = base or default_rules_dir()
    return [root, root / "network"]


def load_network_rules(paths: Sequence[str | Path] | None = None) -> RuleSet:
    import sva.net.rules  # noqa: F401 - registers the network rule kinds before loading
    from sva.engine.ruleload import load_rules

    return load_rules(*(paths or network_rules_dirs()))


def default_network_detectors() -> list[Detector]:
    from sva.engine.registry import load_detectors

    return load_detectors(NETWORK_DETECTORS)


class Observations:
    """Bounded queues of deep-path observations; the `emit` target of DeepDecoder.

    DHCP ACKs and first ARPs also go to the inventory `Learner` (where learning is allowed).
    """

    def __init__(self, learner: Learner, max_records: int) -> None:
        self.learner = learner
        self.arp: deque[ArpObservation] = deque(maxlen=max_records)
        self.dns: deque[DnsObservation] = deque(maxlen=max_records)
        self.tls: deque[NameObservation] = deque(maxlen=max_records)
        self.http: deque[NameObservation] = deque(maxlen=max_records)
        self.dhcp: deque[DhcpLease] = deque(maxlen=max_records)
        self.dropped = 0

    def _put(self, q: deque[Any], obs: Any) -> None:
        if len(q) == q.maxlen:
            self.dropped += 1
        q.append(obs)

    def __call__(self, obs: Any) -> None:
        if isinstance(obs, ArpObservation):
            self._put(self.arp, obs)
            self.learner.first_arp(obs.port, obs.sender_mac, obs.sender_ip, obs.ts)
        elif isinstance(obs, DnsObservation):
            self._put(self.dns, obs)
        elif isinstance(obs, NameObservation):
            self._put(self.tls if obs.kind == "tls_sni" else self.http, obs)
        elif isinstance(obs, DhcpLease):
            self._put(self.dhcp, obs)
            self.learner.dhcp_ack(obs.mac, obs.ip, obs.ts)

    def prune(self, since: float) -> None:
        for q in (self.arp, self.dns, self.tls, self.http, self.dhcp):
            while q and q[0].ts < since:
                q.popleft()


class PayloadScanner:
    """Network YARA over flow payload heads; each head is scanned again only when it grew."""

    def __init__(self, rules: CompiledRuleSet | None) -> None:
        self.rules = rules
        self._done: dict[tuple[Any, ...], tuple[int, tuple[PayloadMatch, ...]]] = {}
        self.scans = 0
        self.errors = 0

    def matches(self, flows: Iterable[FlowRecord], limit: int) -> tuple[PayloadMatch, ...]:
        if self.rules is None or not self.rules.rule_count:
            return ()
        done: dict[tuple[Any, ...], tuple[int, tuple[PayloadMatch, ...]]] = {}
        out: list[PayloadMatch] = []
        budget = limit
        for f in flows:
            if not f.head:
                continue
            key = (f.port, f.src_mac, f.src_ip, f.dst_ip, f.proto, f.sport, f.dport)
            prev = self._done.get(key)
            if prev is not None and prev[0] == len(f.head):
                found = tuple(PayloadMatch(f, m.rule, m.tags, m.meta, m.strings, m.techniques) for m in prev[1])
            elif budget > 0:
                budget -= 1
                found = self._scan(f)
            else:
                continue
            done[key] = (len(f.head), found)
            out.extend(found)
        self._done = done  # flows out of the window are forgotten
        return tuple(out)

    def _scan(self, f: FlowRecord) -> tuple[PayloadMatch, ...]:
        assert self.rules is not None
        self.scans += 1
        try:
            hits = self.rules.rules.match(data=f.head, timeout=1)
        except Exception as e:  # noqa: BLE001 - a YARA failure on one flow must not stop the others
            self.errors += 1
            log.warning("network YARA failed on %s: %s", f.five_tuple, e)
            return ()
        out = []
        for m in hits:
            name = f"{m.namespace}:{m.rule}"
            info = self.rules.info(m.namespace, m.rule)
            strings: list[tuple[int, str, str]] = []
            for s in m.strings:
                for inst in s.instances:
                    if len(strings) < MAX_YARA_STRINGS:
                        strings.append((inst.offset, s.identifier, bytes(inst.matched_data[:MAX_HIT_HEX]).hex()))
            meta = tuple((str(k), str(v)) for k, v in m.meta.items())
            techniques = info.techniques if info is not None else ()
            out.append(PayloadMatch(f, name, tuple(m.tags), meta, tuple(strings), tuple(techniques)))
        return tuple(out)


def _flow_record(fl: Any, prev: FlowRecord | None = None) -> FlowRecord:
    """A flow table entry as a FlowRecord; the address texts of `prev` (same key) are reused."""
    k = fl.key
    if prev is not None:
        src_mac, dst_mac, src_ip, dst_ip = prev.src_mac, prev.dst_mac, prev.src_ip, prev.dst_ip
        head = prev.head if len(prev.head) == len(fl.head) else bytes(fl.head)  # heads only ever grow
    else:
        src_mac, dst_mac, src_ip, dst_ip = mac_text(fl.src_mac), mac_text(fl.dst_mac), ip_text(k[3]), ip_text(k[4])
        head = bytes(fl.head)
    return FlowRecord(
        k[0], src_mac, dst_mac, fl.vlan, k[2], src_ip, dst_ip, k[5], k[6], k[7], fl.first, fl.last, fl.packets,
        fl.bytes, fl.flags_or, fl.syn, fl.synack, fl.rst, fl.fin, head,
    )


def _recent_flows(table: Any, since: float) -> Iterator[Any]:
    """The flows last seen at or after `since`, most recent first.

    The table lists flows least recently seen first, so walking that list backwards stops
    at the first older flow: the cost follows the recent flows, not the table's size (the
    list itself is a C-level copy of references).
    """
    for f in reversed(table.flows()):
        if f.last < since:
            return
        yield f


@dataclass(frozen=True)
class RunSummary:
    cycles: int
    alerts: int  # new and changed alerts over the run
    counters: CaptureCounters
    stopped_by: str  # "end of source", "duration", "stop"


class NetMonitor:
    """Runs the network detectors over one capture source. See the module docstring."""

    def __init__(
        self,
        source: CaptureSource,
        *,
        inventory: Inventory | None = None,
        rules: RuleSet | None = None,
        detectors: Sequence[Detector] | None = None,
        iocs: IocSet | None = None,
        payload_rules: CompiledRuleSet | None = None,
        sinks: Sequence[Sink] = (),
        limits: Limits = Limits(),
        live: bool | None = None,
        name: str | None = None,
        table: FlowTable | None = None,
    ) -> None:
        from sva.net.fastpath import FastPath
        from sva.net.flows import FlowTable

        self.source = source
        self.limits = limits
        self.live = live if live is not None else not _is_file_source(source.name)
        self.learner = Learner(inventory or Inventory())
        self.observations = Observations(self.learner, limits.max_records)
        self.deep = DeepDecoder(self.observations)
        self.fastpath = FastPath(deep=self.deep, table=table if table is not None else FlowTable())
        self.iocs = iocs if iocs is not None else IocSet()
        self.payload = PayloadScanner(payload_rules)
        self._flow_cache: dict[Any, tuple[int, int, FlowRecord]] = {}
        self.window = NetWindow(0.0, 0.0)
        self._payload_matches: tuple[PayloadMatch, ...] | None = None
        self._inventory = self.learner.inventory  # the one the cycle in progress sees
        rules = rules if rules is not None else load_network_rules()
        detectors = list(detectors) if detectors is not None else default_network_detectors()
        facts = FactRegistry([
            FunctionProvider("net_window", lambda ctx: self.window, consistent=False,
                             description="sva.net.model.NetWindow: the recent horizon's observations"),
            FunctionProvider("net_inventory", lambda ctx: self._inventory, consistent=False,
                             description="sva.net.inventory.Inventory: VMs, gateways, learned bindings"),
            FunctionProvider("net_iocs", lambda ctx: self.iocs, consistent=False,
                             description="sva.net.ioc.IocSet: the indicator lists in force"),
            FunctionProvider("net_payload_matches", self._payload_fact, consistent=False,
                             description="tuple[PayloadMatch, ...]: network YARA hits on flow payload heads"),
        ])  # fmt: skip
        vm = VmIdentity(name=name or f"net:{source.name}", target=source.name)
        bundle = payload_rules.fingerprint[:16] if payload_rules is not None else "none"
        # Alert times follow the capture's clock: a pcap's alerts say when things happened in it.
        self.engine = Engine(vm, rules=rules, detectors=detectors, facts=facts, sinks=sinks,
                             signature_bundle=f"network:{bundle}", clock=self.now)  # fmt: skip
        self.started = time.monotonic()
        self._next_cycle: float | None = None
        self.windows_truncated = 0
        self.cycles_skipped = 0  # live windows replaced by a newer one while detection was busy

    # -- facts ------------------------------------------------------------------------------
    def _payload_fact(self, ctx: FactContext) -> tuple[PayloadMatch, ...]:
        if self._payload_matches is None:
            self._payload_matches = self.payload.matches(self.window.flows, self.limits.max_payload_scans)
        return self._payload_matches

    # -- windows and cycles ----------------------------------------------------------------
    def now(self) -> float:
        return time.time() if self.live else self.fastpath.last_ts

    def counters(self) -> CaptureCounters:
        s = self.source.stats()
        fp = self.fastpath
        return CaptureCounters(
            source=s.source, packets=s.packets, bytes=s.bytes, kernel_drops=s.kernel_drops, ring_drops=s.ring_drops,
            truncated=s.truncated, malformed=fp.malformed, non_ip=fp.non_ip, fragments=fp.fragments,
            vlan_tagged=fp.vlan_tagged, flows_evicted=fp.table.evicted, deep_errors=self.deep.errors + fp.deep_errors,
            records_dropped=self.observations.dropped, windows_truncated=self.windows_truncated, elapsed=s.elapsed,
            malformed_reasons=tuple(sorted(fp.malformed_reasons.items())),
        )  # fmt: skip

    def build_window(self, end: float) -> NetWindow:
        since = end - self.limits.horizon
        self.fastpath.table.expire(end)
        obs = self.observations
        obs.prune(since)
        cache = self._flow_cache
        fresh: dict[Any, tuple[int, int, FlowRecord]] = {}
        flows: list[FlowRecord] = []
        for fl in _recent_flows(self.fastpath.table, since):
            if len(flows) >= self.limits.max_window_flows:
                self.windows_truncated += 1  # counted and shown in the statistics, never silent
                log.warning("window at %.3f: more than %d recent flows; the older ones are not checked",
                            end, self.limits.max_window_flows)  # fmt: skip
                break
            hit = cache.get(fl.key)
            if hit is not None and hit[0] == fl.packets and hit[1] == len(fl.head):
                rec = hit[2]
            else:
                rec = _flow_record(fl, hit[2] if hit is not None else None)
            fresh[fl.key] = (fl.packets, len(fl.head), rec)
            flows.append(rec)
        self._flow_cache = fresh
        return NetWindow(
            start=since, end=end, flows=tuple(flows), arp=tuple(obs.arp), dns=tuple(obs.dns), tls=tuple(obs.tls),
            http=tuple(obs.http), dhcp=tuple(obs.dhcp), counters=self.counters(), dropped_records=obs.dropped,
        )  # fmt: skip

    def cycle(self) -> CycleReport:
        """Build a window and run the detectors on it, in this thread."""
        return self.detect(self.build_window(self.now()), self.learner.inventory)

    def detect(self, window: NetWindow, inventory: Inventory) -> CycleReport:
        """Run the detectors on a window built earlier (immutable, like the inventory)."""
        self.window, self._inventory, self._payload_matches = window, inventory, None
        return self.engine.run_cycle()

    def feed(self, batch: list[Any], on_cycle: Callable[[], None]) -> None:
        """Process one batch, running a cycle whenever an interval has passed.

        A live source's interval is wall time, checked after the batch. A file's is capture
        time: the batch is split where it crosses the next cycle's time, so a pcap read in
        one big batch still gets a cycle per interval of its own timeline.
        """
        interval = self.limits.interval
        if self.live:
            if batch:
                self.fastpath.process(batch)
            t = time.monotonic()
            if self._next_cycle is None:
                self._next_cycle = t + interval
            elif t >= self._next_cycle:
                on_cycle()
                spent = time.monotonic() - t
                self._next_cycle = t + max(interval, spent / self.limits.max_cycle_share)
            return
        i, n = 0, len(batch)
        while i < n:
            if self._next_cycle is None:
                self._next_cycle = batch[i][0] + interval
            j = i
            while j < n and batch[j][0] < self._next_cycle:
                j += 1
            if j > i:
                self.fastpath.process(batch[i:j])
            if j < n:
                on_cycle()
                # Quiet gaps in a capture get one cycle, not one per empty interval.
                self._next_cycle = max(self._next_cycle + interval, batch[j][0])
                if self._next_cycle == batch[j][0]:
                    self._next_cycle += interval
            i = j

    def run(
        self,
        stop: threading.Event | None = None,
        *,
        duration: float | None = None,
        on_report: Callable[[CycleReport], None] | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> RunSummary:
        """Capture until the source ends, `duration` seconds pass, or `stop` is set; a
        cycle every interval and a last one at the end. `on_idle` runs after every batch
        (the CLI prints statistics there when asked by SIGUSR1)."""
        stop = stop if stop is not None else threading.Event()
        deadline = time.monotonic() + duration if duration is not None else None
        cycles = alerts = 0
        stopped_by = "end of source"
        count_lock = threading.Lock()

        def report_cycle(report: CycleReport) -> None:
            nonlocal cycles, alerts
            with count_lock:
                cycles += 1
                alerts += len(report.new) + len(report.changed)
            if on_report is not None:
                on_report(report)

        # Live: the reader thread only builds windows (a snapshot of flows and records);
        # the detectors run in their own thread, so a slow cycle never stops the reading
        # and the capture ring never overflows because of it. A window that waits while
        # the previous one is still being checked is replaced by the next (it covers the
        # same horizon and more); that is counted in `cycles_skipped`.
        checker = _WindowChecker(self, report_cycle) if self.live else None

        def one_cycle() -> None:
            if checker is not None:
                checker.submit(self.build_window(self.now()), self.learner.inventory)
            else:
                report_cycle(self.cycle())

        try:
            for batch in self.source.batches(stop, timeout=min(0.2, self.limits.interval)):
                self.feed(batch, one_cycle)
                if on_idle is not None:
                    on_idle()
                if deadline is not None and time.monotonic() >= deadline:
                    stopped_by = "duration"
                    break
                if stop.is_set():
                    stopped_by = "stop"
                    break
            else:
                if stop.is_set():
                    stopped_by = "stop"
            if checker is not None:
                checker.close()  # let the cycle in progress finish; the last one runs here
                checker = None
            one_cycle()
        finally:
            if checker is not None:
                checker.close()
            self.source.close()
            self.engine.close()
        return RunSummary(cycles, alerts, self.counters(), stopped_by)


class _WindowChecker:
    """A thread that runs the detectors on the newest submitted window (one pending at most)."""

    def __init__(self, monitor: NetMonitor, on_report: Callable[[CycleReport], None]) -> None:
        self.monitor = monitor
        self.on_report = on_report
        self._cond = threading.Condition()
        self._pending: tuple[NetWindow, Inventory] | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"sva-net-detect:{monitor.source.name}", daemon=True)
        self._thread.start()

    def submit(self, window: NetWindow, inventory: Inventory) -> None:
        with self._cond:
            if self._pending is not None:
                self.monitor.cycles_skipped += 1
            self._pending = (window, inventory)
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                if self._pending is None:
                    return
                window, inventory = self._pending
                self._pending = None
            try:
                self.on_report(self.monitor.detect(window, inventory))
            except Exception:  # noqa: BLE001 - the engine reports detector failures itself; this is a bug
                log.exception("network detection cycle failed")

    def close(self) -> None:
        """Finish the pending window and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()


def _is_file_source(name: str) -> bool:
    return name.startswith("pcap:") or name.endswith((".pcap", ".pcapng", ".cap"))
