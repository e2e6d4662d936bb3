"""`sva rules check` and `sva rules list` as a user runs them: exit 0 valid, 1 invalid, 2 usage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def sva(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SVA_RULES_DIR", None)
    return subprocess.run([sys.executable, "-m", "sva", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_shipped_rules_pass_by_default_and_by_path() -> None:
    res = sva("rules", "check")
    assert res.returncode == 0, res.stdout + res.stderr
    rules = Path(__file__).resolve().parents[2] / "rules"
    # rules/*.toml (memory) and rules/network/*.toml (sva net) are both checked by default
    shipped = len(list(rules.glob("*.toml"))) + len(list((rules / "network").glob("*.toml")))
    assert shipped > len(list(rules.glob("*.toml")))
    assert res.stdout.startswith("ok: ") and f"{shipped} file(s)" in res.stdout
    res = sva("rules", "check", "rules/process_policy.toml", "--json")
    assert res.returncode == 0
    doc = json.loads(res.stdout)
    assert doc["valid"] and doc["rules"] >= 5 and doc["errors"] == []


def test_invalid_files_give_file_line_messages_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "good.toml").write_text('[ruleset]\nversion = "1"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[ruleset]\nversion = "1"\n\n[[rule]]\nid = "X"\nkind = "cmdline"\nversion = 1\n'
        'maturity = "beta"\nseverity = "high"\ntitle = "t"\ndescription = "d"\npatterns = ["(unclosed"]\n'
    )
    res = sva("rules", "check", str(tmp_path))
    assert res.returncode == 1
    assert res.stdout.splitlines() == [
        f"{bad}:8: rule 'X': maturity: 'beta' is not one of stable, incubating, sandbox, deprecated",
        f"{bad}:12: rule 'X': patterns[0]: bad regular expression '(unclosed': "
        "missing ), unterminated subpattern at position 0",
    ]
    assert "2 error(s)" in res.stderr
    bad.write_text("[ruleset\n")
    res = sva("rules", "check", str(bad))
    assert res.returncode == 1 and res.stdout.startswith(f"{bad}:1: invalid TOML: ")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    res = sva("rules", "check", str(tmp_path / "missing.toml"))
    assert res.returncode == 2
    assert res.stderr.strip() == f"sva rules: error: {tmp_path}/missing.toml: no such rules file or directory"
    assert sva("rules", "check", "--bogus").returncode == 2
    assert sva("rules").returncode == 2


def test_list_shows_rules() -> None:
    res = sva("rules", "list", "--json")
    assert res.returncode == 0
    rules = {r["id"]: r for r in json.loads(res.stdout)}
    assert rules["SVA-PROC-MINER-NAME"]["mitre"] == ["T1496"]
    assert re.search(r"rules/process_policy\.toml:\d+$", rules["SVA-PROC-REVSHELL"]["source"])
