"""`--signatures DIR`: an unvetted rule directory is timed, and its slow rules scanned apart."""

from __future__ import annotations

from pathlib import Path

from sva.sigs.active import rules_for_scan


def test_a_rule_directory_gets_the_slow_rule_check(tmp_path: Path) -> None:
    d = tmp_path / "rules"
    d.mkdir()
    (d / "mixed.yar").write_text(
        'rule Quick { strings: $a = "SVA-QUICK-MARKER-0001" condition: $a }\n'
        # a hex-run regex: one atom per byte of memory, costly everywhere (shared/testdata/yara/README.md)
        "rule Crawl { strings: $r = /[0-9a-fA-F]{32}/ wide ascii condition: $r }\n"
    )
    rules = rules_for_scan(str(d))()
    assert {n for q in rules.quarantine for n in q.slow} == {"Crawl"}
    assert {"rules:Quick", "rules:Crawl"} <= set(rules.infos)  # loose files: the directory names the set
