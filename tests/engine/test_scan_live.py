"""`sva scan` / the engine over real lab guests with live volatility3 facts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from sva import lab
from sva.engine.engine import Engine
from sva.engine.facts import FactRegistry, backend_fact_providers
from sva.engine.model import VmIdentity
from sva.engine.registry import load_detectors
from sva.engine.ruleload import load_rules
from sva.engine.rules import default_rules_dir
from sva.guest.facts import GuestSession
from sva.vmi import open_target

pytestmark = pytest.mark.lab


def test_sva_scan_on_the_infected_guest_names_the_right_pids(lab_guest) -> None:
    truth = lab.ps(lab_guest.name)
    res = subprocess.run(
        [sys.executable, "-m", "sva", "scan", f"lab:{lab_guest.name}", "--json", "--detectors", "process_policy"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 1, res.stderr[-2000:]  # 1 = findings
    report = json.loads(res.stdout)
    by_rule: dict[str, set[int]] = {}
    for a in report["alerts"]:
        assert a["state"] == "new" and a["vm"]["name"] == lab_guest.name
        by_rule.setdefault(a["finding"]["rule"], set()).add(a["finding"]["process"]["pid"])
    xmrig = {p.pid for p in truth if p.comm == "xmrig"}
    revshell = {p.pid for p in truth if p.comm == "sh" and "nc 10.0.2.100" in p.args}
    assert xmrig and by_rule.get("SVA-PROC-MINER-NAME") == xmrig, by_rule
    assert revshell and by_rule.get("SVA-PROC-REVSHELL") == revshell, by_rule
    assert report["vm"]["boot_id"]


def test_clean_guest_is_quiet_over_20_cycles() -> None:
    name = f"clean{os.getpid()}"
    lab.up(name, scenario="clean")
    try:
        with open_target(f"lab:{name}") as backend:
            session = GuestSession()
            session.attach(backend)
            engine = Engine(
                VmIdentity(name=name, target=f"lab:{name}"),
                rules=load_rules(default_rules_dir()),
                detectors=load_detectors(["process_policy"]),
                facts=FactRegistry([*backend_fact_providers(), *session.providers()]),
                backend=backend,
            )
            reports = []
            engine.run(0.05, threading.Event(), on_cycle=reports.append, max_cycles=20)
            engine.close()
        assert len(reports) == 20
        for r in reports:
            assert not r.error, r.error
            assert r.run_of("process_policy").status == "ok", r.health
            assert not (r.new or r.changed or r.still_present), [str(a) for a in r.new]
    finally:
        lab.down(name)


def test_sva_scan_bad_target_is_exit_2() -> None:
    res = subprocess.run([sys.executable, "-m", "sva", "scan", "qemu:/nonexistent.sock"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "/nonexistent.sock" in res.stderr


def test_sva_watch_prints_each_alert_once_across_cycles(lab_guest) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "sva", "watch", f"lab:{lab_guest.name}", "--detectors", "process_policy",
         "--interval", "0.5", "--cycles", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    xmrig_pid = next(p.pid for p in lab.ps(lab_guest.name) if p.comm == "xmrig")
    miner = [line for line in res.stdout.splitlines() if line.startswith("NEW") and "coin-miner process name" in line]
    # Three cycles, one alert: a process that stays malicious is not re-alerted.
    assert miner == [f"NEW [HIGH] Known coin-miner process name: pid {xmrig_pid} (xmrig)"], res.stdout[-3000:]
