"""Rootkit detectors (hidden_processes, kernel_integrity): their judgement on made-up
facts, then against the real lab guest (tests marked `lab`).

Attacks are simulated by the test harness only: it writes guest RAM through the lab's
RAM file (guest-physical address == file offset for the 256M lab guest) while the guest
is frozen, runs a cycle inside the same freeze, and puts the original bytes back before
the guest runs again (in a `finally`), so the guest kernel never executes with them.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from sva.engine.engine import Engine
from sva.engine.facts import (
    CycleFacts,
    FactRegistry,
    FactView,
    StaticFact,
    backend_fact_providers,
)
from sva.engine.model import VmIdentity
from sva.engine.registry import load_detectors
from sva.engine.ruleload import load_rules
from sva.engine.rules import default_rules_dir
from sva.engine.testing import shipped_rules
from sva.guest.facts import GuestSession
from sva.guest.integrity import (
    CodeTarget,
    HiddenModule,
    IdtEntry,
    Region,
    SyscallEntry,
    integrity_providers,
)
from sva.guest.processes import list_modules, list_processes
from sva.guest.views import TaskSighting, TaskView, TaskViews, view_providers
from sva.vmi import open_target

lab = pytest.mark.lab

DETECTORS = ("hidden_processes", "kernel_integrity")
BOGUS_SYSCALL = 0xFFFFC90000DEAD00  # vmalloc space: no kernel text, no module
BOGUS_IDT = 0xFFFFC90000BEEF00
ADDR48 = (1 << 48) - 1


class Harness:
    """An engine with the rootkit detectors, plus RAM patching for the attacks."""

    def __init__(self, guest: Any, backend: Any) -> None:
        self.guest = guest
        self.backend = backend
        self.session = GuestSession()
        self.gc = self.session.attach(backend)
        facts = FactRegistry([
            *backend_fact_providers(), *self.session.providers(),
            *view_providers(self.session), *integrity_providers(self.session),
        ])  # fmt: skip
        self.engine = Engine(
            VmIdentity(name=guest.name, target=f"lab:{guest.name}"), rules=load_rules(default_rules_dir()),
            detectors=load_detectors(list(DETECTORS)), facts=facts, backend=backend,
        )  # fmt: skip

    # -- addresses ------------------------------------------------------------------------
    @property
    def kernel(self) -> Any:
        return self.gc.context.layers[self.gc.module.layer_name]

    def phys(self, va: int) -> int:
        self.gc.begin_cycle()
        return int(self.kernel.translate(va & ADDR48)[0])

    def symbol_va(self, name: str) -> int:
        return int(self.gc.module.get_symbol(name).address + self.gc.module.offset)

    def offset(self, type_name: str, member: str) -> int:
        return int(self.gc.module.get_type(type_name).relative_child_offset(member))

    def read_u64(self, va: int) -> int:
        return struct.unpack("<Q", self.backend.read(self.phys(va), 8))[0]

    # -- patching the RAM file ------------------------------------------------------------
    @contextmanager
    def patched(self, writes: list[tuple[int, bytes]]) -> Iterator[None]:
        """Write (guest-physical address, bytes) into the RAM file; restore on exit."""
        fd = os.open(self.guest.mem_path, os.O_RDWR)
        saved: list[tuple[int, bytes]] = []
        try:
            for gpa, data in writes:
                saved.append((gpa, os.pread(fd, len(data), gpa)))
                os.pwrite(fd, data, gpa)
            yield
        finally:
            for gpa, data in reversed(saved):
                os.pwrite(fd, data, gpa)
            os.close(fd)

    def cycle(self) -> Any:
        report = self.engine.run_cycle()
        assert report.error is None, report.error
        runs = {r.detector: r for r in report.detectors}
        for name in DETECTORS:
            assert runs[name].status == "ok", (runs[name], report.health)
        return report


@pytest.fixture(scope="module")
def harness(lab_guest) -> Iterator[Harness]:
    with open_target(f"lab:{lab_guest.name}") as backend:
        h = Harness(lab_guest, backend)
        try:
            yield h
        finally:
            h.engine.close()


def alerts_of(report: Any, kind: str, state: str | None = None) -> list[Any]:
    return [a for a in report.alerts if a.finding.kind == kind and (state is None or a.state.value == state)]


# -- the detectors' judgement on made-up facts (no guest) ----------------------------------


def run_detector(name: str, **facts: Any) -> list[Any]:
    (detector,) = load_detectors([name])
    cycle = CycleFacts(FactRegistry([StaticFact(k, v) for k, v in facts.items()]))
    return list(detector.detect(FactView(name, detector.needs, cycle), shipped_rules()))


def sighting(pid: int, phys: int, exit_state: int = 0, comm: str = "x") -> TaskSighting:
    return TaskSighting(pid, comm, 0xFFFF888000000000 + phys, phys, exit_state)


def test_cross_view_ignores_exited_tasks_and_cut_short_views() -> None:
    a, b, z = sighting(10, 0x1000, comm="a"), sighting(11, 0x2000, comm="b"), sighting(12, 0x3000, 32, "z")
    views = TaskViews((
        TaskView("task_list", (a,)),
        TaskView("pid_idr", (a, b, z)),
        TaskView("memory_scan", (a, b), truncated="cycle deadline reached"),
    ))  # fmt: skip
    (f,) = run_detector("hidden_processes", task_views=views)
    # b is missing from the task list only; the cut-short scan cannot testify to an absence;
    # the zombie z leaves the structures one by one and is never reported.
    assert (f.evidence["pid"], f.evidence["missing_from"], f.evidence["seen_by"]) == (11, ["task_list"], ["memory_scan", "pid_idr"])
    assert f.kind == "rootkit.hidden_process" and f.subject == ("task", "0x2000")


def target(address: int, region: Region, *symbols: str, module: str | None = None) -> CodeTarget:
    return CodeTarget(address, symbols, region, module)


def test_syscall_idt_and_module_judgement() -> None:
    text = 0xFFFFFFFF81000000
    table = (
        SyscallEntry(0, target(text, Region.KERNEL_TEXT, "__x64_sys_read")),
        SyscallEntry(1, target(text + 64, Region.KERNEL_TEXT, "__do_sys_ni_syscall", "sys_ni_syscall")),
        SyscallEntry(2, target(text + 99, Region.KERNEL_TEXT)),  # mid-function: not a handler's start
        SyscallEntry(3, target(0xFFFFFFFFC0001000, Region.MODULE, module="rootkit")),
    )
    idt = (
        IdtEntry(0, True, target(text, Region.KERNEL_TEXT, "asm_exc_divide_error")),
        IdtEntry(18, True, target(text * 2, Region.KERNEL_INIT_TEXT)),  # early handler left in place
        IdtEntry(128, True, target(0x4141414141414141, Region.OTHER)),
        IdtEntry(200, False, target(0, Region.OTHER)),  # not present: never used
    )
    mods = (HiddenModule("diamorphine", 0xFFFFFFFFC0002000, 0xFFFFFFFFC0000000, 4096),)
    found = run_detector("kernel_integrity", syscall_table=table, idt_entries=idt, hidden_modules=mods)
    assert [(f.kind, f.subject) for f in found] == [
        ("rootkit.syscall_hook", ("syscall", 2)),
        ("rootkit.syscall_hook", ("syscall", 3)),
        ("rootkit.idt_hook", ("idt", 128)),
        ("rootkit.hidden_module", ("module", "0xffffffffc0002000")),
    ]
    assert found[1].evidence["target_module"] == "rootkit" and "module rootkit" in found[1].title
    assert found[2].evidence["target"] == "0x4141414141414141"


@lab
def test_sva_scan_runs_both_detectors_clean(lab_guest) -> None:
    # First in the file: the `harness` fixture below holds the guest's QMP monitor.
    res = subprocess.run(
        [sys.executable, "-m", "sva", "scan", f"lab:{lab_guest.name}", "--json", "--detectors", ",".join(DETECTORS)],
        check=False, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-2000:])
    report = json.loads(res.stdout)
    assert [(d["detector"], d["status"]) for d in report["detectors"]] == [(n, "ok") for n in DETECTORS]
    facts = {f["name"]: f for f in report["facts"]}
    for name in ("task_views", "syscall_table", "idt_entries", "hidden_modules"):
        assert facts[name]["available"] and facts[name]["in_freeze"], facts[name]
    assert report["alerts"] == []


@lab
def test_clean_guest_has_no_findings_over_cycles(harness) -> None:
    for _ in range(3):
        report = harness.cycle()
        assert not report.alerts, [a.finding.title for a in report.alerts]
    facts = {f.name: f for f in report.facts}
    assert all(facts[n].available and facts[n].in_freeze for n in ("task_views", "syscall_table", "idt_entries"))


@lab
def test_dkom_unlinked_task_is_found_and_resolves(harness) -> None:
    with harness.backend.frozen():
        procs = list_processes(harness.gc, details=False)
    implant = next(p for p in procs if p.comm == "implant")
    tasks_off = harness.offset("task_struct", "tasks")
    node = implant.task_address + tasks_off
    with harness.backend.frozen():
        nxt, prv = harness.read_u64(node), harness.read_u64(node + 8)
        # prev->next = next; next->prev = prev: what a DKOM rootkit's list_del does.
        writes = [(harness.phys(prv), struct.pack("<Q", nxt)), (harness.phys(nxt + 8), struct.pack("<Q", prv))]
        with harness.patched(writes):
            report = harness.cycle()
    hidden = alerts_of(report, "rootkit.hidden_process", "new")
    assert len(hidden) == 1, [a.finding.title for a in report.alerts]
    ev = hidden[0].finding.evidence
    assert ev["pid"] == implant.pid and ev["comm"] == "implant"
    assert ev["missing_from"] == ["task_list"] and ev["seen_by"] == ["memory_scan", "pid_idr"]
    assert int(ev["task_address"], 16) == implant.task_address
    assert set(hidden[0].finding.mitre) >= {"T1014", "T1564"}
    after = harness.cycle()
    assert alerts_of(after, "rootkit.hidden_process", "resolved"), [a.finding.title for a in after.alerts]
    assert not alerts_of(after, "rootkit.hidden_process", "new")


@lab
def test_syscall_and_idt_hooks_are_found(harness) -> None:
    sct = harness.symbol_va("sys_call_table")
    idt = harness.symbol_va("idt_table")
    vector = 3  # int3: a present gate on every x86-64 kernel
    with harness.backend.frozen():
        gate = bytearray(harness.backend.read(harness.phys(idt + 16 * vector), 16))
        struct.pack_into("<H", gate, 0, BOGUS_IDT & 0xFFFF)
        struct.pack_into("<H", gate, 6, (BOGUS_IDT >> 16) & 0xFFFF)
        struct.pack_into("<I", gate, 8, BOGUS_IDT >> 32)
        writes = [(harness.phys(sct), struct.pack("<Q", BOGUS_SYSCALL)), (harness.phys(idt + 16 * vector), bytes(gate))]
        with harness.patched(writes):
            report = harness.cycle()
    sc = alerts_of(report, "rootkit.syscall_hook", "new")
    assert [a.finding.evidence["entry"] for a in sc] == [0], [a.finding.title for a in report.alerts]
    assert sc[0].finding.evidence["target"] == f"0x{BOGUS_SYSCALL:x}"
    assert sc[0].finding.evidence["target_region"] == "other"
    idt_alerts = alerts_of(report, "rootkit.idt_hook", "new")
    assert [a.finding.evidence["vector"] for a in idt_alerts] == [vector]
    assert idt_alerts[0].finding.evidence["target"] == f"0x{BOGUS_IDT:x}"
    after = harness.cycle()
    assert {a.finding.kind for a in after.alerts if a.state.value == "resolved"} == {
        "rootkit.syscall_hook", "rootkit.idt_hook",
    }  # fmt: skip


@lab
def test_module_unlinked_from_module_list_is_found(harness) -> None:
    mods = list_modules(harness.gc)
    assert mods, "the lab guest has no modules"
    victim = mods[len(mods) // 2]
    list_off = harness.offset("module", "list")
    node = victim.address + list_off
    with harness.backend.frozen():
        nxt, prv = harness.read_u64(node), harness.read_u64(node + 8)
        writes = [(harness.phys(prv), struct.pack("<Q", nxt)), (harness.phys(nxt + 8), struct.pack("<Q", prv))]
        with harness.patched(writes):
            report = harness.cycle()
    hidden = alerts_of(report, "rootkit.hidden_module", "new")
    assert [a.finding.evidence["name"] for a in hidden] == [victim.name], [a.finding.title for a in report.alerts]
    assert int(hidden[0].finding.evidence["address"], 16) == victim.address
    after = harness.cycle()
    assert alerts_of(after, "rootkit.hidden_module", "resolved")


@lab
def test_cyclic_task_list_is_bounded(harness) -> None:
    with harness.backend.frozen():
        procs = list_processes(harness.gc, details=False)
    victim = next(p for p in procs if p.comm == "xmrig")
    node = victim.task_address + harness.offset("task_struct", "tasks")
    with harness.backend.frozen():
        writes = [(harness.phys(node), struct.pack("<Q", node))]  # task->tasks.next = itself
        with harness.patched(writes):
            t0 = time.monotonic()
            report = harness.engine.run_cycle()
            seconds = time.monotonic() - t0
    assert seconds < 30, seconds
    assert report.error is None
    runs = {r.detector: r for r in report.detectors}
    # The forward walk stops where the list loops; the backward walk still reaches every
    # task, so nothing is reported hidden, and nothing hangs or takes the cycle down.
    assert runs["hidden_processes"].status == "ok", (runs, report.health)
    assert not alerts_of(report, "rootkit.hidden_process"), [a.finding.title for a in report.alerts]
    harness.cycle()  # and the next cycle is normal again
