"""Per-rule timeouts: slow rules scanned apart, each with its own timeout (real libyara).

The pathological rule is `/AB[AB]*C/` over a long run of "ABAB…": every other byte is an
atom hit, and from each libyara walks the run up to its 4096-byte regex limit looking for
the "C". On this machine 64 KiB of it take ~0.9 s; the 2 MiB run planted below would take
~30 s, so a 1 s timeout fires on it even on a machine many times faster.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sva.errors import ConfigError
from sva.scan import (
    CompiledRuleSet,
    IncrementalConfig,
    IncrementalScanner,
    PhysicalScanner,
    ProblemKind,
    ScanConfig,
    ScanReport,
    SlowRulePolicy,
)
from sva.scan.sample import synthetic_memory
from sva.testing import synthetic_backend

from .conftest import poke, write_rules

MiB = 1 << 20
CHUNK = 4 * MiB
RUN = b"AB" * (MiB)  # 2 MiB of the pathological rule's worst case
SLOW_KEY = "quar:Pathological_AB"

RULES = {
    "000_private.yar": 'private rule is_tagged { strings: $t = "SVA-QTAG" condition: $t }\n',
    "normal.yar": """
rule Normal_One { strings: $a = "SVA-NORMAL-ONE-MARKER" condition: $a }
rule Normal_Two { strings: $b = "SVA-NORMAL-TWO-MARKER" condition: $b and is_tagged }
""",
    "slow.yar": """
rule Pathological_AB
{
    meta:
        author = "sva tests"
        reference = "tests/scan/test_slow_rules.py"
    strings:
        $r = /AB[AB]*C/
    condition:
        $r and is_tagged
}
rule Uses_Slow { strings: $u = "SVA-USES-SLOW" condition: $u and Pathological_AB }
""",
}

# Timed on a little of the worst case plus memory-like bytes: the slow rule is far over
# budget, the others far under (~1 ms/MiB) even on a busy host.
POLICY = SlowRulePolicy(max_rule_ms_per_mib=20.0, timeout_s=1)
SAMPLE = b"AB" * (4 << 10) + synthetic_memory(MiB // 2)
CONFIG = ScanConfig(chunk_size=CHUNK, overlap=4096, slow_rule_timeout_s=1, timeout_s=30)


def _rule_dir(root: Path) -> Path:
    d = root / "quar"
    for name, text in RULES.items():
        write_rules(d, name, text)
    return d


@pytest.fixture(scope="module")
def rule_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _rule_dir(tmp_path_factory.mktemp("slowrules"))


@pytest.fixture(scope="module")
def quarantined(rule_dir: Path) -> CompiledRuleSet:
    return CompiledRuleSet.load(rule_dir, slow_policy=POLICY, sample=SAMPLE)


def _guest_bytes() -> bytearray:
    """Chunk 0: the pathological run, then every normal marker. Chunk 1: a quick match of
    the slow rule (and its user), and one normal marker."""
    buf = bytearray(2 * CHUNK)
    buf[0x1000 : 0x1000 + len(RUN)] = RUN
    for off, data in ((0x300000, b"SVA-NORMAL-ONE-MARKER"), (0x301000, b"SVA-NORMAL-TWO-MARKER"),
                      (0x302000, b"SVA-QTAG")):  # fmt: skip
        buf[off : off + len(data)] = data
    for off, data in ((CHUNK + 0x1000, b"SVA-QTAG"), (CHUNK + 0x2000, b"xxABCxx"),
                      (CHUNK + 0x3000, b"SVA-USES-SLOW"), (CHUNK + 0x4000, b"SVA-NORMAL-ONE-MARKER")):  # fmt: skip
        buf[off : off + len(data)] = data
    return buf


def _found(report: ScanReport) -> list[tuple[str, tuple[int, ...]]]:
    return sorted((m.key, m.addresses) for m in report.matches)


def test_slow_rule_is_compiled_apart(quarantined: CompiledRuleSet) -> None:
    # Uses_Slow is flagged too (timed alone, it runs the slow rule it uses); one group holds
    # both, so the timeout blames the rule that is slow by itself
    assert quarantined.slow == (SLOW_KEY, "quar:Uses_Slow")
    [group] = quarantined.quarantine
    assert group.key == SLOW_KEY and group.slow == ("Pathological_AB", "Uses_Slow")
    # its user goes with it: its result depends on the slow rule's
    assert set(group.keys) == {SLOW_KEY, "quar:Uses_Slow"}
    assert quarantined.cost is not None and set(quarantined.cost.quarantined) == set(group.keys)
    assert quarantined.cost.to_json()["quarantined"] == list(quarantined.cost.quarantined)
    main = {m.rule for m in quarantined.fast_rules.match(data=b"ABABC SVA-QTAG SVA-USES-SLOW SVA-NORMAL-ONE-MARKER")}
    assert main == {"Normal_One"}  # the slow rule and its user are not in the main set
    # the whole set stays one object for one-shot callers (canary checks)
    whole = {m.rule for m in quarantined.rules.match(data=b"ABABC SVA-QTAG SVA-USES-SLOW")}
    assert whole == {"Pathological_AB", "Uses_Slow"}
    assert SLOW_KEY in quarantined.infos and "quar:is_tagged" in quarantined.infos


def test_timeout_loses_only_the_slow_rule(quarantined: CompiledRuleSet) -> None:
    report = PhysicalScanner(quarantined, CONFIG).scan_buffer(_guest_bytes(), base_address=0x10_0000)
    base = 0x10_0000
    [problem] = report.problems
    assert problem.kind is ProblemKind.TIMEOUT and problem.rule == SLOW_KEY
    assert (problem.start, problem.end) == (base, base + CHUNK + 4096)
    assert SLOW_KEY in problem.message and "quar:Uses_Slow" in problem.message
    # every normal rule's results from the timed-out chunk are kept
    assert report.hit_addresses("quar:Normal_One") == [base + 0x300000, base + CHUNK + 0x4000]
    assert report.hit_addresses("quar:Normal_Two") == [base + 0x301000]
    # the quarantined rules match elsewhere, attributed like any other match
    [slow] = report.by_rule()[SLOW_KEY]
    assert (slow.namespace, slow.rule, slow.author, slow.reference) == (
        "quar", "Pathological_AB", "sva tests", "tests/scan/test_slow_rules.py")
    assert [h.identifier for h in slow.hits] == ["$r"] and slow.hits[0].address == base + CHUNK + 0x2002
    assert slow.hits[0].data == b"ABC" and slow.block_start == base + CHUNK
    assert report.hit_addresses("quar:Uses_Slow") == [base + CHUNK + 0x3000]
    assert report.rules_matched == {"quar:Normal_One", "quar:Normal_Two", SLOW_KEY, "quar:Uses_Slow"}
    assert report.calls == 4  # two chunks, each: the main set, then the slow rule's set


def test_without_isolation_a_timeout_loses_every_rule(rule_dir: Path, quarantined: CompiledRuleSet) -> None:
    # what the quarantine is for: one match() call per chunk, so the whole chunk is lost
    whole = CompiledRuleSet.load(rule_dir, slow_policy=SlowRulePolicy(max_rule_ms_per_mib=20.0, timeout_s=1,
                                                                      isolate_slow=False), sample=SAMPLE)
    assert SLOW_KEY in whole.slow and whole.quarantine == () and whole.fast_rules is whole.rules
    report = PhysicalScanner(whole, ScanConfig(chunk_size=CHUNK, overlap=4096, timeout_s=1)).scan_buffer(_guest_bytes())
    assert [(p.kind, p.rule) for p in report.problems] == [(ProblemKind.TIMEOUT, None)]
    assert report.hit_addresses("quar:Normal_One") == [CHUNK + 0x4000]  # chunk 0's is lost
    assert "quar:Normal_Two" not in report.rules_matched
    assert report.calls == 2
    # the same rules scanned another way: another fingerprint
    assert whole.fingerprint != quarantined.fingerprint


def test_no_slow_rules_one_call_per_chunk(tmp_path: Path) -> None:
    d = tmp_path / "plain"
    write_rules(d, "normal.yar", RULES["normal.yar"])
    write_rules(d, "000_private.yar", RULES["000_private.yar"])
    rs = CompiledRuleSet.load(d, slow_policy=POLICY, sample=synthetic_memory(MiB))
    assert rs.slow == () and rs.quarantine == () and rs.fast_rules is rs.rules
    buf = bytearray(3 * CHUNK)
    buf[5:26] = b"SVA-NORMAL-ONE-MARKER"
    report = PhysicalScanner(rs, ScanConfig(chunk_size=CHUNK, overlap=4096)).scan_buffer(buf)
    assert report.calls == 3 and report.rules_matched == {"plain:Normal_One"} and report.problems == []


def test_fingerprint_follows_the_slow_rule(tmp_path: Path, quarantined: CompiledRuleSet) -> None:
    d = _rule_dir(tmp_path)  # fingerprints name the files: compare loads of the same directory
    same = CompiledRuleSet.load(d, slow_policy=POLICY, sample=SAMPLE)
    assert [q.keys for q in same.quarantine] == [q.keys for q in quarantined.quarantine]
    slow_file = d / "slow.yar"
    slow_file.write_text(slow_file.read_text().replace('author = "sva tests"', 'author = "someone else"'))
    edited = CompiledRuleSet.load(d, slow_policy=POLICY, sample=SAMPLE)
    assert edited.quarantine and edited.fingerprint != same.fingerprint
    report = PhysicalScanner(edited, CONFIG).scan_buffer(b"SVA-QTAG ABABC".ljust(CHUNK, b"\0"))
    assert [m.author for m in report.matches] == ["someone else"]


def test_incremental_retries_only_the_slow_rule(tmp_path: Path, quarantined: CompiledRuleSet) -> None:
    guest = bytes(_guest_bytes())
    with synthetic_backend(tmp_path, [(0, 2 * CHUNK)], seed=5) as b:
        poke(b, 0, guest)
        # whole chunks as blocks (the guest is mostly zero bytes, which full scans skip by default)
        inc = IncrementalScanner(quarantined, CONFIG, IncrementalConfig(skip_zero_blocks=False))
        first = inc.cycle(b)
        assert first.full and [(p.kind, p.rule) for p in first.problems] == [(ProblemKind.TIMEOUT, SLOW_KEY)]
        assert first.rules_matched == {"quar:Normal_One", "quar:Normal_Two", SLOW_KEY, "quar:Uses_Slow"}

        # nothing changed: only the slow rule's set runs, only on the chunk it lost
        second = inc.cycle(b)
        assert not second.full and second.pages_changed == 0
        assert second.calls == 1
        assert [(p.kind, p.rule, p.start) for p in second.problems] == [(ProblemKind.TIMEOUT, SLOW_KEY, 0)]
        assert _found(second) == _found(first)  # the other rules' results kept, none twice

        # the pathological run is gone and the slow rule's string is there: found, no problem
        poke(b, 0x1000, bytes(len(RUN)))
        poke(b, 0x5000, b"ABC")
        third = inc.cycle(b)
        assert not third.full and third.problems == []
        assert inc.scanner.rules.quarantine  # still scanned apart
        assert sorted(third.hit_addresses(SLOW_KEY)) == [0x5000, CHUNK + 0x2002]
        assert third.hit_addresses("quar:Normal_One") == [0x300000, CHUNK + 0x4000]

        # and the next cycle has nothing left to retry
        fourth = inc.cycle(b)
        assert fourth.calls == 0 and fourth.problems == []


def test_slow_rule_timeout_is_validated() -> None:
    with pytest.raises(ConfigError, match="slow_rule_timeout_s"):
        ScanConfig(slow_rule_timeout_s=0)
