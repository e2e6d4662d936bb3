"""The VMI layer against a real booted lab guest: memory, registers, freezing, snapshots."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sva.lab import exec_in
from sva.vmi import open_target
from sva.vmi.base import MappedBackend
from sva.vmi.qemu import QemuBackend
from sva.vmi.snapshot import open_snapshot, write_elf, write_lime, write_raw

pytestmark = pytest.mark.lab

MARKER_RULE = Path(__file__).resolve().parents[2] / "signatures" / "test" / "lab_marker.yar"
KERNEL_SPACE = 0xFFFF800000000000


def lab_marker() -> bytes:
    """The marker string as the shipped test signature defines it."""
    m = re.search(r'"(SVA-LAB-MARKER-[^"]+)"', MARKER_RULE.read_text())
    assert m, f"no marker string in {MARKER_RULE}"
    return m.group(1).encode()


def find_all(backend: MappedBackend, pattern: bytes) -> list[int]:
    """Guest-physical addresses of `pattern`, scanning the backend's zero-copy views."""
    rx = re.compile(re.escape(pattern))
    hits = []
    for region, view in backend.region_views():
        hits += [region.gpa + m.start() for m in rx.finditer(view)]
        view.release()
    return hits


def counter_value(backend: MappedBackend, token: str) -> int:
    """The highest value of the guest counter tagged `token` found in guest RAM."""
    rx = re.compile(rb"SVACTR" + token.encode() + rb":(\d{1,12})X")
    best = -1
    for _region, view in backend.region_views():
        for m in rx.finditer(view):
            # Live memory changes under a zero-copy view while the guest runs: a
            # match can be torn by the time its group is read.
            digits = m.group(1)
            if digits.isdigit():
                best = max(best, int(digits))
        view.release()
    return best


def test_marker_found_through_backend(lab_guest) -> None:
    marker = lab_marker()
    with open_target(f"lab:{lab_guest.name}") as b:
        hits = find_all(b, marker)
        assert hits, "the infected scenario's marker is not in guest RAM"
        for gpa in hits[:5]:
            assert b.read(gpa, len(marker)) == marker
    # Control: a string that the guest does not hold is not found.
    with open_target(f"lab:{lab_guest.name}") as b:
        assert find_all(b, b"SVA-LAB-NOT-PRESENT-" + marker[::-1]) == []


def test_registers_while_idle(lab_guest) -> None:
    with open_target(f"lab:{lab_guest.name}") as b:
        assert b.vcpu_count >= 1
        kernel_rips = 0
        for _ in range(10):
            r = b.regs(0)
            cr3 = r.cr3 & ~0xFFF & ((1 << 52) - 1)
            assert r.cr3 & 0xFFF == 0 or r.cr4 & (1 << 17), f"CR3 {r.cr3:#x} not page-aligned without PCID"
            assert b.memory_map.region_of(cr3) is not None, f"CR3 {cr3:#x} outside guest RAM"
            assert r.cr0 & 0x80000001 == 0x80000001  # paging and protected mode on
            assert r.efer & (1 << 10)  # long mode active
            assert r.idtr_base >= KERNEL_SPACE and r.gdtr_base >= KERNEL_SPACE
            kernel_rips += r.rip >= KERNEL_SPACE
            time.sleep(0.05)
        # An idle guest sits in the kernel's idle loop nearly all the time.
        assert kernel_rips >= 8


def _start_counter(name: str, token: str) -> int:
    """Start a guest loop that keeps writing SVACTR<token>:<n>X; returns its guest pid."""
    res = exec_in(
        name,
        # `1<>` rewrites the file in place without truncating it, so the tmpfs page that
        # holds the value is never freed and the newest value is always in RAM.
        f"(touch /tmp/svactr{token}; i=0; while :; do i=$((i+1)); "
        f"echo SVACTR{token}:${{i}}X 1<>/tmp/svactr{token}; done)"
        " >/dev/null 2>&1 & echo $!",
        timeout=30,
    )
    assert res.status == 0, res
    return int(res.output.strip().splitlines()[-1])


def _eventually(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_frozen_stops_the_guest_and_always_resumes(lab_guest) -> None:
    token = f"{os.getpid()}{int(time.time() * 1000) % 100000}"
    pid = _start_counter(lab_guest.name, token)
    ctr = lambda b: counter_value(b, token)  # noqa: E731
    with QemuBackend(lab_guest.qmp_path) as b:
        deadline = time.monotonic() + 20
        while ctr(b) < 10 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ctr(b) >= 10, "the guest counter never started"

        with b.frozen() as rec:
            assert b.status() == "paused"
            first = ctr(b)
            time.sleep(1.0)
            assert ctr(b) == first, "counter advanced while frozen"
        assert rec.seconds is not None and rec.seconds >= 1.0
        assert b.status() == "running"
        assert _eventually(lambda: ctr(b) > first), "counter did not advance after thaw"

        with pytest.raises(RuntimeError, match="boom"):
            with b.frozen():
                assert b.status() == "paused"
                raise RuntimeError("boom")
        assert b.status() == "running"
        after_error = ctr(b)
        assert _eventually(lambda: ctr(b) > after_error), "counter did not advance after an error"

        # A guest paused by someone else stays paused after our freeze.
        b.pause()
        try:
            with b.frozen() as rec2:
                pass
            assert rec2.seconds == 0.0
            assert b.status() == "paused"
        finally:
            b.resume()
    exec_in(lab_guest.name, f"kill {pid}; rm -f /tmp/svactr{token}", timeout=30)


def _compare(a: MappedBackend, b: MappedBackend, gpa_map: MappedBackend, chunk: int = 4 << 20) -> int:
    checked = 0
    for region in gpa_map.memory_map:
        pos = region.gpa
        while pos < region.end:
            n = min(chunk, region.end - pos)
            ra, rb = a.read(pos, n), b.read(pos, n)
            assert ra == rb, f"snapshots differ in GPA 0x{pos:x}+0x{n:x}"
            pos += n
            checked += n
    return checked


def test_snapshots_raw_elf_lime_and_qemu_dump_agree(lab_guest, tmp_path: Path) -> None:
    raw, elf, lime, qdump = (tmp_path / n for n in ("g.raw", "g.elf", "g.lime", "qemu.elf"))
    with QemuBackend(lab_guest.qmp_path) as live:
        with live.frozen():
            regs = [live.regs(i) for i in range(live.vcpu_count)]
            write_raw(live, str(raw))
            write_elf(live, str(elf), regs)
            write_lime(live, str(lime))
            live.qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{qdump}"})
            live_map = live.memory_map
            live_first = live.read(0x100000, 1 << 20)
        assert live.status() == "running"
    with open_snapshot(str(raw)) as r, open_snapshot(str(elf)) as e, open_snapshot(str(lime)) as li, \
            open_snapshot(str(qdump)) as q:
        def spans(m):
            return [(x.gpa, x.size) for x in m]

        assert spans(e.memory_map) == spans(live_map) and spans(li.memory_map) == spans(live_map)
        assert type(e).__name__ == "ElfCoreSnapshot" and type(li).__name__ == "LimeSnapshot"
        assert r.read(0x100000, 1 << 20) == live_first
        checked = _compare(r, e, e)
        assert checked == live_map.total_size
        _compare(e, li, e)
        _compare(e, q, e)  # our ELF and QEMU's own dump hold the same bytes at every GPA
        assert e.vcpu_count == len(regs) and e.regs(0).cr3 == regs[0].cr3 and e.regs(0).rip == regs[0].rip
        assert q.regs(0).cr3 == regs[0].cr3


def test_cli_info_and_snapshot(lab_guest, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "sva", "info", f"lab:{lab_guest.name}", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["capabilities"] == {"live": True, "pause": True, "registers": True, "write": False}
    assert info["memory_size"] > 200 << 20 and info["vcpus"][0]["cr3"] > 0
    human = subprocess.run([sys.executable, "-m", "sva", "info", f"lab:{lab_guest.name}"],
                           capture_output=True, text=True, timeout=60)
    assert human.returncode == 0 and "CR3 0x" in human.stdout and "never writes" in human.stdout

    out = tmp_path / "cli.elf"
    res = subprocess.run([sys.executable, "-m", "sva", "snapshot", f"lab:{lab_guest.name}", str(out),
                          "--format", "elf", "--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert 0 < rep["paused_seconds"] < 30
    with open_snapshot(str(out)) as s:
        assert s.memory_size == info["memory_size"]
        # CR3 is whichever process ran last (it changed between the two commands when
        # another process ran meanwhile), but every top-level table maps the same kernel:
        # its upper half is the same in both.
        then, now = info["vcpus"][0]["cr3"] & 0x000FFFFFFFFFF000, s.regs(0).cr3 & 0x000FFFFFFFFFF000
        kernel_half = s.read(now + 2048, 2048)
        assert kernel_half != bytes(2048) and s.read(then + 2048, 2048) == kernel_half
    res = subprocess.run([sys.executable, "-m", "sva", "info", f"file:{out}"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "ElfCoreSnapshot" in res.stdout
