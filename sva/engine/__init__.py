"""The detection engine: guest facts → detectors → findings → alerts → sinks.

- `facts`: `ProcessInfo`, `Unavailable`, fact providers, `FactRegistry`, `FactView`.
- `model`: `Finding` (subclass per kind), `Alert`, `Severity`, `AlertState`, `VmIdentity`,
  `HealthEvent`.
- `detector`: the `Detector` interface; `registry`: default list, package and entry points.
- `rules`, `ruleload`: rules as typed data (`RuleSet`, rule kinds, `Suppression`,
  `load_rules`, `check_rules`).
- `engine`: `Engine.run_cycle()` / `Engine.run()`, `CycleReport`; `dedup`: alert states.
- `sinks`: the bus's `Sink` and `JsonLinesSink`, `MemorySink`; `report`: text and JSON.
"""

from sva.engine.detector import Detector
from sva.engine.engine import CycleReport, DetectorRun, Engine
from sva.engine.facts import (
    CycleFacts,
    FactContext,
    FactProvider,
    FactRegistry,
    FactView,
    ProcessInfo,
    StaticFact,
    Unavailable,
    backend_fact_providers,
    fact_provider,
)
from sva.engine.model import Alert, AlertState, Finding, HealthEvent, HealthStatus, Severity, VmIdentity
from sva.engine.ruleload import check_rules, load_rules, loads_rules
from sva.engine.rules import Maturity, Rule, RuleSet, Suppression, default_rules_dir

__all__ = [
    "Alert",
    "AlertState",
    "CycleFacts",
    "CycleReport",
    "Detector",
    "DetectorRun",
    "Engine",
    "FactContext",
    "FactProvider",
    "FactRegistry",
    "FactView",
    "Finding",
    "HealthEvent",
    "HealthStatus",
    "Maturity",
    "ProcessInfo",
    "Rule",
    "RuleSet",
    "Severity",
    "StaticFact",
    "Suppression",
    "Unavailable",
    "VmIdentity",
    "backend_fact_providers",
    "check_rules",
    "default_rules_dir",
    "fact_provider",
    "load_rules",
    "loads_rules",
]
