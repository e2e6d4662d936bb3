"""Findings across cycles: new, still present, changed, resolved.

A finding's identity is (detector, `Finding.dedup_key`). Each cycle the tracker compares
what the detectors reported with what it remembers:

- not remembered                                   -> NEW (alerted)
- remembered, material fields equal                -> STILL_PRESENT (cycle summary only)
- remembered, a material field or severity differs -> CHANGED (alerted again, same uid)
- remembered, not reported, and its detector ran   -> RESOLVED (then forgotten)

"Its detector ran" matters: a detector that failed or was skipped this cycle says
nothing about its findings, so they are *held* (neither resolved nor updated). Findings
silenced by a suppression are held too: lifting the suppression later does not re-alert
something already alerted, and suppressing it does not claim it resolved.

`observe()` only computes; `commit()` updates the memory afterwards, leaving out the
alerts no sink accepted, so those are alerted again next cycle instead of being lost.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sva.engine.model import AlertState, Finding

Key = tuple[str, tuple[Any, ...]]


def finding_key(f: Finding) -> Key:
    return (f.detector, f.dedup_key)


@dataclass
class _Tracked:
    finding: Finding
    uid: str
    first_seen: float
    last_seen: float
    material: dict[str, Any]


@dataclass(frozen=True)
class Observation:
    """What the tracker concluded about one finding this cycle."""

    key: Key
    state: AlertState
    finding: Finding
    uid: str
    first_seen: float
    last_seen: float
    changed_fields: tuple[str, ...] = ()


class AlertTracker:
    """Memory of the findings alerted so far, for one VM."""

    def __init__(self, uid_factory: Callable[[], str] | None = None) -> None:
        self._tracked: dict[Key, _Tracked] = {}
        self._uid = uid_factory or (lambda: str(uuid.uuid4()))

    def __len__(self) -> int:
        return len(self._tracked)

    def __contains__(self, key: object) -> bool:
        return key in self._tracked

    def observe(
        self,
        now: float,
        present: Sequence[Finding],
        *,
        ran: Collection[str],
        held: Iterable[Key] = (),
        material: Callable[[str], frozenset[str]] = lambda _d: frozenset(),
    ) -> list[Observation]:
        """Classify this cycle's findings. `ran`: ids of the detectors that completed;
        `held`: keys reported but suppressed. The first of several findings with the same
        key in one cycle wins."""
        out: list[Observation] = []
        seen: set[Key] = set()
        for f in present:
            key = finding_key(f)
            if key in seen:
                continue
            seen.add(key)
            old = self._tracked.get(key)
            if old is None:
                out.append(Observation(key, AlertState.NEW, f, self._uid(), now, now))
                continue
            new_material = f.material(material(f.detector))
            changed = tuple(k for k in new_material if new_material[k] != old.material.get(k))
            state = AlertState.CHANGED if changed else AlertState.STILL_PRESENT
            out.append(Observation(key, state, f, old.uid, old.first_seen, now, changed))
        keep = seen | set(held)
        for key, t in self._tracked.items():
            if key not in keep and t.finding.detector in ran:
                out.append(Observation(key, AlertState.RESOLVED, t.finding, t.uid, t.first_seen, t.last_seen))
        return out

    def commit(
        self,
        observations: Iterable[Observation],
        *,
        material: Callable[[str], frozenset[str]] = lambda _d: frozenset(),
        failed: Collection[Key] = (),
    ) -> None:
        """Remember the outcome. Keys in `failed` (alert not delivered) stay as they were,
        so the next cycle reports them NEW / CHANGED again."""
        for o in observations:
            if o.state is AlertState.RESOLVED:
                self._tracked.pop(o.key, None)
                continue
            if o.key in failed:
                continue
            fields = material(o.finding.detector)
            if o.state is AlertState.NEW:
                self._tracked[o.key] = _Tracked(o.finding, o.uid, o.first_seen, o.last_seen, o.finding.material(fields))
            else:
                t = self._tracked[o.key]
                t.finding, t.last_seen = o.finding, o.last_seen
                if o.state is AlertState.CHANGED:
                    t.material = o.finding.material(fields)

    def reset(self) -> list[Observation]:
        """Forget everything (the guest rebooted: pids mean something else now); the
        forgotten findings as RESOLVED observations."""
        out = [
            Observation(k, AlertState.RESOLVED, t.finding, t.uid, t.first_seen, t.last_seen)
            for k, t in self._tracked.items()
        ]
        self._tracked.clear()
        return out
