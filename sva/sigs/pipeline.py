"""The update pipeline and the `Refresher` that runs it for each configured feed.

    fetch (HTTPS/local, conditional) → verify signature and every file hash → refuse a
    version not above the highest ever activated → unpack to staging → IOC lists parse,
    YARA compiles (with the externals public sets use) → time the rules on sample memory
    → canary: clean memory matches nothing, the canary matches → rename into place
    (previous active = last known good) → `sva.sigs.updated` on the bus

Any failure leaves the active bundle as it was, is recorded in state.json and published
as `sva.sigs.rejected` with its reason. Transport failures (server down, truncated
download) are retried with exponential backoff; a bundle refused for its content is not
downloaded again until the feed's index changes.
"""

from __future__ import annotations

import enum
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sva import __version__
from sva.bus.sink import Sink
from sva.errors import BundleError, BusError, SvaError
from sva.scan.cost import SlowRulePolicy
from sva.scan.sample import synthetic_memory
from sva.sigs.active import ActiveRules
from sva.sigs.bundle import VerifiedBundle, read_bundle, unpack
from sva.sigs.config import SigsConfig
from sva.sigs.content import check_content
from sva.sigs.fetch import check_download, open_feed
from sva.sigs.keys import PublicKey, load_trusted
from sva.sigs.manifest import parse_version
from sva.sigs.model import TRANSIENT, RejectReason
from sva.sigs.store import BundleInfo, SignatureStore

log = logging.getLogger(__name__)


class Outcome(enum.StrEnum):
    ACTIVATED = "activated"
    UP_TO_DATE = "up-to-date"  # the feed's latest is not newer than what is active
    NOT_MODIFIED = "not-modified"  # 304 / unchanged index
    REJECTED = "rejected"  # refused (content or transport); the active bundle is unchanged
    DEFERRED = "deferred"  # not due yet (interval or backoff)


@dataclass(frozen=True)
class UpdateResult:
    source: str
    outcome: Outcome
    message: str
    version: int | None = None
    previous_version: int | None = None
    reason: RejectReason | None = None
    seconds: Mapping[str, float] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "outcome": self.outcome.value, "message": self.message,
                "version": self.version, "previous_version": self.previous_version,
                "reason": self.reason.value if self.reason else None, "seconds": dict(self.seconds)}

    def __str__(self) -> str:
        if self.message.startswith(self.source):  # a refusal's text already names where
            return f"{self.outcome.value}: {self.message}"
        return f"{self.source}: {self.outcome.value}: {self.message}"


class Refresher:
    """Keeps the store's active bundle up to date from the configured feeds.

    `check()` polls every feed that is due (or all with force=True); `run(stop)` does that
    on the configured interval until `stop` is set — the daemon runs it in a thread.
    `active`, if given, is the engine's rules callable: it gets the new compiled set at
    activation (no second compile). `sink` receives `sigs` events (a BusPublisher).
    """

    def __init__(self, config: SigsConfig, *, sink: Sink | None = None, active: ActiveRules | None = None,
                 trusted: tuple[PublicKey, ...] | None = None, sample: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = SignatureStore(config.state_dir)
        self.sink = sink
        self.active = active
        self._trusted = trusted
        self._sample = sample
        self.clock = clock
        self.policy = SlowRulePolicy(max_rule_ms_per_mib=config.max_rule_ms_per_mib, refuse_slow=False,
                                     sample_size=config.sample_size, timeout_s=config.rule_timeout_s)

    @property
    def trusted(self) -> tuple[PublicKey, ...]:
        if self._trusted is None:
            self._trusted = load_trusted(self.config.trusted_keys)
        return self._trusted

    @property
    def sample(self) -> bytes:
        if self._sample is None:
            self._sample = synthetic_memory(self.config.sample_size)
        return self._sample

    # -- polling ---------------------------------------------------------------------------
    def check(self, force: bool = False) -> list[UpdateResult]:
        """Poll each feed that is due (all of them with `force`), first to last."""
        return [self.check_source(s, force) for s in self.config.sources]

    def run(self, stop: threading.Event, on_result: Callable[[UpdateResult], None] | None = None) -> None:
        """Poll until `stop` is set, waking when the next feed (or its backoff) is due."""
        while not stop.is_set():
            for r in self.check():
                if on_result is not None and r.outcome is not Outcome.DEFERRED:
                    on_result(r)
            stop.wait(max(0.05, self.next_due() - self.clock()))

    def next_due(self) -> float:
        srcs = self.store.load_state().get("sources", {})
        due = [max(float(srcs.get(s, {}).get("last_check", 0)) + self.config.interval_s,
                   float(srcs.get(s, {}).get("next_try", 0))) for s in self.config.sources]
        return min(due, default=self.clock() + self.config.interval_s)

    def check_source(self, source: str, force: bool = False) -> UpdateResult:
        now = self.clock()
        with self.store.locked():
            state = self.store.load_state()
            src = state.setdefault("sources", {}).setdefault(source, {})
            if not force:
                if now < float(src.get("next_try", 0)):
                    return UpdateResult(source, Outcome.DEFERRED, f"backing off until {time.ctime(src['next_try'])}")
                if now < float(src.get("last_check", 0)) + self.config.interval_s:
                    return UpdateResult(source, Outcome.DEFERRED, "checked recently")
            src["last_check"] = now
            state["last_check"] = now
            result = self._poll(source, src, state)
            state["last_result"] = result.outcome.value
            if result.outcome is Outcome.REJECTED:
                transient = result.reason in TRANSIENT
                src["failures"] = int(src.get("failures", 0)) + 1 if transient else 0
                src["next_try"] = now + self.backoff(src["failures"]) if transient else 0
                src["last_error"] = result.message
            else:
                src["failures"] = 0
                src["next_try"] = 0
                src["last_error"] = None
            self.store.save_state(state)
            return result

    def backoff(self, failures: int) -> float:
        """Seconds to wait after `failures` transport failures in a row: doubling, capped."""
        if failures <= 0:
            return 0.0
        return float(min(self.config.backoff_max_s, self.config.backoff_initial_s * 2.0 ** min(failures - 1, 60)))

    def _poll(self, source: str, src: dict[str, Any], state: dict[str, Any]) -> UpdateResult:
        cfg = self.config
        try:
            feed = open_feed(source, ca_file=cfg.ca_file, timeout_s=cfg.timeout_s,
                             max_download=cfg.max_download_bytes, max_index=cfg.max_index_bytes)
            idx = feed.index(src.get("etag"), src.get("last_modified"))
        except BundleError as e:
            return self._rejected(state, source, e, None)
        if idx.entry is None:
            state.setdefault("counts", {})["not_modified"] = state.get("counts", {}).get("not_modified", 0) + 1
            return UpdateResult(source, Outcome.NOT_MODIFIED, "feed index not modified since the last check")
        floor = self._floor(state)
        if idx.entry.version <= floor:
            src["etag"], src["last_modified"] = idx.etag, idx.last_modified
            return UpdateResult(source, Outcome.UP_TO_DATE,
                                f"the feed's latest version {idx.entry.version} is not newer than {floor}",
                                version=idx.entry.version, previous_version=floor)
        try:
            where, data = feed.bundle(idx.entry)
            check_download(idx.entry, data, where)
        except BundleError as e:
            return self._rejected(state, source, e, idx.entry.version)
        result = self._install(data, where, state, announced=idx.entry.version)
        if result.reason not in TRANSIENT:  # final for this index: do not download it again
            src["etag"], src["last_modified"] = idx.etag, idx.last_modified
        return result

    # -- installing ------------------------------------------------------------------------
    def install_bytes(self, data: bytes, origin: str) -> UpdateResult:
        """Run the pipeline on a bundle file's bytes (`sva sigs install`)."""
        with self.store.locked():
            state = self.store.load_state()
            state["last_check"] = self.clock()
            result = self._install(data, origin, state)
            state["last_result"] = result.outcome.value
            self.store.save_state(state)
            return result

    def _floor(self, state: dict[str, Any]) -> int:
        active = self.store.info("active")
        return max(int(state.get("floor_version", 0)), active.version if active else 0)

    def _install(self, data: bytes, origin: str, state: dict[str, Any], announced: int | None = None) -> UpdateResult:
        """`announced`: the version the feed index gave, reported for a bundle refused before
        its own (signed) version could be read."""
        t0 = time.perf_counter()
        staged = None
        version = announced
        try:
            bundle = read_bundle(data, self.trusted, self.config.limits, origin)
            version = bundle.version
            t_verify = time.perf_counter()
            self._admissible(bundle, state, origin)
            staged = self.store.new_staging_dir(f"v{bundle.version}")
            try:
                unpack(bundle, staged)
            except OSError as e:
                raise BundleError(str(staged), RejectReason.STORE_FAILED, f"cannot unpack: {e.strerror or e}") from None
            report = check_content(staged / "files", bundle.manifest, policy=self.policy, sample=self.sample,
                                   source=origin)
            t_check = time.perf_counter()
            old = self.store.info("active")
            info = self.store.commit(staged, BundleInfo(
                bundle.manifest.name, bundle.version, staged, origin, bundle.key_id, bundle.sha256,
                self.clock(), dict(report.counts)))  # fmt: skip
            staged = None
            if self.active is not None:
                self.active.prime(info.dir, report.rules)
            t_swap = time.perf_counter()
        except BundleError as e:
            return self._rejected(state, origin, e, version)
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
        seconds = {"verify": t_verify - t0, "compile_time_canary": t_check - t_verify, "swap": t_swap - t_check,
                   "total": t_swap - t0}
        state["floor_version"] = max(int(state.get("floor_version", 0)), info.version)
        state["last_error"] = None
        counts = state.setdefault("counts", {})
        counts["activated"] = counts.get("activated", 0) + 1
        prev = old.version if old else None
        msg = (f"bundle {info.name} version {info.version} activated "
               f"(was {prev if prev is not None else 'the built-in bundle'}); {report.counts.get('memory_rules', 0)} memory rules")
        self._publish("updated", msg, info.version, prev, {
            "name": info.name, "source": origin, "key_id": info.key_id, "sha256": info.sha256,
            "counts": dict(info.counts), "seconds": seconds})  # fmt: skip
        log.info("%s", msg)
        return UpdateResult(origin, Outcome.ACTIVATED, msg, info.version, prev, None, seconds)

    def _admissible(self, bundle: VerifiedBundle, state: dict[str, Any], origin: str) -> None:
        floor = self._floor(state)
        if bundle.version <= floor:
            active = self.store.info("active")
            raise BundleError(origin, RejectReason.NOT_NEWER,
                              f"version {bundle.version} is not newer than {floor} (active: "
                              f"{active.version if active else 'none'}): refused as a rollback or replay")
        if parse_version(bundle.manifest.min_sva_version) > parse_version(__version__):
            raise BundleError(origin, RejectReason.SVA_TOO_OLD,
                              f"needs sva {bundle.manifest.min_sva_version} or newer, this is {__version__}")

    def _rejected(self, state: dict[str, Any], source: str, e: BundleError, version: int | None) -> UpdateResult:
        reason = RejectReason(e.kind)
        now = self.clock()
        state["last_error"] = {"time": now, "source": source, "reason": reason.value, "message": str(e)}
        counts = state.setdefault("counts", {})
        counts["rejected"] = counts.get("rejected", 0) + 1
        active = self.store.info("active")
        self._publish("rejected", str(e), version, active.version if active else None,
                      {"reason": reason.value, "source": source})
        log.warning("signature update refused: %s", e)
        return UpdateResult(source, Outcome.REJECTED, str(e), version, active.version if active else None, reason)

    def _publish(self, event: str, message: str, version: int | None, previous: int | None,
                 details: dict[str, Any]) -> None:
        if self.sink is None:
            return
        payload: dict[str, Any] = {"event": event, "message": message, "details": details}
        if version is not None:
            payload["bundle_version"] = str(version)
        payload["previous_version"] = str(previous) if previous is not None else "builtin"
        try:
            self.sink.publish("sigs", payload)
        except (BusError, SvaError, OSError) as e:  # the update stands; only the notice is lost
            log.warning("could not publish sva.sigs.%s: %s", event, e)

    # -- rollback and status ---------------------------------------------------------------
    def rollback(self) -> tuple[BundleInfo, BundleInfo]:
        with self.store.locked():
            now_active, now_previous = self.store.rollback()
            state = self.store.load_state()
            state["rolled_back"] = {"time": self.clock(), "from": now_previous.version, "to": now_active.version}
            self.store.save_state(state)
        self._publish("rolled_back", f"rolled back from version {now_previous.version} to {now_active.version}",
                      now_active.version, now_previous.version, {"name": now_active.name})
        return now_active, now_previous


def status(store: SignatureStore) -> dict[str, Any]:
    """What `sva sigs status` shows: active and previous bundles, last check and error, counts."""
    from sva.scan.rules import signatures_dir

    state = store.load_state()
    active, previous = store.info("active"), store.info("previous")
    out: dict[str, Any] = {
        "state_dir": str(store.root),
        "active": active.to_json() if active else {"name": "builtin", "version": None, "source": str(signatures_dir())},
        "previous": previous.to_json() if previous else None,
        "floor_version": state.get("floor_version", 0),
        "last_check": state.get("last_check"),
        "last_result": state.get("last_result"),
        "last_error": state.get("last_error"),
        "counts": state.get("counts", {}),
        "sources": state.get("sources", {}),
    }
    if active is None:
        try:
            from sva.sigs.content import builtin_rules

            out["active"]["counts"] = {"memory_rules": builtin_rules().rule_count}
        except SvaError as e:
            out["active"]["error"] = str(e)
    return out
