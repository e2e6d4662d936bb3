"""Memory detectors over the real lab guest: YARA matches attributed to processes (also
to a process started after the first, full scan), and injected code found and resolved.

The injection is simulated by the harness, the only place allowed to write guest RAM: with
the guest frozen it flips VM_EXEC on in an anonymous writable mapping's vm_flags and writes
a function prologue at its start through the RAM file (guest-physical address == file
offset), and restores both in `finally`.
"""

from __future__ import annotations

import os
import secrets
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from detectors.injected_code import DETECTOR as INJECTED
from detectors.injected_code import InjectedCode, code_pattern
from detectors.yara_memory import DETECTOR as YARA
from detectors.yara_memory import MemorySignatureMatch
from sva import lab
from sva.engine.engine import CycleReport, Engine
from sva.engine.facts import (
    CycleFacts,
    FactRegistry,
    FactView,
    ProcessInfo,
    StaticFact,
    backend_fact_providers,
)
from sva.engine.model import AlertState, VmIdentity
from sva.engine.testing import shipped_rules
from sva.guest.context import GuestContext
from sva.guest.facts import GuestSession
from sva.guest.memscan import (
    VM_EXEC,
    VM_WRITE,
    AttributedMatch,
    HitLocation,
    MappingInfo,
    SuspiciousMapping,
    YaraMemoryScan,
    memory_providers,
    process_mappings,
    walk_user_pages,
)
from sva.lab import scenarios
from sva.vmi import open_target

RULES = shipped_rules()
MARKER_SIG = f"test:{scenarios.MARKER_RULE}"
PROLOGUE = bytes.fromhex("554889e54883ec10")  # push rbp; mov rbp, rsp; sub rsp, 16


# -- without a guest -------------------------------------------------------------------


def _detect(detector: Any, fact: str, value: tuple[Any, ...]) -> list[Any]:
    facts = CycleFacts(FactRegistry([StaticFact(fact, value)]))
    return list(detector.detect(FactView(detector.id, detector.needs, facts), RULES))


def test_yara_findings_per_process_and_unattributed() -> None:
    proc = ProcessInfo(pid=42, ppid=1, comm="implant", start_time=7)
    stack = MappingInfo(0x7FFF0000, 0x7FFF8000, "rw-p", 0x3, None, "[stack]")
    hit = HitLocation("$marker", 0x1234F00, 31, b"SVA", 0x7FFF1F00, stack)
    meta = (("author", "sva"), ("mitre", "T1055"))
    attributed = AttributedMatch(MARKER_SIG, (), meta, ("T1055",), proc, (hit,))
    loose = AttributedMatch(
        MARKER_SIG, (), meta, (), None, (HitLocation("$marker", 0x5000, 31, b"SVA"),)
    )
    f1, f2 = _detect(YARA, "yara_matches", (attributed, loose))
    assert (
        isinstance(f1, MemorySignatureMatch)
        and f1.rule == "SVA-MEM-YARA-PROCESS"
        and f1.process == proc
    )
    assert f1.evidence["strings"] == [{"identifier": "$marker", "gpa": "0x1234f00", "length": 31,
                                       "data": b"SVA".hex(), "va": "0x7fff1f00", "offset": 0x1F00,
                                       "mapping": "[stack]"}]  # fmt: skip
    assert (
        f1.evidence["mappings"][0]["anonymous"]
        and f1.evidence["author"] == "sva"
        and f1.mitre == ("T1055",)
    )
    assert (
        f2.rule == "SVA-MEM-YARA-UNATTRIBUTED"
        and f2.process is None
        and f2.evidence["location"] == "unattributed"
    )
    assert f1.dedup_key != f2.dedup_key


def test_injected_code_needs_code_and_allows_jit_runtimes() -> None:
    m = MappingInfo(0x10000, 0x12000, "rwxp", VM_WRITE | VM_EXEC | 1, None, "[anon]")
    code = SuspiciousMapping(
        ProcessInfo(pid=5, ppid=1, comm="sleep"),
        m,
        "rwx",
        PROLOGUE + b"\0" * 8,
        0x10000,
    )
    zeros = SuspiciousMapping(
        ProcessInfo(pid=6, ppid=1, comm="sleep"), m, "rwx", b"\0" * 64, 0x10000
    )
    jit = SuspiciousMapping(
        ProcessInfo(pid=7, ppid=1, comm="java"), m, "rwx", PROLOGUE, 0x10000
    )
    (f,) = _detect(INJECTED, "suspicious_mappings", (code, zeros, jit))
    assert isinstance(f, InjectedCode) and f.process is not None and f.process.pid == 5
    assert (f.evidence["start"], f.evidence["end"], f.evidence["protection"]) == (
        "0x10000",
        "0x12000",
        "rwxp",
    )
    assert code_pattern(b"\x90" * 8, [b"\x55\x48\x89\xe5"]) is None


def test_hits_gone_by_the_freeze_are_dropped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The scan runs on the live guest; the freeze re-reads every hit and keeps only those
    whose bytes are still there."""
    from sva.guest.memscan import still_present
    from sva.scan.scanner import ScanReport, StringHit, YaraMatch
    from sva.testing import synthetic_backend

    b = synthetic_backend(tmp_path, [(0, 1 << 16)], seed=3)
    try:
        here, gone = StringHit("$a", 0x100, 8, b.read(0x100, 8)), StringHit("$a", 0x200, 8, b"not-here")
        both = YaraMatch("test", "r1", (), {}, (here, gone))
        vanished = YaraMatch("test", "r2", (), {}, (StringHit("$b", 0x300, 4, b"gone"),))
        no_strings = YaraMatch("test", "r3", (), {}, ())
        report = ScanReport([both, vanished, no_strings], [], {}, 1 << 16, 1, 0.0, "fp")
        kept = still_present(b, report).matches
        assert [(m.rule, [h.address for h in m.hits]) for m in kept] == [("r1", [0x100]), ("r3", [])]
    finally:
        b.close()


def test_page_table_walk_finds_pages_of_all_sizes() -> None:
    tables: dict[int, list[int]] = {
        a: [0] * 512 for a in (0x1000, 0x2000, 0x3000, 0x4000)
    }
    tables[0x1000][1] = 0x2000 | 0x7  # PGD[1] -> PUD
    tables[0x2000][0] = 0x40000000 | 0x80 | 0x7  # 1 GiB page
    tables[0x2000][2] = 0x3000 | 0x7  # -> PMD
    tables[0x3000][0] = 0x200000 | 0x80 | 0x7  # 2 MiB page
    tables[0x3000][1] = 0x4000 | 0x7  # -> PT
    tables[0x4000][3] = 0x9000 | 0x47  # 4 KiB page, dirty
    tables[0x4000][4] = (
        (~0xA000 & 0x000FFFFFFFFFF000) | 0x100 | 0x4
    )  # PROT_NONE: pfn inverted
    tables[0x1000][300] = 0x2000 | 0x7  # kernel half: not walked

    def read(gpa: int, size: int) -> bytes:
        return struct.pack("<512Q", *tables[gpa])

    leaves = {(lf.va, lf.pa, lf.size, lf.dirty) for lf in walk_user_pages(read, 0x1000)}
    base = 1 << 39
    assert leaves == {
        (base, 0x40000000, 1 << 30, False),
        (base + (2 << 30), 0x200000, 2 << 20, False),
        (base + (2 << 30) + (1 << 21) + 3 * 4096, 0x9000, 4096, True),
        (base + (2 << 30) + (1 << 21) + 4 * 4096, 0xA000, 4096, False),
    }


def test_shipped_memory_rules_load() -> None:
    ids = {r.id for r in RULES.rules}
    assert {
        "SVA-MEM-YARA-PROCESS",
        "SVA-MEM-YARA-UNATTRIBUTED",
        "SVA-MEM-INJECTED-CODE",
    } <= ids


# -- on the lab guest -------------------------------------------------------------------


@dataclass
class Live:
    backend: Any
    engine: Engine
    scan: YaraMemoryScan
    gc: GuestContext


@pytest.fixture(scope="module")
def live(lab_guest) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    with open_target(f"lab:{lab_guest.name}") as backend:
        session = GuestSession()
        gc = session.attach(backend)
        scan = YaraMemoryScan()
        engine = Engine(
            VmIdentity(lab_guest.name, f"lab:{lab_guest.name}"), rules=RULES, detectors=[YARA, INJECTED],
            facts=FactRegistry([*backend_fact_providers(), *session.providers(), *memory_providers(session, scan)]),
            backend=backend,
        )  # fmt: skip
        try:
            yield Live(backend, engine, scan, gc)
        finally:
            engine.close()


def _ok(report: CycleReport) -> CycleReport:
    assert not report.error, report.error
    for det in ("yara_memory", "injected_code"):
        run = report.run_of(det)
        assert run is not None and run.status == "ok", report.health
    return report


def _marker_pids(report: CycleReport) -> dict[int, dict[str, Any]]:
    out = {}
    for a in (*report.new, *report.still_present, *report.changed):
        f = a.finding
        if f.rule == "SVA-MEM-YARA-PROCESS" and f.evidence["signature"] == MARKER_SIG:
            assert f.process is not None
            out[f.process.pid] = dict(f.evidence)
    return out


def _check_hits(live: Live, evidence: dict[str, Any]) -> None:
    for s in evidence["strings"]:
        assert (
            live.backend.read(int(s["gpa"], 16), len(scenarios.MARKER))
            == scenarios.MARKER.encode()
        )
        assert (
            s["mapping"] == "[stack]" and s["va"] and s["offset"] >= 0
        )  # environment strings


def _start_marker_process(name: str) -> int:
    """A `sleep` whose environment holds the marker, joined only inside the guest."""
    head, tail = scenarios.MARKER[:12], scenarios.MARKER[12:]
    res = lab.exec_in(name, f"M={head}; (export SVA_T=\"${{M}}{tail}\"; exec sleep 300) "
                            "</dev/null >/dev/null 2>&1 & echo $!")  # fmt: skip
    assert res.status == 0, res
    pid = int(res.output.strip().splitlines()[-1])
    _wait_for_comm(name, pid, "sleep")
    return pid


def _wait_for_comm(name: str, pid: int, comm: str) -> None:
    """Until the background subshell has exec'd (TCG is slow): the scan must see `sleep`."""
    for _ in range(50):
        if any(p.pid == pid and p.comm == comm for p in lab.ps(name)):
            return
        time.sleep(0.1)
    raise AssertionError(f"pid {pid} never became {comm}")


@pytest.mark.lab
def test_marker_attributed_to_the_implant_then_a_new_process_by_the_incremental_cycle(
    lab_guest, live: Live
) -> None:  # type: ignore[no-untyped-def]
    truth = lab.ps(lab_guest.name)
    implant = {p.pid for p in truth if p.comm == "implant"}
    holders = implant | {
        p.pid for p in truth if p.ppid in implant and p.comm == "sleep"
    }
    assert implant

    first = _ok(live.engine.run_cycle())
    assert live.scan.last_report is not None and live.scan.last_report.full
    found = _marker_pids(first)
    assert found and set(found) <= holders, (found.keys(), holders)
    for ev in found.values():
        _check_hits(live, ev)
        assert ev["author"] == "sva" and ev["namespace"] == "test"
    assert not [a for a in first.new if a.finding.detector == "injected_code"], (
        "no injection yet"
    )

    pid = _start_marker_process(lab_guest.name)
    try:
        second = _ok(live.engine.run_cycle())
        report = live.scan.last_report
        assert report is not None and not report.full
        assert report.pages_rescanned is not None and report.pages_total is not None
        assert (
            report.pages_rescanned < report.pages_total // 4
        )  # only changed pages were rescanned
        new = {
            a.finding.process.pid
            for a in second.new
            if a.finding.process is not None
            and a.finding.rule == "SVA-MEM-YARA-PROCESS"
            and a.finding.evidence["signature"] == MARKER_SIG
        }
        assert pid in new, (pid, new, [str(a.finding.title) for a in second.new])
        _check_hits(live, _marker_pids(second)[pid])
        assert set(_marker_pids(second)) >= set(found)  # the implant's still there
    finally:
        lab.exec_in(lab_guest.name, f"kill {pid}")


def _task(gc: GuestContext, pid: int) -> Any:
    from volatility3.plugins.linux import pslist

    return next(
        t
        for t in pslist.PsList.list_tasks(gc.context, gc.module.name)
        if int(t.pid) == pid
    )


@pytest.mark.lab
def test_injected_code_found_then_resolved(lab_guest, live: Live) -> None:  # type: ignore[no-untyped-def]
    res = lab.exec_in(lab_guest.name, "sleep 300 </dev/null >/dev/null 2>&1 & echo $!")
    pid = int(res.output.strip().splitlines()[-1])
    _wait_for_comm(lab_guest.name, pid, "sleep")
    b, gc = live.backend, live.gc
    kernel = gc.context.layers[gc.module.layer_name]
    saved: list[tuple[int, bytes]] = []
    try:
        clean = _ok(live.engine.run_cycle())
        assert not [a for a in clean.alerts if a.finding.detector == "injected_code"]
        with b.frozen(), open(lab_guest.mem_path, "r+b") as ram:
            gc.begin_cycle()
            task = _task(gc, pid)
            pgd = kernel.translate(int(task.mm.pgd))[0]
            resident = {
                lf.va: lf.pa for lf in walk_user_pages(b.read, pgd) if lf.size == 4096
            }
            target = next(
                m
                for m in process_mappings(gc, task)
                if m.anonymous
                and m.flags & VM_WRITE
                and not m.flags & VM_EXEC
                and m.start in resident
            )
            vma = next(
                v for v in task.mm.get_vma_iter() if int(v.vm_start) == target.start
            )
            flags_pa = kernel.translate(vma.vm_flags.vol.offset)[0]
            code_pa = resident[target.start]
            for pa, data in (
                (flags_pa, struct.pack("<Q", target.flags | VM_EXEC)),
                (code_pa, PROLOGUE),
            ):
                ram.seek(pa)
                saved.append((pa, ram.read(len(data))))
                ram.seek(pa)
                ram.write(data)
            ram.flush()
        injected = _ok(live.engine.run_cycle())
        (alert,) = [a for a in injected.new if a.finding.detector == "injected_code"]
        ev = alert.finding.evidence
        assert alert.finding.process is not None and alert.finding.process.pid == pid
        assert (ev["start"], ev["end"]) == (f"0x{target.start:x}", f"0x{target.end:x}")
        assert (
            ev["protection"].startswith("rwx")
            and ev["reason"] == "rwx"
            and ev["head"].startswith(PROLOGUE.hex())
        )
    finally:
        if saved:
            with b.frozen(), open(lab_guest.mem_path, "r+b") as ram:
                for pa, data in saved:
                    ram.seek(pa)
                    ram.write(data)
                ram.flush()
    restored = _ok(live.engine.run_cycle())
    gone = [a for a in restored.resolved if a.finding.detector == "injected_code"]
    assert len(gone) == 1 and gone[0].finding.process.pid == pid  # type: ignore[union-attr]
    assert not [
        a
        for a in restored.alerts
        if a.finding.detector == "injected_code" and a.state != AlertState.RESOLVED
    ]
    lab.exec_in(lab_guest.name, f"kill {pid}")


@pytest.mark.lab
def test_clean_guest_has_no_memory_findings() -> None:
    name = f"m{os.getpid()}{secrets.token_hex(2)}"
    lab.up(name, scenario="clean")
    try:
        with open_target(f"lab:{name}") as backend:
            session = GuestSession()
            session.attach(backend)
            engine = Engine(
                VmIdentity(name, f"lab:{name}"), rules=RULES, detectors=[YARA, INJECTED],
                facts=FactRegistry([*backend_fact_providers(), *session.providers(), *memory_providers(session)]),
                backend=backend,
            )  # fmt: skip
            try:
                report = _ok(engine.run_cycle())
            finally:
                engine.close()
        assert report.alerts == (), [a.finding.title for a in report.alerts]
    finally:
        lab.down(name)


@pytest.mark.lab
def test_scanner_kept_across_cycles_and_rebuilt_when_the_rules_change(
    live: Live,
) -> None:
    from sva.scan import CompiledRuleSet, signatures_dir

    bundles = [
        CompiledRuleSet.default(),
        CompiledRuleSet.load(signatures_dir() / "test"),
    ]
    in_force = [bundles[0]]
    scan = YaraMemoryScan(rules=lambda: in_force[0])
    reports = []
    for swap in (False, False, True):
        if swap:
            in_force[0] = bundles[1]
        with live.backend.frozen():
            live.gc.begin_cycle()
            matches = scan.compute(live.gc)
        reports.append((scan.scanner, scan.last_report, {m.rule for m in matches}))
    (s1, r1, m1), (s2, r2, _), (s3, r3, m3) = reports
    assert s1 is s2 and r1 is not None and r1.full and r2 is not None and not r2.full
    assert (
        s3 is not s1 and r3 is not None and r3.full
    )  # a new bundle: a new scanner, a full scan
    assert MARKER_SIG in m1 and m3 == {MARKER_SIG}
