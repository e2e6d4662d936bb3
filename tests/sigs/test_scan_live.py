"""End to end on the real lab guest: a bundle fetched over HTTPS becomes the rule set
`sva scan` uses, and a rule only that bundle has finds the infected guest's process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sva import lab
from sva.lab.scenarios import INFECTED, MARKER_ENV
from sva.sigs.content import builtin_rules
from sva.sigs.pipeline import Outcome, Refresher

from .conftest import SAMPLE
from .test_https import https_config, publish

pytestmark = pytest.mark.lab

# The marker holder's environment entry, name and value joined: only in that process's memory
# (the init script writes the value in quoted pieces), and no built-in rule looks for it.
TOKEN = f"{MARKER_ENV}=SVA-LAB"
LIVE_RULE = f"""
rule SVA_Test_Lab_Token_Env
{{
    meta:
        description = "the lab marker holder's environment entry (only in the fetched test bundle)"
        author = "tests/sigs"
    strings:
        $env = "{TOKEN}" ascii
    condition:
        $env
}}
"""


def test_fetched_bundle_is_what_sva_scan_uses(lab_guest, config, feed, ca, make_bundle, tmp_path) -> None:
    assert not builtin_rules().rules.match(data=b"\0" + TOKEN.encode() + b"\0"), "the built-in rules already match it"
    publish(feed, make_bundle(2, {"live/token.yar": LIVE_RULE}), 2)
    [r] = Refresher(https_config(config, feed, ca), sample=SAMPLE).check(force=True)
    assert r.outcome is Outcome.ACTIVATED, r
    res = subprocess.run(
        [sys.executable, "-m", "sva", "scan", f"lab:{lab_guest.name}", "--json", "--detectors", "yara_memory"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "SVA_SIGS_DIR": str(config.state_dir)},
    )
    assert res.returncode == 1, res.stderr[-3000:]
    alerts = json.loads(res.stdout)["alerts"]
    found = {(a["finding"]["evidence"]["signature"], (a["finding"].get("process") or {}).get("pid")) for a in alerts}
    holder = next(p.pid for p in lab.ps(lab_guest.name) if p.comm == INFECTED.process("marker_holder").comm)
    assert ("live:SVA_Test_Lab_Token_Env", holder) in found, sorted(found)
    assert ("test:SVA_Lab_Marker", holder) in found  # the bundle's copy of the built-in rules still work


def test_the_engine_loop_switches_to_a_new_bundle_at_its_next_cycle(lab_guest, config, make_bundle) -> None:
    from sva.engine.engine import Engine
    from sva.engine.facts import FactRegistry, backend_fact_providers
    from sva.engine.model import VmIdentity
    from sva.engine.registry import load_detectors
    from sva.engine.ruleload import load_rules
    from sva.engine.rules import default_rules_dir
    from sva.guest.facts import GuestSession
    from sva.guest.memscan import YaraMemoryScan, memory_providers
    from sva.sigs.active import ActiveRules
    from sva.sigs.store import SignatureStore
    from sva.vmi import open_target

    active = ActiveRules(SignatureStore(config.state_dir))
    with open_target(f"lab:{lab_guest.name}") as backend:
        session = GuestSession()
        session.attach(backend)
        engine = Engine(
            VmIdentity(name=lab_guest.name, target=f"lab:{lab_guest.name}"), rules=load_rules(default_rules_dir()),
            detectors=load_detectors(["yara_memory"]), backend=backend,
            facts=FactRegistry([*backend_fact_providers(), *session.providers(),
                                *memory_providers(session, YaraMemoryScan(rules=active))]),
        )  # fmt: skip
        try:
            first = {a.finding.evidence["signature"] for a in engine.run_cycle().alerts}
            assert "test:SVA_Lab_Marker" in first and "live:SVA_Test_Lab_Token_Env" not in first, first
            # the daemon's updater installs a bundle between two cycles, in the same process
            r = Refresher(config, active=active, sample=SAMPLE).install_bytes(
                make_bundle(2, {"live/token.yar": LIVE_RULE}).read_bytes(), "between cycles")
            assert r.outcome is Outcome.ACTIVATED, r
            second = engine.run_cycle()
            new = {a.finding.evidence["signature"] for a in second.new}
            assert "live:SVA_Test_Lab_Token_Env" in new, new
            assert not second.error
        finally:
            engine.close()
