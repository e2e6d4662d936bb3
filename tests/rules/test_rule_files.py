"""Rules as data: the shipped files are valid, and every kind of mistake is reported as
`file:line: message` at the right line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sva.engine.ruleload import check_rules, load_rules
from sva.engine.rules import (
    CmdlineRule,
    ExecPathRule,
    Maturity,
    ParentChildRule,
    ProcessNameRule,
    ProcessRule,
    Severity,
    default_rules_dir,
)
from sva.errors import RulesError

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"

BASE = """\
[ruleset]
name = "t"
version = "1.0.0"

[[rule]]
id = "T-1"
kind = "cmdline"
version = 1
maturity = "stable"
severity = "high"
mitre = ["T1059.004"]
title = "t"
description = "d"
patterns = [
  'ok',  # a comment with 'quotes' and = signs
  "fine",
]
"""
# Lines: 1 [ruleset] · 3 version · 5 [[rule]] · 6 id · 7 kind · 8 version · 9 maturity ·
# 10 severity · 11 mitre · 12 title · 14 patterns · 15 'ok' · 16 "fine"

SECOND = """
[[rule]]
id = "T-1"
kind = "process_name"
version = 1
maturity = "sandbox"
severity = "low"
title = "u"
description = "e"
names = ["x"]
"""  # appended to BASE: its [[rule]] is line 19, its id line 20


def _errors(tmp_path: Path, text: str, name: str = "f.toml") -> list[str]:
    path = tmp_path / name
    path.write_text(text)
    _ruleset, errors = check_rules([path])
    prefix = f"{tmp_path}/"
    return [str(e).replace(prefix, "") for e in errors]


def _without_line(text: str, n: int) -> str:
    lines = text.splitlines(keepends=True)
    return "".join(lines[: n - 1] + lines[n:])


def test_base_is_valid(tmp_path: Path) -> None:
    assert _errors(tmp_path, BASE) == []


def test_shipped_rules_are_valid_versioned_documented_and_tunable() -> None:
    assert default_rules_dir() == RULES_DIR
    ruleset, errors = check_rules([RULES_DIR], frozenset(Maturity))
    assert errors == []
    assert {f.name for f in ruleset.files} >= {"process_policy", "suppressions"}
    assert all(f.version for f in ruleset.files)
    kinds = {type(r) for r in ruleset.rules}
    assert kinds >= {ProcessNameRule, ExecPathRule, CmdlineRule, ParentChildRule}
    for r in ruleset.rules:
        assert r.mitre and r.version >= 1, r.id
        # The description says what goes wrong and how to tune it.
        assert "False positives" in r.description and "Tune" in r.description, r.id
        # Empty allow-lists are the documented tuning points: present in the file, empty.
        if isinstance(r, ProcessRule):
            assert (r.allow_comms, r.allow_paths, r.allow_cmdlines) == ((), (), ()), r.id
    text = (RULES_DIR / "process_policy.toml").read_text()
    assert text.count("allow_comms = []") == len([r for r in ruleset.rules if isinstance(r, ProcessRule)])
    assert ruleset.suppressions == ()  # shipped empty


def test_regexes_are_compiled_at_load_and_sources_recorded(tmp_path: Path) -> None:
    (tmp_path / "f.toml").write_text(BASE)
    (rule,) = load_rules(tmp_path).rules
    assert isinstance(rule, CmdlineRule)
    assert all(isinstance(p, re.Pattern) for p in rule.patterns)
    assert (rule.source, rule.ruleset_version, rule.severity) == (f"{tmp_path}/f.toml:5", "1.0.0", Severity.HIGH)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(lambda t: t.replace('severity = "high"', 'severity = "high'),
                     "f.toml:10: invalid TOML: ", id="toml-syntax"),
        pytest.param(lambda t: t.replace('title = "t"', 'title = "t"\npatern = "x"'),
                     "f.toml:13: rule 'T-1': unknown key 'patern' (did you mean 'patterns'?)", id="unknown-key"),
        pytest.param(lambda t: t.replace('"fine"', "'fine('"),
                     "f.toml:16: rule 'T-1': patterns[1]: bad regular expression 'fine(': "
                     "missing ), unterminated subpattern at position 4", id="bad-regex"),
        pytest.param(lambda t: t.replace("version = 1\n", 'version = "1"\n'),
                     "f.toml:8: rule 'T-1': version: expected an integer, got a string", id="wrong-type"),
        pytest.param(lambda t: t.replace('mitre = ["T1059.004"]', 'mitre = "T1059.004"'),
                     "f.toml:11: rule 'T-1': mitre: expected an array, got a string", id="wrong-type-array"),
        pytest.param(lambda t: _without_line(t, 8),
                     "f.toml:5: rule 'T-1': missing required key 'version'", id="missing-version"),
        pytest.param(lambda t: _without_line(t, 9),
                     "f.toml:5: rule 'T-1': missing required key 'maturity'", id="missing-maturity"),
        pytest.param(lambda t: t.replace('"stable"', '"beta"'),
                     "f.toml:9: rule 'T-1': maturity: 'beta' is not one of stable, incubating, sandbox, deprecated",
                     id="bad-maturity"),
        pytest.param(lambda t: t.replace('"high"', '"urgent"'),
                     "f.toml:10: rule 'T-1': severity: 'urgent' is not one of info, low, medium, high, critical",
                     id="bad-severity"),
        pytest.param(lambda t: t + SECOND,
                     "f.toml:20: rule 'T-1': duplicate id 'T-1' (first defined at f.toml:6)", id="duplicate-id"),
        pytest.param(lambda t: _without_line(t, 3),
                     "f.toml:1: [ruleset]: missing required key 'version'", id="missing-ruleset-version"),
        pytest.param(lambda t: t.replace('[ruleset]\nname = "t"\nversion = "1.0.0"\n', "\n\n\n"),
                     "f.toml:1: missing [ruleset] table (with name, version, description)", id="missing-ruleset"),
        pytest.param(lambda t: t.replace('"cmdline"', '"cmd_line"'),
                     # (the list of known kinds grows with the detectors; its start is stable)
                     "f.toml:7: rule 'T-1': kind: unknown rule kind 'cmd_line' (one of cmdline, exec_path, ",
                     id="unknown-kind"),
        pytest.param(lambda t: t.replace('"T1059.004"', '"T59"'),
                     "f.toml:11: rule 'T-1': mitre[0]: 'T59' is not a MITRE ATT&CK id (T1234, T1234.001 or TA0001)",
                     id="bad-mitre"),
        pytest.param(lambda t: t.replace('id = "T-1"', 'id = "has space"'),
                     "f.toml:6: rule 'has space': id: 'has space' is not a valid id", id="bad-id"),
        pytest.param(lambda t: t.replace("[[rule]]", "[rule]"),
                     "f.toml:5: [rule] must be an array of tables: write [[rule]]", id="table-not-array"),
        pytest.param(lambda t: t + "\n[rules]\nx = 1\n",
                     "f.toml:19: unknown top-level key 'rules'", id="unknown-top-level"),
        pytest.param(lambda t: t.replace("patterns = [\n  'ok',  # a comment with 'quotes' and = signs\n  \"fine\",\n]",
                                         "patterns = []"),
                     "f.toml:14: rule 'T-1': needs at least one pattern", id="empty-patterns"),
    ],
)
def test_each_mistake_is_reported_at_its_line(tmp_path: Path, edit, expected: str) -> None:  # type: ignore[no-untyped-def]
    errors = _errors(tmp_path, edit(BASE))
    assert errors, "no error reported"
    assert errors[0].startswith(expected), errors


def test_every_problem_is_reported_not_only_the_first(tmp_path: Path) -> None:
    text = BASE.replace('"stable"', '"beta"').replace('"fine"', "'['").replace('title = "t"', 'title = 5')
    errors = _errors(tmp_path, text + SECOND)
    assert [e.split(":")[1] for e in errors] == ["9", "12", "16", "20"]


def test_duplicate_ids_across_files_name_the_first_file(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(BASE)
    (tmp_path / "b.toml").write_text(BASE.replace('name = "t"', 'name = "u"'))
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path)
    e = info.value
    assert (Path(e.path).name, e.line) == ("b.toml", 6)
    assert f"duplicate id 'T-1' (first defined at {tmp_path}/a.toml:6)" in e.reason
    assert len(e.errors) == 1


def test_suppression_mistakes(tmp_path: Path) -> None:
    text = '[ruleset]\nversion = "1"\n\n[[suppression]]\nid = "S"\nreason = "r"\nvm = "web01"\nprocesses = ["x"]\n'
    assert _errors(tmp_path, text) == [
        "f.toml:8: suppression 'S': unknown key 'processes' (did you mean 'process'?)",
        "f.toml:7: suppression 'S': vm: expected an array, got a string",
    ]


def test_maturity_selects_rules(tmp_path: Path) -> None:
    (tmp_path / "f.toml").write_text(BASE.replace("T-1", "T-0") + SECOND)
    rs = load_rules(tmp_path)
    assert [r.id for r in rs.active()] == ["T-0"]  # sandbox is off by default
    assert [r.id for r in rs.with_maturities(["stable", "sandbox"]).active()] == ["T-0", "T-1"]
    assert rs.of_kind(ProcessNameRule) == ()
