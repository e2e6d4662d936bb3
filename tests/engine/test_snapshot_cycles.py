"""Cycles whose consistent facts come from short-pause page copies (sva.vmi.pagesnap),
on the real infected lab guest, against cycles that walk inside a classic freeze."""

from __future__ import annotations

import time

import pytest

from sva import lab
from sva.engine.scan_cli import assemble_engine
from sva.vmi import open_target

pytestmark = pytest.mark.lab

ALL_MEMORY = ["process_policy", "hidden_processes", "kernel_integrity", "injected_code", "yara_memory"]


def _alerts(report) -> set[tuple[str, int | None]]:
    return {(a.finding.rule, a.finding.process.pid if a.finding.process else None)
            for a in (*report.new, *report.changed, *report.still_present)}  # fmt: skip


def test_snapshot_cycles_find_what_frozen_cycles_find(lab_guest) -> None:
    with open_target(f"lab:{lab_guest.name}") as backend:
        snap, _ = assemble_engine(f"lab:{lab_guest.name}", backend, [], vm_name="snap", detectors=ALL_MEMORY)
        classic, _ = assemble_engine(f"lab:{lab_guest.name}", backend, [], vm_name="classic", detectors=ALL_MEMORY,
                                     snapshot_attempts=0)  # fmt: skip
        first = snap.run_cycle()
        stats = snap.snapshot_stats
        # Nothing was copied the first time (no working set yet): redone with what it read.
        assert stats is not None and stats.attempts >= 2, stats
        reports = [snap.run_cycle() for _ in range(3)]
        stats = snap.snapshot_stats
        assert stats.consistent and stats.missed == 0 and stats.pages >= stats.touched > 0, stats
        ref = classic.run_cycle()
        assert classic.snapshot_stats is None
        for r in (first, *reports, ref):
            assert not r.error and r.pause_seconds is not None
            assert all(d.status == "ok" for d in r.detectors), [(d.detector, d.message) for d in r.detectors]
            assert all(f.in_freeze for f in r.facts if f.name in ("processes", "task_views", "syscall_table"))
        assert _alerts(reports[-1]) == _alerts(ref)
        miners = {p.pid for p in lab.ps(lab_guest.name) if p.comm == "xmrig"}
        assert miners and {pid for rule, pid in _alerts(ref) if rule == "SVA-PROC-MINER-NAME"} == miners


def test_a_process_started_between_cycles_is_seen_through_a_fresh_copy(lab_guest) -> None:
    comm = f"xmrig{int(time.time()) % 10000}"
    with open_target(f"lab:{lab_guest.name}") as backend:
        engine, _ = assemble_engine(f"lab:{lab_guest.name}", backend, [], vm_name="snap",
                                    detectors=["process_policy"])  # fmt: skip
        for _ in range(2):
            engine.run_cycle()
        lab.exec_in(lab_guest.name, f"printf '#!/bin/sh\\nsleep 300\\n' > /tmp/{comm}; chmod +x /tmp/{comm}; "
                    f"(/tmp/{comm} &) ; true", timeout=60)  # fmt: skip
        report = engine.run_cycle()
        assert report.run_of("process_policy").status == "ok"
        found = [a for a in report.new if a.finding.process and a.finding.process.comm == comm]
        assert found, [str(a.finding.title) for a in report.new]
        assert engine.snapshot_stats.consistent, engine.snapshot_stats
        lab.exec_in(lab_guest.name, f"pkill -f /tmp/{comm}; true", timeout=60)


def test_falls_back_to_a_classic_freeze_when_copies_keep_missing(lab_guest) -> None:
    with open_target(f"lab:{lab_guest.name}") as backend:
        engine, _ = assemble_engine(f"lab:{lab_guest.name}", backend, [], vm_name="snap",
                                    detectors=["process_policy"], snapshot_attempts=1)  # fmt: skip
        report = engine.run_cycle()  # an empty first copy misses everything
        assert engine.snapshot_stats is not None and not engine.snapshot_stats.consistent
        assert report.run_of("process_policy").status == "ok" and report.pause_seconds is not None
        assert {a.finding.rule for a in report.new} >= {"SVA-PROC-MINER-NAME"}
        engine.run_cycle()  # the working set is known now: one copy is enough
        assert engine.snapshot_stats.consistent and engine.snapshot_stats.attempts == 1
