"""The scan cycle: freeze → facts → detectors → stamp → suppress → dedup → publish.

    engine = Engine(vm, rules=load_rules("rules"), backend=backend,
                    facts=FactRegistry([...]), sinks=[JsonLinesSink("alerts.jsonl")])
    report = engine.run_cycle()              # one cycle, a CycleReport
    engine.run(interval=10, stop_event=ev)   # every 10 s until ev is set

One cycle, top to bottom:

0. **Live prerequisites**: facts that need no freeze but that the frozen facts read
   (`Engine.live_prerequisites`) are computed first, with the guest running. Expensive
   sweeps (all of RAM for task structures, the module area for modules) go there; the
   frozen fact re-checks only what they found, so the pause stays short.
1. **Freeze** the guest (`backend.frozen()`; a no-op for snapshots and without a backend)
   and compute, inside it, only the facts that need a consistent view of memory
   (`provider.consistent`) among those the enabled detectors need. Providers copy what
   they need into immutable values, so the guest runs again (**thaw**) as soon as they
   are done: the pause lasts as long as the memory walks, never as long as detection.
   When no enabled detector needs a consistent fact, the guest is not paused at all.
   On live backends that can copy pages (sva.vmi.pagesnap) the walks do not even run
   inside the freeze: the freeze only copies the pages the last cycle's walks read (a
   few MiB: milliseconds), and the walks read that copy with the guest running. A walk
   that reads a page outside the copy (a new process) is redone from a new copy that
   has it; after `snapshot_attempts` tries the facts are computed in a classic freeze.
2. For each detector in order: compute its remaining facts (lazily, at most once per
   cycle); skip it with a health event if one is `Unavailable`; else call it with a
   `FactView` of exactly what it declared. Any exception is a health event with the
   detector id and the exception text; the next detector runs. Wall time is measured.
3. **Stamp**: the detector id onto each finding; VM identity, cycle, times and detector,
   rule and signature versions onto the alert.
4. **Suppress**: findings matching a suppression are dropped (listed in the report).
5. **Dedup** against earlier cycles (`sva.engine.dedup`): alert only NEW and CHANGED.
6. **Publish** alerts, then health events, to every sink. A finding whose alert no sink
   took is not remembered, so it is alerted again next cycle (at least once, not lost).
   STILL_PRESENT findings are only in the CycleReport. RESOLVED ones are announced in
   one `health` event per cycle (component `engine`, `details.reason` "resolved", the
   alert uids in `details.findings`): the bus's alert schema is an OCSF finding with
   status New only, so a resolution is not sent as an alert.

Nothing in a cycle raises for a guest's or a detector's trouble: that is all in the
`CycleReport` (and published as health events). Only bugs in the engine itself raise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sva.engine.dedup import AlertTracker, Key, Observation, finding_key
from sva.engine.detector import Detector, check_detector, material_fields
from sva.engine.facts import (
    CycleFacts,
    FactRecord,
    FactRegistry,
    FactView,
    Unavailable,
    backend_fact_providers,
    provider_requires,
)
from sva.engine.model import (
    Alert,
    AlertState,
    Finding,
    HealthEvent,
    HealthStatus,
    VmIdentity,
    check_json,
)
from sva.engine.rules import RuleSet
from sva.errors import DetectorError, SvaError

if TYPE_CHECKING:
    from sva.bus.sink import Sink
    from sva.vmi.base import Backend

log = logging.getLogger("sva.engine")

# A batch the sink refused is retried event by event; after this many refusals in a row
# of one cycle's events the sink is failing, not an event: the rest wait for next cycle.
_MAX_REFUSED_ONE_BY_ONE = 3

BOOT_ID_FACT = "boot_id"
DEFAULT_PUBLISH = frozenset({AlertState.NEW, AlertState.CHANGED})


class RunStatus:
    OK = "ok"
    ERROR = "error"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class DetectorRun:
    """How one detector's call went this cycle."""

    detector: str
    version: str
    status: str  # RunStatus: ok / error / skipped
    seconds: float
    findings: int = 0
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "detector": self.detector,
            "version": self.version,
            "status": self.status,
            "seconds": round(self.seconds, 6),
            "findings": self.findings,
        }
        if self.message:
            out["message"] = self.message
        return out


@dataclass(frozen=True)
class SnapshotStats:
    """How the last cycle's short-pause copy went (see Engine._from_snapshots)."""

    pages: int  # pages copied in the last attempt
    touched: int  # pages the walks read
    missed: int  # of those, not in the copy (read live: the attempt was redone)
    attempts: int
    consistent: bool  # False: the cycle fell back to a classic freeze
    reused: int = 0  # consistent facts whose pages had not changed: last cycle's value kept


@dataclass(frozen=True)
class _Memo:
    """A consistent fact's value with what it was computed from (see Engine._collect_from)."""

    pages: frozenset[int]
    digest: bytes
    value: Any
    deps: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class SuppressedFinding:
    finding: Finding
    suppression: str  # the suppression's id

    def to_json(self) -> dict[str, Any]:
        return {"suppression": self.suppression, "finding": self.finding.to_json()}


@dataclass(frozen=True)
class CycleReport:
    """Everything one cycle did: facts, detector runs, alerts in all states, health."""

    cycle: int
    vm: VmIdentity
    started: float  # epoch seconds
    seconds: float  # wall time of the whole cycle
    pause_seconds: float | None  # how long the guest was frozen (None: not frozen)
    facts: tuple[FactRecord, ...]
    detectors: tuple[DetectorRun, ...]
    alerts: tuple[Alert, ...]  # new, changed, still_present and resolved
    suppressed: tuple[SuppressedFinding, ...]
    health: tuple[HealthEvent, ...]
    published: int  # events the sinks accepted
    error: str | None = None  # set when the cycle could not run its detectors at all

    def in_state(self, state: AlertState) -> tuple[Alert, ...]:
        return tuple(a for a in self.alerts if a.state is state)

    @property
    def new(self) -> tuple[Alert, ...]:
        return self.in_state(AlertState.NEW)

    @property
    def changed(self) -> tuple[Alert, ...]:
        return self.in_state(AlertState.CHANGED)

    @property
    def still_present(self) -> tuple[Alert, ...]:
        return self.in_state(AlertState.STILL_PRESENT)

    @property
    def resolved(self) -> tuple[Alert, ...]:
        return self.in_state(AlertState.RESOLVED)

    def run_of(self, detector: str) -> DetectorRun | None:
        return next((r for r in self.detectors if r.detector == detector), None)

    def to_json(self) -> dict[str, Any]:
        from sva.engine.report import report_json

        return report_json(self)


class Engine:
    """Runs the detectors over one guest, cycle after cycle, and publishes what changed."""

    def __init__(
        self,
        vm: VmIdentity,
        *,
        rules: RuleSet,
        detectors: Sequence[Detector] | None = None,
        facts: FactRegistry | None = None,
        backend: Backend | None = None,
        sinks: Sequence[Sink] = (),
        signature_bundle: str | Callable[[], str] = "none",
        publish_states: Iterable[AlertState] = DEFAULT_PUBLISH,
        publish_resolved: bool = True,
        max_findings_per_detector: int = 1000,
        slow_detector_seconds: float = 5.0,
        fact_time_budget: float = 60.0,
        live_prefetch: bool = True,
        snapshot_attempts: int = 3,
        clock: Callable[[], float] = time.time,
        uid_factory: Callable[[], str] | None = None,
    ) -> None:
        if detectors is None:
            from sva.engine.registry import default_detectors

            detectors = default_detectors()
        self._detectors = tuple(check_detector(d) for d in detectors)
        ids = [d.id for d in self._detectors]
        for d in self._detectors:
            if ids.count(d.id) > 1:
                raise DetectorError(d.id, "enabled twice")
        self._by_id = {d.id: d for d in self._detectors}
        self._vm = vm
        self._rules = rules
        self._facts = facts if facts is not None else FactRegistry(backend_fact_providers())
        self._backend = backend
        self._sinks = tuple(sinks)
        self._bundle = signature_bundle
        self._publish_states = frozenset(publish_states)
        self._publish_resolved = publish_resolved
        self._max_findings = max_findings_per_detector
        self._slow = slow_detector_seconds
        self._fact_budget = fact_time_budget
        # False: live prerequisites are computed inside the freeze when first read, as
        # before step 0 existed (for comparing pause times; see bench/bench_scan.py).
        self._live_prefetch = live_prefetch
        # Consistent facts from short-pause page copies (sva.vmi.pagesnap), tried this many
        # times per cycle before a classic freeze; 0: always the classic freeze.
        self._snapshot_attempts = max(0, snapshot_attempts)
        self._working_set: frozenset[int] = frozenset()
        self._snapshot_registers = False
        self._spare: bytearray | None = None
        self._memo: dict[str, _Memo] = {}  # consistent facts by name, see _collect_from
        self._memo_boot: Any = None
        self.snapshot_stats: SnapshotStats | None = None  # how the last cycle's copy went
        self._clock = clock
        self._tracker = AlertTracker(uid_factory)
        self._cycle = 0
        self._boot_id: str | None = vm.boot_id

    # -- configuration -----------------------------------------------------------------
    @property
    def vm(self) -> VmIdentity:
        return self._vm

    @property
    def detectors(self) -> tuple[Detector, ...]:
        return self._detectors

    @property
    def rules(self) -> RuleSet:
        return self._rules

    @property
    def cycle(self) -> int:
        """The id of the last cycle run (0 before the first)."""
        return self._cycle

    @property
    def tracked(self) -> int:
        """Findings currently alerted and not resolved."""
        return len(self._tracker)

    def set_rules(self, rules: RuleSet) -> None:
        """Use a new RuleSet from the next cycle on (e.g. after `sva rules` reload)."""
        self._rules = rules

    def signature_bundle(self) -> str:
        return self._bundle() if callable(self._bundle) else self._bundle

    def needed_facts(self) -> list[str]:
        """The facts the enabled detectors need, with their dependencies (and boot_id)."""
        names: set[str] = set()
        for d in self._detectors:
            names |= d.needs
        if BOOT_ID_FACT in self._facts:
            names.add(BOOT_ID_FACT)
        return self._facts.closure(names)

    # -- the cycle -------------------------------------------------------------------------
    def run_cycle(self) -> CycleReport:
        self._cycle += 1
        cycle = self._cycle
        started = self._clock()
        t0 = time.perf_counter()
        health: list[HealthEvent] = []
        facts = CycleFacts(
            self._facts, backend=self._backend, vm=self._vm, cycle=cycle, time_budget=self._fact_budget
        )

        # 1. Freeze, compute what needs a consistent view, thaw.
        pause_seconds, frozen_ok = self._freeze_and_collect(facts, health)
        if not frozen_ok:
            return self._finish(cycle, started, t0, None, facts, [], [], [], health, error=health[-1].message)

        vm = self._identity(facts, health)
        observations: list[Observation] = []
        if self._boot_id is not None and vm.boot_id is not None and vm.boot_id != self._boot_id:
            gone = self._tracker.reset()
            observations.extend(gone)
            message = (f"{vm.name}: guest rebooted (boot id {self._boot_id} -> {vm.boot_id}); "
                       f"{len(gone)} finding(s) of the old boot resolved")  # fmt: skip
            health.append(_warning("engine", message, reason="reboot", old_boot_id=self._boot_id, boot_id=vm.boot_id))
        if vm.boot_id is not None:
            self._boot_id = vm.boot_id

        # 2. Detectors, each isolated.
        runs: list[DetectorRun] = []
        found: list[Finding] = []
        ran_ok: set[str] = set()
        for det in self._detectors:
            run, findings = self._run_detector(det, facts, health)
            runs.append(run)
            if run.status == RunStatus.OK:
                ran_ok.add(det.id)
                found.extend(findings)

        # 3.-4. Stamped already (detector id); now suppress.
        active: list[Finding] = []
        suppressed: list[SuppressedFinding] = []
        for f in found:
            s = self._rules.suppression_for(
                vm=vm.name, detector=f.detector, rule=f.rule, process=f.process.comm if f.process else None
            )
            if s is None:
                active.append(f)
            else:
                suppressed.append(SuppressedFinding(f, s.id))

        # 5. Dedup across cycles.
        now = started
        observations.extend(
            self._tracker.observe(
                now, active, ran=ran_ok, held=[finding_key(s.finding) for s in suppressed], material=self._material
            )
        )
        emitted = self._clock()
        alerts = [self._stamp(o, vm, cycle, emitted) for o in observations]

        # 6. Publish, then remember what was delivered.
        published, failed = self._publish(alerts, observations, health)
        self._tracker.commit(observations, material=self._material, failed=failed)
        return self._finish(cycle, started, t0, pause_seconds, facts, runs, alerts, suppressed, health,
                            published=published, vm=vm)  # fmt: skip

    def run(
        self,
        interval: float,
        stop_event: threading.Event,
        on_cycle: Callable[[CycleReport], None] | None = None,
        max_cycles: int | None = None,
    ) -> int:
        """Run a cycle every `interval` seconds (start to start) until `stop_event` is set
        or `max_cycles` ran; `on_cycle` gets each report. Returns the number of cycles."""
        n = 0
        while not stop_event.is_set():
            t = time.monotonic()
            report = self.run_cycle()
            n += 1
            if on_cycle is not None:
                on_cycle(report)
            if max_cycles is not None and n >= max_cycles:
                break
            stop_event.wait(max(0.0, interval - (time.monotonic() - t)))
        return n

    def close(self) -> None:
        """Close the sinks (the engine owns the sinks it was given)."""
        for sink in self._sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - closing the others matters more
                log.warning("closing sink %r failed: %s", sink, e)

    # -- steps -----------------------------------------------------------------------------
    def _material(self, detector_id: str) -> frozenset[str]:
        det = self._by_id.get(detector_id)
        return material_fields(det) if det is not None else frozenset()

    def live_prerequisites(self, consistent: Iterable[str]) -> list[str]:
        """The facts computed with the guest running before the freeze: those the
        `consistent` facts read (transitively) that need no freeze themselves, nor read
        anything that does. This is where expensive scans go (a sweep of all RAM), whose
        findings a consistent fact then re-checks cheaply inside the freeze."""
        registry = self._facts
        deps = {d for n in consistent if (p := registry.get(n)) is not None for d in provider_requires(p)}

        def live(name: str) -> bool:
            p = registry.get(name)
            return p is not None and not p.consistent

        return [n for n in registry.closure(deps) if live(n) and all(live(d) for d in registry.closure([n]))]

    def _freeze_and_collect(self, facts: CycleFacts, health: list[HealthEvent]) -> tuple[float | None, bool]:
        consistent = [n for n in self.needed_facts() if (p := self._facts.get(n)) is not None and p.consistent]
        collected = False
        if not consistent:
            return None, True  # nothing needs a consistent view: do not stop the guest at all
        for name in self.live_prerequisites(consistent) if self._live_prefetch else ():
            facts.get(name)  # guest running; failures become Unavailable like any fact's
        short = self._from_snapshots(facts, consistent, health) if self._snapshot_attempts else (0.0, False)
        if short is None:
            return None, False
        if short[1]:
            return short[0], True
        earlier_pauses = short[0]
        freeze = self._backend.frozen() if self._backend is not None else contextlib.nullcontext(None)
        try:
            with freeze as record:
                facts.in_freeze = True
                for name in consistent:
                    facts.get(name)
                facts.in_freeze = False
                collected = True
            pause = record.seconds + earlier_pauses if record is not None else None
        except SvaError as e:
            facts.in_freeze = False
            what = "resume" if collected else "freeze"
            target = self._backend.target if self._backend is not None else self._vm.target
            message = f"{target}: cannot {what} the guest: {e}"
            health.append(_error("vmi", message, reason=f"{what}-failed", target=target))
            return None, collected
        return pause, True

    def _from_snapshots(
        self, facts: CycleFacts, consistent: list[str], health: list[HealthEvent]
    ) -> tuple[float, bool] | None:
        """The consistent facts from short-pause page copies (sva.vmi.pagesnap): freeze,
        copy the working set, thaw, compute from the copy; redo with a bigger copy while
        a walk read a page outside it, at most `snapshot_attempts` times. Returns (pause
        seconds so far, done); not done: the caller computes them in a classic freeze.
        None: the guest could not be frozen or resumed (a health event says so)."""
        backend = self._backend
        if backend is None or not getattr(backend.capabilities, "pause", False) or not hasattr(backend, "overlay"):
            return 0.0, False
        pause = 0.0
        registers = self._snapshot_registers
        for _attempt in range(self._snapshot_attempts):
            before = facts.names()
            try:
                with backend.frozen() as record:
                    snap = backend.snapshot(self._working_set, registers=registers, buffer=self._spare)
            except SvaError as e:
                message = f"{backend.target}: cannot freeze the guest for a snapshot: {e}"
                health.append(_error("vmi", message, reason="freeze-failed", target=backend.target))
                return None
            pause += record.seconds
            with backend.overlay(snap):
                facts.in_freeze = True
                try:
                    reused = self._collect_from(snap, facts, consistent)
                finally:
                    facts.in_freeze = False
            self._spare = snap.data  # nothing refers to it after the overlay: facts hold copies
            self._working_set = frozenset(snap.touched) if not snap.overflow else frozenset()
            registers = registers or snap.registers_missed
            self._snapshot_registers = registers
            self.snapshot_stats = SnapshotStats(
                pages=len(snap.pages), touched=len(snap.touched), missed=len(snap.missed),
                attempts=_attempt + 1, consistent=snap.consistent, reused=reused,
            )  # fmt: skip
            if snap.consistent:
                return pause, True
            facts.forget(facts.names() - before)  # read partly live: redo them
            if snap.overflow:
                break
        return pause, False

    def _collect_from(self, snap: Any, facts: CycleFacts, consistent: list[str]) -> int:
        """Compute the consistent facts from `snap`, reusing last cycle's value of a fact
        when every page it read then has the same bytes now and the facts it requires
        have equal values (a walk is a function of the bytes it reads, so it would give
        the same value; kernel tables change rarely). Not for a value that also depends on
        something else (the cycle, the clock): its provider says `reusable = False`. Nor
        for one that read vCPU registers, read no memory, or is Unavailable. Returns how
        many were reused."""
        boot = facts.get(BOOT_ID_FACT) if BOOT_ID_FACT in self._facts else None
        if boot != self._memo_boot:  # a new boot, another context: nothing carries over
            self._memo.clear()
            self._memo_boot = boot
        reused = 0
        for name in consistent:
            if facts.computed(name):
                continue
            provider = self._facts.get(name)
            if provider is None or not getattr(provider, "reusable", True):
                facts.get(name)
                continue
            deps = sorted(provider_requires(provider))
            memo = self._memo.get(name)
            if memo is not None and all(facts.get(d) == v for d, v in memo.deps) and snap.digest(memo.pages) == memo.digest:
                facts.reuse(name, memo.value)
                snap.touched.update(memo.pages)  # copied again next cycle, to check them again
                reused += 1
                continue
            registers = snap.register_reads
            snap.begin_track()
            try:
                value = facts.get(name)
            finally:
                pages = snap.end_track()
            dep_values = tuple((d, facts.get(d)) for d in deps)
            digest = snap.digest(pages) if pages else None
            if (digest is not None and snap.register_reads == registers and not isinstance(value, Unavailable)
                    and not any(isinstance(v, Unavailable) for _, v in dep_values)):  # fmt: skip
                self._memo[name] = _Memo(pages, digest, value, dep_values)
            else:
                self._memo.pop(name, None)
        return reused

    def _identity(self, facts: CycleFacts, health: list[HealthEvent]) -> VmIdentity:
        if BOOT_ID_FACT not in self._facts:
            return self._vm
        boot = facts.get(BOOT_ID_FACT)
        if isinstance(boot, str) and boot:
            return dataclasses.replace(self._vm, boot_id=boot)
        if isinstance(boot, Unavailable):
            health.append(_warning("engine", f"boot id unavailable: {boot.reason}", reason="fact-unavailable",
                                   fact=BOOT_ID_FACT))  # fmt: skip
        return dataclasses.replace(self._vm, boot_id=self._boot_id)

    def _run_detector(
        self, det: Detector, facts: CycleFacts, health: list[HealthEvent]
    ) -> tuple[DetectorRun, list[Finding]]:
        component = f"detector:{det.id}"
        missing = [(n, v.reason) for n in sorted(det.needs) if isinstance(v := facts.get(n), Unavailable)]
        if missing:
            what = "; ".join(f"fact {n!r} unavailable: {r}" for n, r in missing)
            health.append(_warning(component, f"{det.id} skipped: {what}", reason="fact-unavailable",
                                   facts=dict(missing)))  # fmt: skip
            return DetectorRun(det.id, det.version, RunStatus.SKIPPED, 0.0, 0, what), []

        view = FactView(det.id, det.needs, facts)
        findings: list[Finding] = []
        dropped = 0
        t0 = time.perf_counter()
        try:
            for f in det.detect(view, self._rules):
                if not isinstance(f, Finding):
                    raise DetectorError(det.id, f"returned a {type(f).__name__}, not a Finding")
                if len(findings) >= self._max_findings:
                    dropped += 1
                    continue
                findings.append(f)
        except Exception as e:  # noqa: BLE001 - one detector's failure must not stop the others
            seconds = time.perf_counter() - t0
            text = f"{type(e).__name__}: {e}"
            log.error("detector %s failed: %s", det.id, text, exc_info=True)
            health.append(_error(component, f"{det.id} failed: {text}", reason="exception",
                                 exception=type(e).__name__, seconds=round(seconds, 6)))  # fmt: skip
            return DetectorRun(det.id, det.version, RunStatus.ERROR, seconds, 0, text), []
        seconds = time.perf_counter() - t0

        stamped: list[Finding] = []
        for f in findings:
            problem = check_json(f.evidence)
            if problem is not None:
                message = f"{det.id}: finding {f.rule} dropped: evidence is not JSON: {problem}"
                health.append(_error(component, message, reason="bad-evidence", rule=f.rule))
                continue
            stamped.append(f if f.detector == det.id else dataclasses.replace(f, detector=det.id))
        if dropped:
            message = f"{det.id}: {dropped} finding(s) over the limit of {self._max_findings} dropped"
            health.append(_warning(component, message, reason="too-many-findings", dropped=dropped))
        if seconds > self._slow:
            message = f"{det.id} took {seconds:.2f} s (budget {self._slow:.2f} s)"
            health.append(_warning(component, message, reason="slow", seconds=round(seconds, 3)))
        return DetectorRun(det.id, det.version, RunStatus.OK, seconds, len(stamped)), stamped

    def _stamp(self, o: Observation, vm: VmIdentity, cycle: int, emitted: float) -> Alert:
        f = o.finding
        det = self._by_id.get(f.detector)
        rule = self._rules.get(f.rule)
        return Alert(
            finding=f,
            vm=vm,
            state=o.state,
            cycle=cycle,
            uid=o.uid,
            first_seen=o.first_seen,
            last_seen=o.last_seen,
            emitted=emitted,
            detector_version=det.version if det is not None else "",
            signature_bundle=self.signature_bundle(),
            rule_name=rule.title if rule is not None else "",
            rule_version=str(rule.version) if rule is not None else "",
            ruleset_version=rule.ruleset_version if rule is not None else "",
            changed_fields=o.changed_fields,
        )

    def _publish(
        self, alerts: list[Alert], observations: list[Observation], health: list[HealthEvent]
    ) -> tuple[int, set[Key]]:
        published = 0
        failed: set[Key] = set()
        resolved = [a for a in alerts if a.state is AlertState.RESOLVED]
        if resolved and self._publish_resolved:
            health.append(_resolved_event(resolved))
        if not self._sinks:
            return 0, failed
        items: list[tuple[str, dict[str, Any]]] = []
        keys: list[Key | None] = []  # the alert behind each item (None: a health event)
        for alert, obs in zip(alerts, observations, strict=True):
            if alert.state not in self._publish_states:
                continue
            try:
                payload = alert.to_event_payload()
            except SvaError as e:
                message = f"alert {alert.uid} not publishable: {e}"
                health.append(_error("engine", message, reason="bad-alert", rule=alert.finding.rule))
                failed.add(obs.key)
                continue
            items.append(("alert", payload))
            keys.append(obs.key)
        for event in list(health):
            items.append(("health", event.to_payload()))
            keys.append(None)
        if not items:
            return 0, failed
        for sink in self._sinks:
            refused = self._send_many(sink, items, health)
            published += len(items) - len(refused)
            failed.update(k for i, k in enumerate(keys) if k is not None and i in refused)
        return published, failed

    def _send_many(self, sink: Sink, items: list[tuple[str, dict[str, Any]]], health: list[HealthEvent]) -> set[int]:
        """Publish a cycle's events through `sink` in one batch (on the bus: one journal
        write and one lock); the indices of those it did not take. A batch refused as a
        whole (one bad payload, say) is retried event by event, so one bad event costs
        only itself; a sink that stops part way (disk full) keeps what it took."""
        from sva.bus.publisher import PartialPublishError
        from sva.bus.sink import publish_many

        try:
            publish_many(sink, items)
            return set()
        except PartialPublishError as e:
            done = len(e.published)
            log.error("sink %r refused events %d..%d of a cycle: %s", sink, done + 1, len(items), e)
            message = f"{type(sink).__name__}: {len(items) - done} of {len(items)} events not published: {e}"
            health.append(_error("sink", message, reason="publish-failed"))
            return set(range(done, len(items)))
        except Exception:  # noqa: BLE001 - a failing sink must not stop the cycle or the others
            pass
        refused: set[int] = set()
        in_a_row = 0
        for i, (et, payload) in enumerate(items):
            if self._send(sink, et, payload, health):
                in_a_row = 0
            else:
                refused.add(i)
                in_a_row += 1
                if in_a_row >= _MAX_REFUSED_ONE_BY_ONE:  # the sink itself is failing
                    rest = len(items) - i - 1
                    if rest:
                        refused.update(range(i + 1, len(items)))
                        health.append(_error("sink", f"{type(sink).__name__}: {rest} more events of this cycle "
                                             "not tried after repeated failures", reason="publish-failed"))
                    break
        return refused

    def _send(self, sink: Sink, event_type: str, payload: dict[str, Any], health: list[HealthEvent]) -> bool:
        try:
            sink.publish(event_type, payload)
            return True
        except Exception as e:  # noqa: BLE001 - a failing sink must not stop the cycle or the others
            log.error("sink %r refused a %s event: %s", sink, event_type, e)
            message = f"{type(sink).__name__}: {event_type} event not published: {type(e).__name__}: {e}"
            health.append(_error("sink", message, reason="publish-failed"))
            return False

    def _finish(
        self,
        cycle: int,
        started: float,
        t0: float,
        pause: float | None,
        facts: CycleFacts,
        runs: list[DetectorRun],
        alerts: list[Alert],
        suppressed: list[SuppressedFinding],
        health: list[HealthEvent],
        *,
        published: int = 0,
        vm: VmIdentity | None = None,
        error: str | None = None,
    ) -> CycleReport:
        if error is not None:
            for event in health:
                for sink in self._sinks:
                    if self._send(sink, "health", event.to_payload(), []):
                        published += 1
        return CycleReport(
            cycle=cycle,
            vm=vm or self._vm,
            started=started,
            seconds=time.perf_counter() - t0,
            pause_seconds=pause,
            facts=facts.records(),
            detectors=tuple(runs),
            alerts=tuple(alerts),
            suppressed=tuple(suppressed),
            health=tuple(health),
            published=published,
            error=error,
        )


def _resolved_event(resolved: list[Alert]) -> HealthEvent:
    vm = resolved[0].vm
    items = []
    for a in resolved:
        item: dict[str, Any] = {
            "uid": a.uid, "detector": a.finding.detector, "rule": a.finding.rule, "kind": a.finding.kind,
            "title": a.finding.title, "first_seen": int(a.first_seen * 1000), "last_seen": int(a.last_seen * 1000),
        }  # fmt: skip
        if a.finding.process is not None:
            item["pid"] = a.finding.process.pid
            item["comm"] = a.finding.process.comm
        items.append(item)
    names = ", ".join(f"{i['rule']}" + (f" pid {i['pid']}" if "pid" in i else "") for i in items[:5])
    more = f" and {len(items) - 5} more" if len(items) > 5 else ""
    message = f"{vm.name}: {len(items)} finding(s) resolved: {names}{more}"
    return HealthEvent("engine", HealthStatus.OK, message, {"reason": "resolved", "vm": vm.name, "findings": items})


def _warning(component: str, message: str, **details: Any) -> HealthEvent:
    return HealthEvent(component, HealthStatus.WARNING, message, details)


def _error(component: str, message: str, **details: Any) -> HealthEvent:
    return HealthEvent(component, HealthStatus.ERROR, message, details)
