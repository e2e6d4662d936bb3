"""Suppressions by VM, detector, rule and process, loaded from TOML like every rule."""

from __future__ import annotations

import pytest

from sva.engine.model import VmIdentity
from sva.engine.ruleload import loads_rules
from sva.engine.rules import RuleSet, Suppression
from sva.engine.sinks import MemorySink

from .helpers import detector, finding, make_engine

HEADER = '[ruleset]\nname = "sup"\nversion = "1"\n'


def _suppressions(body: str) -> RuleSet:
    return loads_rules(HEADER + body, "suppressions.toml")


def _run(rules: RuleSet, vm: str = "web01", sink: MemorySink | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Alerted rule ids, and (suppression id, rule id) of the suppressed, for one cycle."""
    miner = detector("miner_watch", lambda f, r: [finding("MINER", pid=1, comm="xmrig")])
    shells = [finding("SHELL", pid=2, comm="nc"), finding("SHELL", pid=3, comm="sh")]
    shell = detector("shell_watch", lambda f, r: shells)
    eng = make_engine([miner, shell], rules=rules, vm=VmIdentity(vm, f"lab:{vm}"), sinks=[sink] if sink else [])
    report = eng.run_cycle()
    alerted = sorted(f"{a.finding.rule}:{a.finding.process.comm}" for a in report.new)  # type: ignore[union-attr]
    return alerted, sorted((s.suppression, f"{s.finding.rule}:{s.finding.process.comm}") for s in report.suppressed)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("criteria", "vm", "silenced"),
    [
        ('vm = ["web01"]', "web01", ["MINER:xmrig", "SHELL:nc", "SHELL:sh"]),
        ('vm = ["web01"]', "db01", []),
        ('vm = ["web*"]', "web02", ["MINER:xmrig", "SHELL:nc", "SHELL:sh"]),
        ('detector = ["miner_watch"]', "web01", ["MINER:xmrig"]),
        ('rule = ["SHELL"]', "web01", ["SHELL:nc", "SHELL:sh"]),
        ('process = ["nc"]', "web01", ["SHELL:nc"]),
        ('process = ["nc", "xmrig"]', "web01", ["MINER:xmrig", "SHELL:nc"]),
        # All given criteria must match.
        ('vm = ["web01"]\nrule = ["SHELL"]\nprocess = ["sh"]', "web01", ["SHELL:sh"]),
        ('vm = ["db01"]\nrule = ["SHELL"]', "web01", []),
        ('rule = ["SHELL"]\nenabled = false', "web01", []),
    ],
)
def test_suppression_criteria(criteria: str, vm: str, silenced: list[str]) -> None:
    rules = _suppressions(f'[[suppression]]\nid = "S1"\nreason = "accepted risk"\n{criteria}\n')
    alerted, suppressed = _run(rules, vm)
    assert [rule for _sid, rule in suppressed] == silenced
    assert all(sid == "S1" for sid, _ in suppressed)
    assert sorted(alerted + silenced) == ["MINER:xmrig", "SHELL:nc", "SHELL:sh"]


def test_suppressed_findings_are_not_published(sink: MemorySink) -> None:
    rules = _suppressions('[[suppression]]\nid = "S-miner"\nreason = "this VM mines on purpose"\nrule = ["MINER"]\n')
    _run(rules, sink=sink)
    assert sorted(e.payload["unmapped"]["sva"]["rule"]["id"] for e in sink.of_type("alert")) == ["SHELL", "SHELL"]


def test_a_suppression_without_criteria_is_refused() -> None:
    from sva.errors import RulesError

    with pytest.raises(RulesError, match=r"suppressions.toml:4: suppression 'S1': needs at least one of vm"):
        _suppressions('[[suppression]]\nid = "S1"\nreason = "x"\n')


def test_first_matching_suppression_wins() -> None:
    rules = RuleSet(suppressions=(
        Suppression(id="A", reason="a", process=("nc",)),
        Suppression(id="B", reason="b", rule=("SHELL",)),
    ))  # fmt: skip
    _alerted, suppressed = _run(rules)
    assert suppressed == [("A", "SHELL:nc"), ("B", "SHELL:sh")]
