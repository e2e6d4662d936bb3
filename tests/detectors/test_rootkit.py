"""Rootkit detectors (hidden_processes, kernel_integrity): their judgement on made-up
facts, then against the real lab guest (tests marked `lab`).

Attacks are simulated by the test harness only: it writes guest RAM through the lab's
RAM file (guest-physical address == file offset for the 256M lab guest) while the guest
is frozen, runs a cycle inside the same freeze, and puts the original bytes back before
the guest runs again (in a `finally`), so the guest kernel never executes with them.
"""

from __future__ import annotations

import dataclasses
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

from sva import lab as sva_lab
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
from sva.engine.rules import HiddenTaskRule, default_rules_dir
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
from sva.guest.views import (
    TaskScanner,
    TaskSighting,
    TaskView,
    TaskViews,
    memory_scan_view,
    run_queue_view,
    task_list_view,
    task_views,
)
from sva.vmi import open_target

lab = pytest.mark.lab

DETECTORS = ("hidden_processes", "kernel_integrity")
BOGUS_SYSCALL = 0xFFFFC90000DEAD00  # vmalloc space: no kernel text, no module
BOGUS_IDT = 0xFFFFC90000BEEF00
ADDR48 = (1 << 48) - 1


class Harness:
    """An engine with the rootkit detectors, plus RAM patching for the attacks."""

    def __init__(self, guest: Any, backend: Any, sweep_every: int = 1) -> None:
        self.guest = guest
        self.backend = backend
        self.session = GuestSession()
        self.gc = self.session.attach(backend)
        self.scanner = TaskScanner(sweep_every)  # view_providers' task_scan, kept to look at
        facts = FactRegistry([
            *backend_fact_providers(), *self.session.providers(),
            self.session.provider("task_scan", self.scanner.compute, consistent=False),
            self.session.provider("task_views", task_views, requires=("task_scan",)),
            *integrity_providers(self.session, sweep_every),
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


def test_run_queue_view_is_a_witness_never_proof_of_absence() -> None:
    busy, sleeper = sighting(20, 0x4000, comm="busy"), sighting(21, 0x5000, comm="sleeper")
    views = TaskViews((
        TaskView("task_list", (sleeper,)),
        TaskView("pid_idr", (busy, sleeper)),
        TaskView("memory_scan", (busy, sleeper)),
        TaskView("run_queue", (busy,), exhaustive=False),
    ))  # fmt: skip
    # The sleeper is on no run queue, as sleeping tasks never are: not a finding. The busy
    # task is off the task list and the run queue testifies that it exists.
    (f,) = run_detector("hidden_processes", task_views=views)
    assert (f.evidence["pid"], f.evidence["missing_from"]) == (20, ["task_list"])
    assert f.evidence["seen_by"] == ["memory_scan", "pid_idr", "run_queue"]


def target(address: int, region: Region, *symbols: str, module: str | None = None) -> CodeTarget:
    return CodeTarget(address, symbols, region, module)


def test_syscall_idt_and_module_judgement() -> None:
    from sva.guest.ftrace import FtraceHooks

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
    found = run_detector("kernel_integrity", syscall_table=table, idt_entries=idt, hidden_modules=mods,
                         ftrace_hooks=FtraceHooks((), (), 0))  # fmt: skip
    assert [(f.kind, f.subject) for f in found] == [
        ("rootkit.syscall_hook", ("syscall", 2)),
        ("rootkit.syscall_hook", ("syscall", 3)),
        ("rootkit.idt_hook", ("idt", 128)),
        ("rootkit.hidden_module", ("module", "0xffffffffc0002000")),
    ]
    assert found[1].evidence["target_module"] == "rootkit" and "module rootkit" in found[1].title
    assert found[2].evidence["target"] == "0x4141414141414141"


def test_ftrace_judgement_and_site_decoding() -> None:
    from sva.guest.ftrace import FtraceHooks, FtraceOps, PatchedSite, decode_site

    text, tramp = 0xFFFFFFFF81000000, 0xFFFFFFFFC0100000
    site_a, site_b, site_c = text + 0x100, text + 0x200, text + 0x300
    kprobe = FtraceOps(0xFFFF888000001000, target(text + 0x50, Region.KERNEL_TEXT, "kprobe_ftrace_handler"),
                       0, tramp, (site_a,), False)  # fmt: skip
    rootkit = FtraceOps(0xFFFF888000002000, target(0xFFFFFFFFC0001000, Region.MODULE, module="rk"), 0, tramp,
                        (site_b, text + 0x999), False)  # fmt: skip
    patched = tuple(
        PatchedSite(name, (nr,), site, "call", target(tramp, Region.OTHER))
        for name, nr, site in (("__x64_sys_a", 1, site_a), ("__x64_sys_b", 2, site_b), ("__x64_sys_c", 3, site_c))
    )
    hooks = FtraceHooks((kprobe, rootkit), patched, 300)
    found = run_detector("kernel_integrity", syscall_table=(), idt_entries=(), hidden_modules=(), ftrace_hooks=hooks)
    # a: a kprobe, the kernel's own tracer; b: the module's ops; c: patched, no ops claims it.
    assert [(f.kind, f.subject) for f in found] == [
        ("rootkit.ftrace_syscall_hook", ("ftrace-syscall", "__x64_sys_b")),
        ("rootkit.ftrace_syscall_hook", ("ftrace-syscall", "__x64_sys_c")),
        ("rootkit.ftrace_ops", ("ftrace-ops", "0xffff888000002000")),
    ]
    assert found[0].evidence["hooked_by"][0]["callback_module"] == "rk" and "module rk" in found[0].title
    assert not found[1].evidence["claimed_by_ftrace"] and found[1].evidence["entries"] == [3]
    # The fentry site: a NOP is untraced; after endbr64 (IBT) a call; a backward jmp.
    assert decode_site(bytes.fromhex("0f1f440000"), text) is None
    assert decode_site(bytes.fromhex("f30f1efae8fb0f0000"), text) == (text + 4, "call", text + 4 + 5 + 0xFFB)
    assert decode_site(b"\xe9" + struct.pack("<i", -0x1005), text) == (text, "jmp", text - 0x1000)


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
def test_dkom_unlinked_task_is_found_with_the_sweep_spread_over_cycles(harness) -> None:
    spread = Harness(harness.guest, harness.backend, sweep_every=4)
    try:
        passes = [spread.cycle() for _ in range(4)]  # one whole pass, a quarter of RAM a cycle
        assert not [a.finding.title for r in passes for a in r.alerts]
        whole = spread.scanner.last
        assert whole is not None and whole.pass_complete and whole.passes == 1
        with harness.backend.frozen():
            implant = next(p for p in list_processes(harness.gc, details=False) if p.comm == "implant")
            node = implant.task_address + harness.offset("task_struct", "tasks")
            nxt, prv = harness.read_u64(node), harness.read_u64(node + 8)
            writes = [(harness.phys(prv), struct.pack("<Q", nxt)), (harness.phys(nxt + 8), struct.pack("<Q", prv))]
            with harness.patched(writes):
                report = spread.cycle()  # the first quarter of the next pass
                scan = spread.scanner.last
                # The sweep alone (no lead from the other views) has the hidden task.
                spread.gc.begin_cycle()
                swept_only = memory_scan_view(spread.gc, _fact_context(spread.backend), scan, seen=())
            implant_phys = harness.phys(implant.task_address)
        assert scan is not None and not scan.pass_complete and scan.covered == scan.area // 4
        assert implant_phys in {t.phys_address for t in swept_only.tasks if t.pid == implant.pid}
        hidden = alerts_of(report, "rootkit.hidden_process", "new")
        assert [a.finding.evidence["pid"] for a in hidden] == [implant.pid], [a.finding.title for a in report.alerts]
        assert hidden[0].finding.evidence["missing_from"] == ["task_list"]
        assert alerts_of(spread.cycle(), "rootkit.hidden_process", "resolved")
    finally:
        spread.engine.close()


def _fact_context(backend: Any) -> Any:
    from sva.engine.facts import FactContext, FunctionProvider

    return FactContext(CycleFacts(FactRegistry(), backend=backend), FunctionProvider("test", lambda _c: None))


@lab
def test_busy_task_unlinked_from_the_task_list_is_seen_on_the_run_queue(harness) -> None:
    # A busy loop is always runnable: with the lab's one vCPU it is rq->curr (or in the CFS
    # tree when a kworker preempted it) at whatever moment the guest is paused.
    res = sva_lab.exec_in(harness.guest.name, 'sh -c "while :; do :; done" </dev/null >/dev/null 2>&1 & echo $!')
    pid = int(res.output.strip().splitlines()[-1])
    try:
        with harness.backend.frozen():
            harness.gc.begin_cycle()  # forget page tables read before the fork
            busy = next(p for p in list_processes(harness.gc, details=False) if p.pid == pid)
            node = busy.task_address + harness.offset("task_struct", "tasks")
            nxt, prv = harness.read_u64(node), harness.read_u64(node + 8)
            writes = [(harness.phys(prv), struct.pack("<Q", nxt)), (harness.phys(nxt + 8), struct.pack("<Q", prv))]
            with harness.patched(writes):
                report = harness.cycle()
                # The run queues alone, against the task list, also find it.
                ctx = _fact_context(harness.backend)
                harness.gc.begin_cycle()
                two = TaskViews((task_list_view(harness.gc, ctx), run_queue_view(harness.gc, ctx)))
        (rule,) = [r for r in shipped_rules().of_kind(HiddenTaskRule)]
        (only_rq,) = harness.engine.detectors[0].check(  # type: ignore[attr-defined]
            dataclasses.replace(rule, views=("task_list", "run_queue")), two
        )
        assert only_rq.evidence["pid"] == pid and only_rq.evidence["seen_by"] == ["run_queue"]
        hidden = alerts_of(report, "rootkit.hidden_process", "new")
        assert [a.finding.evidence["pid"] for a in hidden] == [pid], [a.finding.title for a in report.alerts]
        ev = hidden[0].finding.evidence
        assert "run_queue" in ev["seen_by"] and ev["missing_from"] == ["task_list"]
        assert int(ev["task_address"], 16) == busy.task_address
        after = harness.cycle()
        assert [a.finding.evidence["pid"] for a in alerts_of(after, "rootkit.hidden_process", "resolved")] == [pid]
        assert not alerts_of(after, "rootkit.hidden_process", "new")
    finally:
        sva_lab.exec_in(harness.guest.name, f"kill {pid}")


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


def _syscall_number(harness: Harness, handler: str) -> int:
    sct, want = harness.symbol_va("sys_call_table"), harness.symbol_va(handler) & ADDR48
    raw = harness.backend.read(harness.phys(sct), 8 * 512)
    return next(i for i, (a,) in enumerate(struct.iter_unpack("<Q", raw)) if a & ADDR48 == want)


def _zero_page(harness: Harness, page_offset_base: int) -> int:
    """A guest-physical page of zeros that the kernel's direct map covers (a free page, most
    likely): scratch space for fake kernel structures while the guest is frozen."""
    size = harness.backend.memory_size
    for pa in range(size * 3 // 4, size // 4, -4096):
        if harness.backend.read(pa, 4096) != bytes(4096):
            continue
        try:
            if harness.phys(page_offset_base + pa) == pa:
                return pa
        except Exception:  # noqa: BLE001, S112 - not in the direct map: try another
            continue
    raise AssertionError("no mapped zero page in the lab guest's RAM")


def _rel32(site: int, target: int) -> bytes:
    return struct.pack("<i", (target - (site + 5)) - (1 << 64 if target - (site + 5) >= 1 << 63 else 0))


@lab
def test_ftrace_hooks_on_syscalls_are_found(harness) -> None:
    """An ftrace-helper style rootkit, simulated in the frozen guest: an ftrace_ops whose
    callback lies in a module, filtered on kexec_load (busybox init never calls it), and
    that handler's fentry NOP turned into a call to a trampoline; plus acct's fentry site
    overwritten with a jump that no ftrace_ops explains (an inline hook)."""
    from sva.guest.integrity import module_areas

    hooked, inline = "__x64_sys_kexec_load", "__x64_sys_acct"
    hooked_nr, inline_nr = _syscall_number(harness, hooked), _syscall_number(harness, inline)
    areas = sorted(module_areas(harness.gc), key=lambda a: a.start)
    owner = areas[len(areas) // 2]
    callback = 0xFFFF000000000000 | (owner.start + 0x10)  # inside a listed module's core
    trampoline = 0xFFFF000000000000 | (areas[0].start - 0x1000)  # module space no module owns
    off = {m: harness.offset("ftrace_ops", m) for m in ("func", "next", "flags", "func_hash", "trampoline")}
    with harness.backend.frozen():
        pob = harness.read_u64(harness.symbol_va("page_offset_base"))
        scratch = _zero_page(harness, pob)
        ops, ops_hash, hash_, bucket, entry = (pob + scratch + o for o in (0, 0x200, 0x300, 0x400, 0x500))
        sites = {h: harness.symbol_va(h) | 0xFFFF000000000000 for h in (hooked, inline)}
        for h, va in sites.items():  # after endbr64 on IBT kernels
            if harness.backend.read(harness.phys(va), 4) == bytes.fromhex("f30f1efa"):
                sites[h] = va + 4
        page = bytearray(4096)
        struct.pack_into("<Q", page, off["func"], callback)
        struct.pack_into("<Q", page, off["next"], harness.symbol_va("ftrace_list_end") | 0xFFFF000000000000)
        struct.pack_into("<Q", page, off["flags"], 0x1 | 0x4 | 0x2000)  # ENABLED | SAVE_REGS | IPMODIFY
        struct.pack_into("<Q", page, off["func_hash"], ops_hash)
        struct.pack_into("<Q", page, off["trampoline"], trampoline)
        struct.pack_into("<Q", page, 0x200 + harness.offset("ftrace_ops_hash", "filter_hash"), hash_)
        struct.pack_into("<Q", page, 0x300 + harness.offset("ftrace_hash", "buckets"), bucket)
        struct.pack_into("<Q", page, 0x300 + harness.offset("ftrace_hash", "count"), 1)
        struct.pack_into("<Q", page, 0x400, entry)
        struct.pack_into("<Q", page, 0x500 + harness.offset("ftrace_func_entry", "ip"), sites[hooked])
        writes = [
            (scratch, bytes(page)),
            (harness.phys(harness.symbol_va("ftrace_ops_list")), struct.pack("<Q", ops)),
            (harness.phys(sites[hooked]), b"\xe8" + _rel32(sites[hooked], trampoline)),
            (harness.phys(sites[inline]), b"\xe9" + _rel32(sites[inline], trampoline + 0x40)),
        ]
        with harness.patched(writes):
            report = harness.cycle()
    found = alerts_of(report, "rootkit.ftrace_syscall_hook", "new")
    by_handler = {a.finding.evidence["handler"]: a.finding.evidence for a in found}
    assert sorted(by_handler) == sorted([hooked, inline]), [a.finding.title for a in report.alerts]
    ev = by_handler[hooked]
    assert ev["entries"] == [hooked_nr] and ev["instruction"] == "call" and ev["claimed_by_ftrace"]
    assert ev["target"] == f"0x{trampoline:x}" and ev["site"] == f"0x{sites[hooked]:x}"
    (by,) = ev["hooked_by"]
    assert (by["ops"], by["callback"], by["callback_module"]) == (f"0x{ops:x}", f"0x{callback:x}", owner.name)
    ev = by_handler[inline]
    assert ev["entries"] == [inline_nr] and ev["instruction"] == "jmp" and not ev["claimed_by_ftrace"]
    assert ev["target"] == f"0x{trampoline + 0x40:x}" and ev["hooked_by"] == []
    (ops_alert,) = alerts_of(report, "rootkit.ftrace_ops", "new")
    assert ops_alert.finding.evidence["callback_module"] == owner.name
    assert ops_alert.finding.evidence["filter"] == [f"0x{sites[hooked]:x}"]
    others = [a.finding.title for a in report.alerts if not a.finding.kind.startswith("rootkit.ftrace")]
    assert not others, others
    after = harness.cycle()
    assert {a.finding.kind for a in after.resolved} == {"rootkit.ftrace_syscall_hook", "rootkit.ftrace_ops"}
    assert len(after.resolved) == 3 and not after.new


@lab
def test_hostile_ftrace_ops_list_is_bounded(harness) -> None:
    """An ftrace_ops that links to itself and whose filter-hash pointer is garbage: the
    walk reports both problems and stops; the cycle goes on and judges what was read."""
    from sva.guest.ftrace import registered_ops
    from sva.guest.integrity import _Resolver

    off = {m: harness.offset("ftrace_ops", m) for m in ("func", "next", "func_hash")}
    with harness.backend.frozen():
        pob = harness.read_u64(harness.symbol_va("page_offset_base"))
        scratch = _zero_page(harness, pob)
        ops = pob + scratch
        page = bytearray(4096)
        struct.pack_into("<Q", page, off["func"], 0x4141414141414141)
        struct.pack_into("<Q", page, off["next"], ops)  # a cycle
        struct.pack_into("<Q", page, off["func_hash"], 0x1234)  # not a kernel address
        writes = [(scratch, bytes(page)), (harness.phys(harness.symbol_va("ftrace_ops_list")), struct.pack("<Q", ops))]
        with harness.patched(writes):
            t0 = time.monotonic()
            report = harness.cycle()
            harness.gc.begin_cycle()
            problems: list[str] = []
            walked = registered_ops(harness.gc, _Resolver(harness.gc), problems)
            assert time.monotonic() - t0 < 30
    assert [o.address for o in walked] == [ops]
    assert any("loops back" in p for p in problems) and any("not a kernel address" in p for p in problems), problems
    (alert,) = alerts_of(report, "rootkit.ftrace_ops", "new")
    assert alert.finding.evidence["callback"] == "0x4141414141414141"
    assert alert.finding.evidence["callback_region"] == "other"
    assert alerts_of(harness.cycle(), "rootkit.ftrace_ops", "resolved")


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
