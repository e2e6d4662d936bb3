"""Small builders shared by the engine tests (real objects: detectors, findings, engines)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sva.engine.detector import Detector
from sva.engine.engine import Engine
from sva.engine.facts import FactProvider, FactRegistry, FactView
from sva.engine.model import Finding, VmIdentity
from sva.engine.rules import RuleSet
from sva.engine.testing import FunctionDetector, TestFinding, proc

VM = VmIdentity(name="web01", target="snapshot:web01.raw", boot_id="boot-1")


def finding(rule: str = "R1", pid: int = 100, comm: str = "evil", **evidence: Any) -> Finding:
    return TestFinding(rule=rule, title=f"{rule} on pid {pid}", process=proc(pid, comm, f"/opt/{comm}"),
                       evidence=evidence, mitre=("T1496",))  # fmt: skip


def detector(
    det_id: str,
    fn: Callable[[FactView, RuleSet], Iterable[Finding]] | None = None,
    needs: Iterable[str] = (),
    material: Iterable[str] = (),
) -> FunctionDetector:
    return FunctionDetector(det_id, fn or (lambda facts, rules: []), frozenset(needs),
                            material_fields=frozenset(material))  # fmt: skip


def make_engine(
    detectors: Sequence[Detector],
    providers: Iterable[FactProvider] = (),
    *,
    rules: RuleSet | None = None,
    vm: VmIdentity = VM,
    **kw: Any,
) -> Engine:
    return Engine(vm, rules=rules or RuleSet(), detectors=detectors, facts=FactRegistry(providers), **kw)


class Counting:
    """A fact provider that counts its computations and records what it saw."""

    def __init__(self, name: str, value: Any = None, *, consistent: bool = False,
                 requires: Iterable[str] = (), fn: Callable[[Any], Any] | None = None) -> None:  # fmt: skip
        self.name = name
        self.consistent = consistent
        self.requires = frozenset(requires)
        self.value = value
        self.fn = fn
        self.calls = 0

    def compute(self, ctx: Any) -> Any:
        self.calls += 1
        return self.fn(ctx) if self.fn is not None else self.value
