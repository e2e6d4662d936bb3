"""YARA over guest memory: rule loading, zero-copy physical scans, incremental rescans.

    from sva.scan import CompiledRuleSet, PhysicalScanner, IncrementalScanner
    rules = CompiledRuleSet.default()                  # signatures/ memory + test sets (not network/)
    report = PhysicalScanner(rules).scan(backend)      # every RAM region, 16 MiB chunks
    for m in report.matches:
        print(m.key, m.author, m.reference, [hex(a) for a in m.addresses])
    inc = IncrementalScanner(rules)
    inc.cycle(backend)                                  # first cycle: full scan
    inc.cycle(backend)                                  # then only pages whose hash changed

Modules: `rules` (loading, namespaces, externals, errors, metadata), `cost` (slow-rule
check), `source` (cutting YARA text into rules), `sample` (memory to time rules on),
`scanner` (chunked zero-copy scans, matches, problems; slow rules scanned apart with their own
timeout), `incremental` (per-page hashes).
"""

from sva.scan.cost import CostReport, RuleCost, SlowRulePolicy
from sva.scan.incremental import IncrementalConfig, IncrementalScanner
from sva.scan.rules import (
    DEFAULT_EXTERNALS,
    CompiledRuleSet,
    CompileProblem,
    QuarantinedRules,
    RuleInfo,
    RuleSource,
    discover,
    signatures_dir,
)
from sva.scan.scanner import (
    PhysicalScanner,
    ProblemKind,
    ScanConfig,
    ScanProblem,
    ScanReport,
    StringHit,
    YaraMatch,
)

__all__ = [
    "DEFAULT_EXTERNALS",
    "CompileProblem",
    "CompiledRuleSet",
    "CostReport",
    "IncrementalConfig",
    "IncrementalScanner",
    "PhysicalScanner",
    "ProblemKind",
    "QuarantinedRules",
    "RuleCost",
    "RuleInfo",
    "RuleSource",
    "ScanConfig",
    "ScanProblem",
    "ScanReport",
    "SlowRulePolicy",
    "StringHit",
    "YaraMatch",
    "discover",
    "signatures_dir",
]
