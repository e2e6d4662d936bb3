"""The slow-rule check: time rules on sample memory and find the ones over a budget.

One slow rule (a regex like `/[0-9a-fA-F]{32}/ fullword wide ascii`) can make a whole
rule set forty times slower, and libyara does not say which rule costs what. Timing
every rule alone costs a compile (~5 ms) plus a scan each: minutes for 5 000 rules. The
check instead relies on a set never being cheaper than its most expensive rule: it times
each namespace as a whole, and only when that is over budget splits it in halves (with
the private rules each half uses) and times those, down to single rules. A namespace
within budget costs one scan; each slow rule costs about 2·log2(rules) scans.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import yara

from sva.errors import ConfigError
from sva.scan.source import RuleGraph, RuleUnit

MiB = 1 << 20


@dataclass(frozen=True)
class SlowRulePolicy:
    """What counts as a slow rule and what to do with one."""

    max_rule_ms_per_mib: float = 10.0  # a one-string rule costs ~1 ms/MiB; Big_Numbers ~35
    refuse_slow: bool = False  # False: load and report them; True: leave them out
    # Loaded slow rules are scanned apart, each with its own timeout (ScanConfig
    # .slow_rule_timeout_s), so one that times out on a block costs only its own result.
    isolate_slow: bool = True
    sample_size: int = 2 * MiB  # bytes of synthetic memory when no sample is given
    repeats: int = 2  # a group over budget is timed this often; the fastest run counts
    max_timings: int = 400  # bound on timed scans per load; rules left over are reported
    timeout_s: int = 30  # one timed scan longer than this makes its group slow

    def __post_init__(self) -> None:
        checks = {
            "max_rule_ms_per_mib": self.max_rule_ms_per_mib > 0,
            "sample_size": self.sample_size >= 4096,
            "repeats": self.repeats >= 1,
            "max_timings": self.max_timings >= 1,
            "timeout_s": self.timeout_s >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"slow-rule policy: bad {key} = {getattr(self, key)!r}")


@dataclass(frozen=True)
class RuleCost:
    """A rule found over budget, with what it cost on the sample."""

    namespace: str
    rule: str
    ms_per_mib: float  # inf when one scan of the sample hit the timeout
    path: str
    line: int

    @property
    def key(self) -> str:
        return f"{self.namespace}:{self.rule}"

    def __str__(self) -> str:
        cost = "timed out" if math.isinf(self.ms_per_mib) else f"{self.ms_per_mib:.1f} ms/MiB"
        return f"{self.key} ({self.path}:{self.line}): {cost}"


@dataclass(frozen=True)
class CostReport:
    """The outcome of one slow-rule check."""

    threshold_ms_per_mib: float
    sample_bytes: int
    namespace_ms_per_mib: dict[str, float]  # each namespace as a whole (on a quarter of the
    # sample when that alone shows it at twice the budget or more)
    slow: tuple[RuleCost, ...]
    refused: tuple[str, ...] = ()  # namespace:rule left out of the compiled set
    refused_dependents: tuple[str, ...] = ()  # left out because they use a refused rule
    quarantined: tuple[str, ...] = ()  # namespace:rule scanned apart with their own timeout
    unchecked: tuple[str, ...] = ()  # not timed: the timing budget ran out or they failed alone
    timings: int = 0  # scans of the sample this check ran

    def to_json(self) -> dict[str, object]:
        return {
            "threshold_ms_per_mib": self.threshold_ms_per_mib,
            "sample_bytes": self.sample_bytes,
            "namespace_ms_per_mib": self.namespace_ms_per_mib,
            "slow": [{"rule": c.key, "ms_per_mib": c.ms_per_mib, "path": c.path, "line": c.line} for c in self.slow],
            "refused": list(self.refused),
            "refused_dependents": list(self.refused_dependents),
            "quarantined": list(self.quarantined),
            "unchecked": list(self.unchecked),
            "timings": self.timings,
        }


def ms_per_mib(rules: yara.Rules, sample: bytes | memoryview, repeats: int = 1, timeout_s: int = 30,
               stop_below: float | None = None) -> float:
    """Milliseconds per MiB for `rules` to scan `sample`: the fastest of `repeats` runs,
    less the cost of one call on empty data (evaluating every condition once; a warm-up too).

    With `stop_below`, a run already under it ends the measurement (more runs could only
    lower it). A scan that times out counts as infinitely slow.
    """
    overhead = min(_seconds(rules, b"", timeout_s) for _ in range(2))
    best = math.inf
    mib = max(len(sample), 1) / MiB
    for _ in range(repeats):
        best = min(best, max(0.0, _seconds(rules, sample, timeout_s) - overhead) * 1000 / mib)
        if math.isinf(best) or (stop_below is not None and best <= stop_below):
            break
    return best


def _seconds(rules: yara.Rules, data: bytes | memoryview, timeout_s: int) -> float:
    t0 = time.perf_counter()
    try:
        rules.match(data=data, timeout=timeout_s)
    except yara.TimeoutError:
        return math.inf
    return time.perf_counter() - t0


class _Timer:
    """Times rule groups on the sample, counting scans against the policy's budget."""

    def __init__(self, sample: bytes | memoryview, policy: SlowRulePolicy, externals: dict[str, object]) -> None:
        self.sample = memoryview(sample).cast("B")
        # A quarter of the sample is enough to see that a group is over budget; only a
        # group that looks cheap there needs the whole sample to be cleared.
        self.probe = self.sample[: max(4096, len(self.sample) // 4)]
        self.policy = policy
        self.externals = externals
        self.timings = 0

    @property
    def exhausted(self) -> bool:
        return self.timings >= self.policy.max_timings

    def group_cost(self, rules: yara.Rules) -> float:
        """A group's cost, cheaply: on the probe when that is clearly (2x) over budget, else
        on the whole sample. Enough to decide whether to split it."""
        thr = self.policy.max_rule_ms_per_mib
        self.timings += 1
        probe = ms_per_mib(rules, self.probe, 1, self.policy.timeout_s)
        if probe > 2 * thr:
            return probe
        return self.cost(rules)

    def cost(self, rules: yara.Rules) -> float:
        """The group's cost on the whole sample: one run if under budget, else the fastest
        of `repeats` (noise only ever adds time)."""
        self.timings += 1
        thr = self.policy.max_rule_ms_per_mib
        return ms_per_mib(rules, self.sample, self.policy.repeats, self.policy.timeout_s, stop_below=thr)


def find_slow_rules(
    namespaces: list[tuple[str, yara.Rules, RuleGraph]],
    sample: bytes | memoryview,
    policy: SlowRulePolicy,
    externals: dict[str, object],
) -> CostReport:
    """Time each namespace on `sample`; bisect the ones over budget down to single rules."""
    timer = _Timer(sample, policy, externals)
    thr = policy.max_rule_ms_per_mib
    ns_costs: dict[str, float] = {}
    slow: list[RuleCost] = []
    unchecked: list[str] = []
    for ns, compiled, graph in namespaces:
        if not graph.units:
            continue
        ns_costs[ns] = timer.group_cost(compiled)
        if ns_costs[ns] <= thr:
            continue
        # Depth first, left half first, so slow rules come out in file order. The whole
        # namespace is known to be over budget; each half is checked before it is split.
        stack: list[list[RuleUnit]] = []
        _push_halves(stack, list(graph.units))
        while stack:
            group = stack.pop()
            if timer.exhausted:
                unchecked += [f"{ns}:{u.name}" for u in group]
                continue
            rules = _compile_group(graph, group, externals)
            if rules is None:  # does not compile on its own: say so rather than guess
                unchecked += [f"{ns}:{u.name}" for u in group]
                continue
            if len(group) == 1:
                cost = timer.cost(rules)
                if cost > thr:
                    u = group[0]
                    slow.append(RuleCost(ns, u.name, cost, u.path, u.line))
            elif timer.group_cost(rules) > thr:
                _push_halves(stack, group)
    return CostReport(
        threshold_ms_per_mib=thr,
        sample_bytes=len(sample),
        namespace_ms_per_mib=ns_costs,
        slow=tuple(slow),
        unchecked=tuple(unchecked),
        timings=timer.timings,
    )


def _push_halves(stack: list[list[RuleUnit]], group: list[RuleUnit]) -> None:
    mid = len(group) // 2
    stack.append(group[mid:])
    stack.append(group[:mid])


def _compile_group(graph: RuleGraph, group: list[RuleUnit], externals: dict[str, object]) -> yara.Rules | None:
    source = graph.render(graph.closure([u.name for u in group]))
    try:
        return yara.compile(source=source, externals=externals)
    except yara.Error:
        return None
