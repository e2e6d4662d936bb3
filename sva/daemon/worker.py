"""One VM's detection loop in its own thread: attach → cycles → reattach, never dying.

Threads, not processes (docs/admin.md, "Why threads"): the workers share one bus
publisher, one compiled signature set and the detector code, which keeps the per-VM
memory small; the heavy parts of a cycle (YARA, reading the RAM mapping) release the GIL;
a native backend that can crash the process (LibVMI) already runs in a child of its own
(sva.vmi.libvmi_worker). A slow VM only delays its own thread: nobody waits for it.

States and the health events (`sva.health.vmi`, details.reason, details.vm) on changes:
  unreachable   cannot open the target, or a cycle could not freeze/read it (error)
  reattached    reachable again, or restarted: a new backend and a new GuestSession,
                so a new boot gets new symbols (ok)
  destroyed     its QMP socket has been missing for `gone_after` seconds (error); an
                explicit target is then checked every 10 x `retry` in case it comes back
  over-budget   a cycle took more than interval x cpu_budget, so cycles are spread out to
                keep within the budget (warning; once per episode, "within-budget" after)
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sva.bus.event import Event, EventType
from sva.daemon.config import TargetConfig
from sva.daemon.metrics import Metrics
from sva.errors import SvaError

log = logging.getLogger("sva.daemon.worker")
_REATTACH_DEGRADED_S = 10.0
VIEW_CHECK_S = 2.0  # how often a worker checks that its context still reads the running kernel


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    ATTACHED = "attached"
    UNREACHABLE = "unreachable"
    DESTROYED = "destroyed"
    STOPPED = "stopped"


class SharedSink:
    """The daemon's one BusPublisher as an engine sink: the engine closes its sinks when it
    is dropped, the shared publisher must stay open for the others."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def publish(self, event_type: EventType | str, payload: Mapping[str, Any]) -> Event:
        return self._target.publish(event_type, payload)  # type: ignore[no-any-return]

    def publish_many(self, events: Any) -> list[Event]:
        return self._target.publish_many(events)  # type: ignore[no-any-return]

    def close(self) -> None:
        pass


def socket_path(uri: str) -> Path | None:
    """The QMP socket a target lives on (None: not socket-based, or a lab that is gone)."""
    scheme, _, rest = uri.partition(":")
    if scheme == "qemu":
        return Path(rest)
    if scheme == "lab":
        from sva import lab

        try:
            return Path(lab.get(rest).qmp_path)
        except SvaError:
            return Path("/nonexistent") / rest  # no such lab: counts as missing
    return None


def _identity(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class ServiceThread:
    """A part of the daemon that runs `_main` in a thread of its own until `stop()`."""

    def __init__(self, thread_name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=thread_name, daemon=True)

    def _main(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class VmWorker(ServiceThread):
    """Runs Engine cycles on one target until stopped (see the module docstring)."""

    def __init__(self, target: TargetConfig, *, sink: Any, metrics: Metrics, rules: Callable[[], Any] | None,
                 signature_version: Callable[[], str], on_destroyed: Callable[[VmWorker], None] | None = None
                 ) -> None:  # fmt: skip
        self.target = target
        self.name = target.name
        self._sink = SharedSink(sink)
        self._metrics = metrics
        self._rules = rules
        self._sig_version = signature_version
        self._on_destroyed = on_destroyed
        super().__init__(f"sva-vm-{self.name}")
        self.state = WorkerState.STARTING
        self.cycles = 0
        self.attaches = 0
        self._engine: Any = None
        self._session: Any = None
        self._view_checked = 0.0
        self._backend: Any = None
        self._ident: tuple[int, int] | None = None
        self._over_budget = False
        self._want_rules = threading.Event()
        self.forgotten = False  # set by the supervisor for a destroyed discovered VM
        self._degraded = 0  # cycles in a row where a detector could not run
        self._attached_at = 0.0

    # -- control --------------------------------------------------------------------------
    def reload_rules(self) -> None:
        """Re-read the rule files before the next cycle (SIGHUP); a bad file keeps the old set."""
        self._want_rules.set()

    # -- the loop ---------------------------------------------------------------------------
    def _main(self) -> None:
        labels = {"vm": self.name}
        self._metrics.set("sva_vm_up", 0, **labels)
        try:
            self._loop()
        except Exception:
            log.exception("worker for %s failed", self.name, extra={"event": labels})
        finally:
            self._detach()
            if self.forgotten:  # destroyed and dropped by the supervisor: no series left behind
                self._metrics.remove(**labels)
            else:
                self._metrics.set("sva_vm_up", 0, **labels)
            self.state = WorkerState.STOPPED if self.state is not WorkerState.DESTROYED else self.state

    def _loop(self) -> None:
        scan = self.target.scan
        missing_since: float | None = None
        while not self._stop.is_set():
            if self._engine is None:
                try:
                    self._attach()
                except SvaError as e:
                    now = time.monotonic()
                    gone = socket_path(self.target.uri) is not None and _identity(socket_path(self.target.uri)) is None
                    missing_since = (missing_since or now) if gone else None
                    if missing_since is not None and now - missing_since >= scan.gone_after:
                        if self.state is not WorkerState.DESTROYED:
                            self._set_state(WorkerState.DESTROYED, "error",
                                            f"{self.name}: gone ({e}); no longer monitored", str(e))  # fmt: skip
                            if self._on_destroyed is not None:
                                self._on_destroyed(self)
                        self._stop.wait(scan.retry * 10)
                    else:
                        if self.state not in (WorkerState.UNREACHABLE, WorkerState.DESTROYED):
                            self._set_state(WorkerState.UNREACHABLE, "error", f"{self.name}: unreachable: {e}", str(e))
                        self._stop.wait(scan.retry)
                    continue
                missing_since = None
                if self.attaches > 1 or self.state in (WorkerState.UNREACHABLE, WorkerState.DESTROYED):
                    self._set_state(WorkerState.ATTACHED, "ok", f"{self.name}: reattached ({self.target.uri})")
                else:
                    self.state = WorkerState.ATTACHED
                    log.info("monitoring %s", self.name, extra={"event": {"vm": self.name, "uri": self.target.uri}})
                self._metrics.set("sva_vm_up", 1, vm=self.name)
            if self._ident is not None and _identity(socket_path(self.target.uri)) != self._ident:
                log.info("%s: its QEMU was restarted, reattaching", self.name, extra={"event": {"vm": self.name}})
                self._detach()
                continue
            if self._want_rules.is_set():
                self._reload_rules()
            self._cycle(scan.interval, scan.cpu_budget)

    def _cycle(self, interval: float, budget: float) -> None:
        t0 = time.monotonic()
        try:
            report = self._engine.run_cycle()
        except Exception as e:
            log.exception("%s: cycle failed", self.name, extra={"event": {"vm": self.name}})
            self._metrics.inc("sva_vm_errors_total", vm=self.name)
            self._detach()
            self._set_state(WorkerState.UNREACHABLE, "error", f"{self.name}: cycle failed: {e}", str(e))
            self._stop.wait(self.target.scan.retry)
            return
        took = time.monotonic() - t0
        self._release_mapping()
        self.cycles += 1
        m, vm = self._metrics, self.name
        m.inc("sva_vm_cycles_total", vm=vm)
        m.inc("sva_vm_cycle_seconds_total", took, vm=vm)
        m.set("sva_vm_last_cycle_seconds", took, vm=vm)
        if report.pause_seconds is not None:
            m.inc("sva_vm_pause_seconds_total", report.pause_seconds, vm=vm)
            m.set("sva_vm_last_pause_seconds", report.pause_seconds, vm=vm)
        for alert in (*report.new, *report.changed):
            sev = alert.finding.severity
            m.inc("sva_vm_findings_total", vm=vm, severity=getattr(sev, "label", str(sev)))
        errors = sum(1 for h in report.health if h.status.value == "error")
        if errors or report.error:
            m.inc("sva_vm_errors_total", max(errors, 1), vm=vm)
        if report.new or report.changed:
            log.info("%s: cycle %d: %d new, %d changed alert(s)", vm, report.cycle, len(report.new),
                     len(report.changed), extra={"event": {"vm": vm, "cycle": report.cycle}})  # fmt: skip
        if report.error:
            self._detach()
            self._set_state(WorkerState.UNREACHABLE, "error", f"{vm}: cycle failed: {report.error}", report.error)
            self._stop.wait(self.target.scan.retry)
            return
        if any(h.details.get("reason") == "reboot" for h in report.health):
            self._detach()  # a new boot: new symbols and context on the next attach
            return
        if self._stale_view():
            self._detach()
            return
        # Attached while the guest was still booting, the symbols/context can be unusable
        # for good (page tables of early boot): a fresh session fixes that. Bounded: at
        # most once per _REATTACH_DEGRADED_S, for a detector that can never run here.
        self._degraded = self._degraded + 1 if any(r.status != "ok" for r in report.detectors) else 0
        if self._degraded >= 2 and time.monotonic() - self._attached_at >= _REATTACH_DEGRADED_S:
            failing = ", ".join(f"{r.detector}: {r.message}" for r in report.detectors if r.status != "ok")
            log.warning("%s: detectors cannot run (%s); attaching afresh", vm, failing[:300],
                        extra={"event": {"vm": vm, "reason": "degraded"}})  # fmt: skip
            self._detach()
            return
        self._budget(took, interval, budget)
        self._stop.wait(max(0.0, max(interval, took / budget) - took))

    def _stale_view(self) -> bool:
        """Every VIEW_CHECK_S: are the kernel page tables this context reads still the ones
        the vCPU uses? A reset keeps RAM: a context of the last boot can go on reading its
        leftovers, a consistent picture of a kernel that no longer runs. The kernel half of
        CR3's top-level table tells (as at attach); a mismatch means attach afresh."""
        if self._session is None or time.monotonic() - self._view_checked < VIEW_CHECK_S:
            return False
        self._view_checked = time.monotonic()
        try:
            if self._session.reads_running_kernel():
                return False
        except SvaError as e:  # registers unreadable now: the next cycle will tell
            log.debug("%s: page table check: %s", self.name, e)
            return False
        log.info("%s: the kernel's page tables changed under the context (a reset?); attaching afresh", self.name,
                 extra={"event": {"vm": self.name, "reason": "stale-view"}})  # fmt: skip
        return True

    def _release_mapping(self) -> None:
        """The guest RAM pages this cycle's sweeps mapped count in the daemon's RSS until
        dropped; dropping costs ~2 ms per fully mapped 256 MiB and the next sweep's page
        faults ~10 ms, against ~1 s for the sweep itself."""
        from sva.guest.facts import release_resident

        try:
            release_resident(self._backend)
        except SvaError as e:
            log.debug("%s: %s", self.name, e)

    def _budget(self, took: float, interval: float, budget: float) -> None:
        over = took / budget > interval
        if over == self._over_budget:
            return
        self._over_budget = over
        if over:
            message = (f"{self.name}: cycle took {took:.2f} s, over its budget of {budget:g} x {interval:g} s; "
                       f"next cycle in {took / budget:.2f} s")  # fmt: skip
            self._health("engine", "warning", message, "over-budget", seconds=round(took, 3))
            self._metrics.inc("sva_vm_over_budget_total", vm=self.name)
        else:
            self._health("engine", "ok", f"{self.name}: cycles within budget again", "within-budget")

    def _reload_rules(self) -> None:
        from sva.engine.ruleload import load_rules
        from sva.engine.rules import default_rules_dir

        self._want_rules.clear()
        try:
            self._engine.set_rules(load_rules(*(list(self.target.scan.rules) or [default_rules_dir()])))
        except SvaError as e:
            self._health("engine", "error", f"{self.name}: rules not reloaded, the old ones are kept: {e}",
                         "rules-refused")  # fmt: skip

    # -- attach / detach ---------------------------------------------------------------------
    def _attach(self) -> None:
        from sva.engine.scan_cli import assemble_engine
        from sva.guest.memscan import YaraMemoryScan
        from sva.sigs.active import rules_for_scan
        from sva.vmi import open_target

        scan = self.target.scan
        rules = rules_for_scan(scan.signatures) if scan.signatures else self._rules
        ident = _identity(socket_path(self.target.uri))
        backend = open_target(self.target.uri)
        try:
            if scan.resume_paused:
                self._resume_if_paused(backend)
            engine, session = assemble_engine(
                self.target.uri, backend, [self._sink], vm_name=self.name, rules=[str(r) for r in scan.rules],
                detectors=list(scan.detectors) or None, signature_scan=YaraMemoryScan(rules=rules, min_interval=scan.yara_period),
                sweep_every=scan.sweep_every, signature_bundle=self._sig_version,
            )  # fmt: skip
        except BaseException:
            backend.close()
            raise
        self._backend, self._engine, self._ident = backend, engine, ident
        self._session, self._view_checked = session, time.monotonic()
        self._degraded, self._attached_at = 0, time.monotonic()
        self.attaches += 1
        self._metrics.inc("sva_vm_attaches_total", vm=self.name)

    def _resume_if_paused(self, backend: Any) -> None:
        """sva pauses a guest only inside a cycle and always resumes it, unless it was killed
        (SIGKILL, OOM) in that window: a guest found paused is resumed, with a health event.
        Hosts where admins pause VMs by hand set resume_paused = false."""
        qmp = getattr(backend, "qmp", None)
        if qmp is None:
            return
        status = qmp.execute("query-status")
        if isinstance(status, dict) and status.get("status") == "paused":
            backend.resume()
            self._health("vmi", "warning", f"{self.name}: found paused at attach (left by an earlier sva?); resumed",
                         "resumed-paused")  # fmt: skip

    def _detach(self) -> None:
        engine, backend = self._engine, self._backend
        self._engine = self._backend = self._session = None
        self._ident = None
        self._metrics.set("sva_vm_up", 0, vm=self.name)
        if engine is not None:
            engine.close()
        if backend is not None:
            try:
                backend.close()
            except Exception as e:  # noqa: BLE001 - the VM may be gone; nothing more to do
                log.debug("%s: closing backend: %s", self.name, e)

    # -- events ------------------------------------------------------------------------------
    def _set_state(self, state: WorkerState, status: str, message: str, error: str = "") -> None:
        self.state = state
        reason = "reattached" if state is WorkerState.ATTACHED else state.value
        extra = {"error": error} if error else {}
        self._health("vmi", status, message, reason, **extra)

    def _health(self, component: str, status: str, message: str, reason: str, **details: Any) -> None:
        payload = {"component": component, "status": status, "message": message,
                   "details": {"reason": reason, "vm": self.name, "target": self.target.uri, **details}}  # fmt: skip
        level = logging.ERROR if status == "error" else logging.WARNING if status == "warning" else logging.INFO
        log.log(level, message, extra={"event": {"vm": self.name, "reason": reason}})
        try:
            self._sink.publish("health", payload)
        except SvaError as e:
            log.error("%s: health event not published: %s", self.name, e)
