"""Rendering a cycle for humans and as JSON."""

from __future__ import annotations

import json

from sva.engine.report import render_text, report_json
from sva.engine.rules import RuleSet, Suppression
from sva.engine.testing import TestFinding, proc

from .helpers import detector, make_engine


def _engine():  # type: ignore[no-untyped-def]
    state = {"cycle": 0}

    def look(facts: object, rules: object) -> list[TestFinding]:
        state["cycle"] += 1
        miner = proc(102, "xmrig", "/bin/sh", "/tmp/xmrig", "-o", "stratum+tcp://p:1", ppid=1, exe="/bin/busybox")
        out = [TestFinding(rule="SVA-PROC-MINER-NAME", title="Known coin-miner process name: pid 102 (xmrig)",
                           mitre=("T1496",), process=miner, parent=proc(1, "init"),
                           evidence={"matched": "xmrig", "matched_on": "comm", "pid": 102})]  # fmt: skip
        if state["cycle"] == 1:
            out.append(TestFinding(rule="GONE", title="short-lived", process=proc(7, "nc")))
        out.append(TestFinding(rule="QUIET", title="suppressed one", process=proc(8, "cron")))
        return out

    rules = RuleSet(suppressions=(Suppression(id="SUP-cron", reason="ok", process=("cron",)),))
    return make_engine([detector("process_policy", look), detector("broken", lambda f, r: 1 / 0)], rules=rules)


def test_text_report_shows_vm_what_process_rule_evidence_and_mitre() -> None:
    eng = _engine()
    text = render_text(eng.run_cycle())
    assert "cycle 1 · web01 (snapshot:web01.raw, boot boot-1)" in text
    assert "2 new, 0 changed, 0 still present, 0 resolved, 1 suppressed" in text
    assert "NEW [LOW] Known coin-miner process name: pid 102 (xmrig)" in text
    assert "process   pid 102 xmrig (ppid 1 init, uid 0)" in text
    assert "cmdline   /bin/sh /tmp/xmrig -o stratum+tcp://p:1" in text
    assert "rule      SVA-PROC-MINER-NAME · signatures none · ATT&CK T1496" in text
    assert "evidence  matched = xmrig" in text and "pid = 102" not in text  # process fields shown once
    assert "SUPPRESSED by SUP-cron [LOW] suppressed one · QUIET pid 8 (cron)" in text
    assert "broken" in text and "ZeroDivisionError" in text

    text = render_text(eng.run_cycle())
    assert "STILL PRESENT [LOW] Known coin-miner process name" in text
    assert "RESOLVED [LOW] short-lived · GONE pid 7 (nc)" in text
    assert "NEW " not in text
    assert "STILL PRESENT" not in render_text(eng.run_cycle(), show_still_present=False)


def test_json_report_round_trips() -> None:
    eng = _engine()
    eng.run_cycle()
    doc = json.loads(json.dumps(report_json(eng.run_cycle())))
    assert doc["cycle"] == 2
    assert doc["counts"] == {"new": 0, "still_present": 1, "changed": 0, "resolved": 1, "suppressed": 1}
    states = sorted(a["state"] for a in doc["alerts"])
    assert states == ["resolved", "still_present"]
    miner = next(a for a in doc["alerts"] if a["state"] == "still_present")
    assert miner["finding"]["process"]["argv"][1] == "/tmp/xmrig"
    assert miner["finding"]["mitre"] == ["T1496"]
    assert [d["status"] for d in doc["detectors"]] == ["ok", "error"]
    assert doc["health"][0]["component"] == "detector:broken"
