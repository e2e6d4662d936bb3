"""The daemon: one bus publisher, one worker thread per VM, the network monitors, the
signature refresher, VM discovery and the metrics endpoint — started, reloaded and
stopped together.

    d = Daemon(config.load("/etc/sva/sva.toml"))
    d.start()
    d.reload()          # SIGHUP: re-read the file; apply what changed, keep the rest running
    d.shutdown()        # SIGTERM: workers finish their cycle (guests thawed), journal closed

`reload` compares the new config with the running one by name: a target or network source
whose settings changed is restarted, a removed one stopped, a new one started, the others
keep running (and re-read their rule files at their next cycle). A config that does not
load is refused with a `sva.health.daemon` error event and the old one stays in force.
A changed `[bus]` (endpoints, keys, journal settings) replaces the publisher behind the
`BusHandle` every part publishes through: the journal carries on, so sequence numbers
continue on the new endpoints and subscribers fill any gap from its replay endpoint. A
changed `[metrics]` (or management address) moves the metrics endpoint. If the new
endpoint cannot be bound, the old one is restored and the reload reported as an error.
`[appliance]` name, log format and level need a restart (logged).
"""

from __future__ import annotations

import glob
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sva.daemon.config import DaemonConfig, NetworkConfig, TargetConfig, default_name, load
from sva.daemon.metrics import Metrics, MetricsServer, MetricType
from sva.daemon.worker import ServiceThread, SharedSink, VmWorker
from sva.errors import BusError, SvaError

log = logging.getLogger("sva.daemon")
_STOP_WAIT_S = 30.0  # per shutdown: a worker in a cycle finishes it (and thaws its guest) first
_MAX_DISCOVERED = 1024


def _families(m: Metrics) -> None:
    c, g = MetricType.COUNTER, MetricType.GAUGE
    for name, kind, text in (
        ("sva_vm_up", g, "1 while the VM is attached and scanned"),
        ("sva_vm_cycles_total", c, "detection cycles run"),
        ("sva_vm_cycle_seconds_total", c, "wall seconds spent in cycles"),
        ("sva_vm_last_cycle_seconds", g, "wall seconds of the last cycle"),
        ("sva_vm_pause_seconds_total", c, "seconds the guest was paused for consistent reads"),
        ("sva_vm_last_pause_seconds", g, "seconds the guest was paused in the last cycle"),
        ("sva_vm_findings_total", c, "new and changed alerts, by severity"),
        ("sva_vm_errors_total", c, "cycles with errors (unreachable guest, failed detector or sink)"),
        ("sva_vm_attaches_total", c, "times the VM was (re)attached"),
        ("sva_vm_over_budget_total", c, "episodes of cycles over the CPU budget"),
        ("sva_net_packets_total", c, "packets captured by a network source"),
        ("sva_net_drops_total", c, "packets dropped by the kernel or the capture ring"),
        ("sva_net_findings_total", c, "new and changed network alerts"),
        ("sva_bus_latest_seq", g, "sequence number of the last event published"),
        ("sva_bus_journal_bytes", g, "bytes in the bus journal"),
        ("sva_signature_version", g, "version of the signature bundle in force (0: built-in)"),
        ("sva_signature_info", g, "the signature bundle in force, as a label"),
        ("sva_daemon_uptime_seconds", g, "seconds since the daemon started"),
        ("sva_daemon_reloads_total", c, "configuration reloads, by result"),
    ):
        m.family(name, kind, text)


class NetService(ServiceThread):
    """One NetMonitor on one source in a thread; reopens the source when it fails."""

    def __init__(self, cfg: NetworkConfig, *, sink: Any, metrics: Metrics, retry: float = 2.0) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._sink = SharedSink(sink)
        self._metrics = metrics
        self._retry = retry
        super().__init__(f"sva-net-{cfg.name}")
        self.monitor: Any = None
        self._base = (0, 0)  # counters of earlier (failed) monitors: totals stay monotonic

    def counters(self) -> tuple[int, int]:
        mon = self.monitor
        if mon is None:
            return self._base
        c = mon.counters()
        return self._base[0] + c.packets, self._base[1] + c.kernel_drops + c.ring_drops

    def _main(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.monitor = self._open()
                if failing:
                    self._health("ok", f"network {self.name}: capturing again", "reattached")
                failing = False
                self.monitor.run(self._stop, on_report=self._on_report)
            except SvaError as e:
                if not failing:
                    self._health("error", f"network {self.name}: {e}", "unreachable")
                failing = True
            except Exception as e:
                log.exception("network %s failed", self.name)
                self._health("error", f"network {self.name}: {type(e).__name__}: {e}", "failed")
                failing = True
            finally:
                self._base = self.counters()
                self.monitor = None
            self._stop.wait(self._retry)

    def _open(self) -> Any:
        from sva.engine.registry import load_detectors
        from sva.net.capture import open_source
        from sva.net.cli import _active_signatures, _inventory
        from sva.net.ioc import load_iocs
        from sva.net.monitor import Limits, NetMonitor, load_network_rules
        from sva.scan.rules import CompiledRuleSet, signatures_dir

        cfg = self.cfg
        lab_name = None
        if cfg.source.startswith("lab:"):
            from sva import lab

            lab_name = cfg.source[4:]
            source = open_source(f"qemu-mirror:{lab.get(lab_name).mirror_path}")
        else:
            source = open_source(cfg.source)
        try:
            sig_dir = _active_signatures() or signatures_dir()
            return NetMonitor(
                source, inventory=_inventory(list(cfg.inventory), lab_name),
                rules=load_network_rules([str(r) for r in cfg.rules] or None),
                detectors=load_detectors(list(cfg.detectors)) if cfg.detectors else None,
                iocs=load_iocs(sig_dir / "ioc") if (sig_dir / "ioc").is_dir() else None,
                payload_rules=CompiledRuleSet.load(sig_dir / "network") if (sig_dir / "network").is_dir() else None,
                sinks=[self._sink], limits=Limits(interval=cfg.interval, horizon=cfg.horizon),
                name=f"net:{cfg.name}",
            )  # fmt: skip
        except BaseException:
            source.close()  # a mirror socket left unread would stall the guest's NIC
            raise

    def _on_report(self, report: Any) -> None:
        n = len(report.new) + len(report.changed)
        if n:
            self._metrics.inc("sva_net_findings_total", n, source=self.name)
            log.info("network %s: %d new or changed alert(s)", self.name, n, extra={"event": {"source": self.name}})

    def _health(self, status: str, message: str, reason: str) -> None:
        log.log(logging.ERROR if status == "error" else logging.INFO, message,
                extra={"event": {"source": self.name, "reason": reason}})  # fmt: skip
        try:
            self._sink.publish("health", {"component": "net", "status": status, "message": message,
                                          "details": {"reason": reason, "source": self.cfg.source}})  # fmt: skip
        except SvaError as e:
            log.error("health event not published: %s", e)


class BusHandle:
    """The daemon's bus as every part holds it: the current BusPublisher behind a lock, so
    a reload can replace the publisher (new endpoints or keys) under the workers, network
    monitors and refresher without their noticing. Publishing waits while it is replaced;
    with no publisher at all (the old one could not be bound again) it raises BusError,
    which the engine treats as a refused event: kept and sent again next cycle."""

    def __init__(self, publisher: Any) -> None:
        self._pub: Any = publisher
        self._lock = threading.RLock()

    def _current(self) -> Any:
        if self._pub is None:
            raise BusError("the bus publisher is down after a failed reload; restart sva")
        return self._pub

    def publish(self, event_type: Any, payload: Any) -> Any:
        with self._lock:
            return self._current().publish(event_type, payload)

    def publish_many(self, events: Any) -> Any:
        with self._lock:
            return self._current().publish_many(events)

    def __getattr__(self, name: str) -> Any:  # endpoint, latest_seq, journal, …
        return getattr(self._current(), name)

    def replace(self, make: Any, config: Any) -> None:
        """Close the publisher and open `make(config)`; if that fails, reopen one with the
        old config and re-raise (the journal is closed and reopened either way)."""
        with self._lock:
            old = self._current()
            old.close()
            try:
                self._pub = make(config)
            except BaseException:
                self._pub = None
                try:
                    self._pub = make(old.config)
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    log.exception("could not reopen the bus with its previous settings")
                raise

    def close(self) -> None:
        with self._lock:
            if self._pub is not None:
                self._pub.close()
                self._pub = None


class Daemon:
    """See the module docstring."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        _families(self.metrics)
        self.bus: Any = None
        self.metrics_server: MetricsServer | None = None
        self.active: Any = None
        self.workers: dict[str, VmWorker] = {}
        self.net: dict[str, NetService] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = time.time()

    # -- start / stop -------------------------------------------------------------------------
    def start(self) -> None:
        from sva.bus.publisher import BusPublisher
        from sva.sigs.active import ActiveRules
        from sva.sigs.store import SignatureStore, default_store_dir

        cfg = self.config
        sigs_dir = cfg.signatures.state_dir if cfg.signatures is not None else default_store_dir()
        self.active = ActiveRules(SignatureStore(sigs_dir))
        self.bus = BusHandle(BusPublisher(cfg.bus))
        try:
            if cfg.metrics.enabled:
                self.metrics_server = MetricsServer(self.metrics, cfg.metrics_address, cfg.metrics.port)
            self.metrics.collector(self._live_metrics)
            self._start_refresher()
            for n in cfg.network:
                self._start_net(n)
            for t in cfg.targets:
                self._start_worker(t)
            if cfg.discovery.enabled:
                self._spawn(self._discovery_loop, "sva-discovery")
        except BaseException:
            self.shutdown()
            raise
        where = self.metrics_server.url if self.metrics_server else "off"
        self.health("ok", f"sva daemon started: {len(cfg.targets)} target(s), {len(cfg.network)} network "
                    f"source(s), bus {self.bus.endpoint}, metrics {where}", "started")  # fmt: skip

    def shutdown(self) -> bool:
        """Stop everything; True when every thread ended in time."""
        self._stop.set()
        self._refresher_stop.set()
        with self._lock:
            parts: list[VmWorker | NetService] = [*self.workers.values(), *self.net.values()]
        for w in parts:
            w.stop()
        deadline = time.monotonic() + _STOP_WAIT_S
        # a list, not a generator: every one is joined even after one timed out
        clean = all([w.join(max(0.1, deadline - time.monotonic())) for w in parts])  # noqa: C419
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        if not clean:
            log.error("some workers did not stop within %.0f s", _STOP_WAIT_S)
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.bus is not None:
            self.health("ok", "sva daemon stopping", "stopping")
            self.bus.close()
            self.bus = None
        log.info("sva daemon stopped", extra={"event": {"clean": clean}})
        return clean

    # -- reload -------------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the config file and apply it (see the module docstring); False if refused."""
        try:
            new = load(self.config.path)
        except SvaError as e:
            self.metrics.inc("sva_daemon_reloads_total", result="refused")
            self.health("error", f"configuration reload refused, the running one is kept: {e}", "reload-refused")
            return False
        old = self.config
        if new.appliance != old.appliance:
            log.warning("[appliance] changed: takes effect at the next restart")
        try:
            self._move_endpoints(old, new)
        except SvaError as e:
            self.metrics.inc("sva_daemon_reloads_total", result="refused")
            self.health("error", f"configuration reload refused, the running one is kept: {e}", "reload-refused")
            return False
        self.config = new
        with self._lock:
            running = {n: w for n, w in self.workers.items() if not w.target.discovered}
            nets = dict(self.net)
        wanted = {t.name: t for t in new.targets}
        for name, w in running.items():
            if wanted.get(name) != w.target:
                self._stop_worker(name)
        for name, t in wanted.items():
            if name not in running or running[name].target != t:
                self._stop_worker(name)  # a discovered VM of that name gives way to the explicit target
                self._start_worker(t)
            else:
                running[name].reload_rules()
        nwanted = {n.name: n for n in new.network}
        for name, s in nets.items():
            if nwanted.get(name) != s.cfg:
                s.stop()
                s.join(10)
                with self._lock:
                    self.net.pop(name, None)
        for name, n in nwanted.items():
            if name not in nets or nets[name].cfg != n:
                self._start_net(n)
        if new.signatures != old.signatures:
            self._refresher_stop.set()
            self._refresher_stop = threading.Event()
            self._start_refresher()
        self.metrics.inc("sva_daemon_reloads_total", result="applied")
        self.health("ok", f"configuration reloaded: {len(new.targets)} target(s), {len(new.network)} network "
                    "source(s)", "reloaded")  # fmt: skip
        return True

    def _move_endpoints(self, old: DaemonConfig, new: DaemonConfig) -> None:
        """Rebind the bus and the metrics endpoint if their settings changed; on failure
        the old ones are back in place and the error is raised."""
        from sva.bus.publisher import BusPublisher

        if new.bus != old.bus and self.bus is not None:
            try:
                self.bus.replace(BusPublisher, new.bus)
            except (SvaError, OSError) as e:
                raise SvaError(f"[bus]: {e}") from None
            log.info("bus moved to %s", self.bus.endpoint, extra={"event": {"reason": "bus-moved"}})
        if (new.metrics, new.metrics_address) != (old.metrics, old.metrics_address):
            previous = self.metrics_server
            if previous is not None:
                previous.close()
            self.metrics_server = None
            try:
                if new.metrics.enabled:
                    self.metrics_server = MetricsServer(self.metrics, new.metrics_address, new.metrics.port)
            except (SvaError, OSError) as e:
                if old.metrics.enabled:
                    self.metrics_server = MetricsServer(self.metrics, old.metrics_address, old.metrics.port)
                if new.bus != old.bus and self.bus is not None:
                    self.bus.replace(BusPublisher, old.bus)  # all or nothing
                raise SvaError(f"[metrics]: {e}") from None

    # -- pieces -------------------------------------------------------------------------------
    def _start_worker(self, t: TargetConfig) -> None:
        w = VmWorker(t, sink=self.bus, metrics=self.metrics, rules=self.active,
                     signature_version=lambda: str(self.active.version), on_destroyed=self._destroyed)  # fmt: skip
        with self._lock:
            self.workers[t.name] = w
        w.start()

    def _stop_worker(self, name: str) -> None:
        with self._lock:
            w = self.workers.pop(name, None)
        if w is not None:
            w.stop()
            if not w.join(_STOP_WAIT_S):
                log.error("worker %s did not stop within %.0f s", name, _STOP_WAIT_S)
            self.metrics.remove(vm=name)

    def _destroyed(self, w: VmWorker) -> None:
        if w.target.discovered:  # nothing to come back to: forget it (a new socket is rediscovered)
            w.forgotten = True
            w.stop()
            with self._lock:
                if self.workers.get(w.name) is w:
                    del self.workers[w.name]
            self.metrics.remove(vm=w.name)

    def _start_net(self, n: NetworkConfig) -> None:
        s = NetService(n, sink=self.bus, metrics=self.metrics)
        with self._lock:
            self.net[n.name] = s
        s.start()

    def _start_refresher(self) -> None:
        sigs = self.config.signatures
        if sigs is None or not sigs.sources:
            return
        from sva.sigs.pipeline import Refresher

        refresher = Refresher(sigs, sink=self.bus, active=self.active)
        stop = self._refresher_stop

        def run() -> None:
            while not stop.is_set():
                try:
                    refresher.run(stop, on_result=lambda r: log.info("signatures: %s", r))
                except Exception:
                    log.exception("signature refresher failed; retrying")
                    stop.wait(60)

        self._spawn(run, "sva-sigs")

    def _spawn(self, fn: Any, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _discovery_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.discover_once()
            except Exception:
                log.exception("discovery failed")
            self._stop.wait(self.config.discovery.poll)

    def discover_once(self) -> list[str]:
        """Start a worker for each QMP socket matching the patterns that is not monitored."""
        cfg = self.config
        found: list[str] = []
        for pattern in cfg.discovery.patterns:
            found.extend(sorted(glob.glob(pattern))[:_MAX_DISCOVERED])
        with self._lock:
            watched = {w.target.uri for w in self.workers.values()}
            names = set(self.workers)
        started = []
        for path in found[:_MAX_DISCOVERED]:
            uri = f"qemu:{path}"
            if uri in watched or not Path(path).is_socket():
                continue
            name = base = default_name(uri)
            i = 2
            while name in names:
                name, i = f"{base}-{i}", i + 1
            names.add(name)
            log.info("discovered %s at %s", name, path, extra={"event": {"vm": name, "uri": uri}})
            self._start_worker(TargetConfig(name=name, uri=uri, scan=cfg.defaults, discovered=True))
            started.append(name)
        return started

    def _live_metrics(self) -> Iterable[tuple[str, dict[str, str], float]]:
        yield "sva_daemon_uptime_seconds", {}, time.time() - self.started
        bus = self.bus
        if bus is not None:
            try:
                yield "sva_bus_latest_seq", {}, bus.latest_seq
                yield "sva_bus_journal_bytes", {}, bus.journal.nbytes
            except BusError:
                pass  # no publisher after a failed reload: the health log says so
        if self.active is not None:
            version = str(self.active.version)
            yield "sva_signature_version", {}, float(version) if version.isdigit() else 0.0
            yield "sva_signature_info", {"version": version}, 1.0
        with self._lock:
            nets = list(self.net.values())
        for s in nets:
            packets, drops = s.counters()
            yield "sva_net_packets_total", {"source": s.name}, packets
            yield "sva_net_drops_total", {"source": s.name}, drops

    def health(self, status: str, message: str, reason: str) -> None:
        level = logging.ERROR if status == "error" else logging.INFO
        log.log(level, message, extra={"event": {"reason": reason}})
        if self.bus is None:
            return
        try:
            self.bus.publish("health", {"component": "daemon", "status": status, "message": message,
                                        "details": {"reason": reason, "appliance": self.config.appliance.name}})  # fmt: skip
        except SvaError as e:
            log.error("health event not published: %s", e)
