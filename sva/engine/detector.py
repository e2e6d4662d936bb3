"""The detector interface.

A detector declares up front which facts it needs, receives a read-only `FactView` of
them and the `RuleSet`, and returns findings:

    class ProcessPolicy:
        id = "process_policy"
        version = "1.0.0"
        description = "processes that look like miners, droppers or reverse shells"
        needs = frozenset({"processes"})
        material_fields = frozenset({"cmdline", "exe", "matched"})

        def detect(self, facts: FactView, rules: RuleSet) -> Iterable[Finding]: ...

It never opens a backend, a socket or a file and never calls another detector: all it
knows comes in through `facts` and `rules`. It does not stamp versions, VM or time on
its findings; the engine does. An exception from `detect` (or from iterating what it
returns) is reported as a health event and the cycle goes on without it.

`material_fields` (optional, default empty) names the evidence fields whose change
makes a still-present finding `changed` (re-alerted); with none, only its severity.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from sva.engine.facts import FactView
from sva.engine.model import Finding
from sva.engine.rules import RuleSet
from sva.errors import DetectorError

DETECTOR_ID = re.compile(r"[a-z][a-z0-9_]{0,63}")


@runtime_checkable
class Detector(Protocol):
    @property
    def id(self) -> str:
        """Short, stable name: [a-z][a-z0-9_]*; a bus topic level and the `detector` of alerts."""
        ...

    @property
    def version(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def needs(self) -> frozenset[str]:
        """The names of the facts `detect` reads."""
        ...

    def detect(self, facts: FactView, rules: RuleSet) -> Iterable[Finding]: ...


def material_fields(detector: Detector) -> frozenset[str]:
    return frozenset(getattr(detector, "material_fields", frozenset()))


def check_detector(obj: Any, source: str = "") -> Detector:
    """`obj` if it has what a detector must have, else DetectorError naming what is wrong."""
    name = getattr(obj, "id", None)
    label = name if isinstance(name, str) and name else (source or repr(obj))
    if not isinstance(name, str) or not DETECTOR_ID.fullmatch(name):
        raise DetectorError(label, f"id {name!r} must match {DETECTOR_ID.pattern} (it is a bus topic level)")
    for attr in ("version", "description"):
        if not isinstance(getattr(obj, attr, None), str):
            raise DetectorError(label, f"needs a string `{attr}`")
    needs = getattr(obj, "needs", None)
    if not isinstance(needs, frozenset) or not all(isinstance(n, str) for n in needs):
        raise DetectorError(label, "`needs` must be a frozenset of fact names")
    mf: object = getattr(obj, "material_fields", frozenset())
    if not isinstance(mf, frozenset | set | tuple) or not all(isinstance(n, str) for n in mf):
        raise DetectorError(label, "`material_fields` must be a frozenset of evidence field names")
    if not callable(getattr(obj, "detect", None)):
        raise DetectorError(label, "has no detect(facts, rules) method")
    return obj  # type: ignore[no-any-return]
