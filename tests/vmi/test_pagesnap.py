"""Short-pause page copies (sva.vmi.pagesnap) on a real QEMU's RAM file.

The test plays the guest: it writes the RAM file after the copy (a harness may write guest
memory; the appliance never does), and checks that reads inside the overlay see the
copied bytes for copied pages and the live ones, recorded as misses, for the others.
"""

from __future__ import annotations

import os

import pytest

from sva.errors import MemoryAccessError, TargetError
from sva.vmi import pagesnap
from sva.vmi.pagesnap import PAGE_SIZE, page_runs
from sva.vmi.qemu import QemuBackend


def _write(path: str, pfn: int, byte: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([byte]) * PAGE_SIZE, pfn * PAGE_SIZE)
    finally:
        os.close(fd)


def test_page_runs_coalesce_and_bound() -> None:
    assert page_runs([7, 3, 4, 5, 9, 10]) == [(3, 3), (7, 1), (9, 2)]
    assert page_runs(range(100), limit=10) == [(0, 10)]
    assert page_runs([]) == []


def test_overlay_serves_the_copy_and_records_live_reads_as_misses(bare_vm) -> None:
    vm = bare_vm(mem="64M")
    for pfn in (10, 11, 20):
        _write(vm.mem_path, pfn, 0xA1)
    with QemuBackend(vm.qmp_path) as b:
        with b.frozen():
            snap = b.snapshot({10, 11}, registers=True)
        assert sorted(snap.pages) == [10, 11] and snap.size == 2 * PAGE_SIZE
        assert snap.registers and 0 in snap.registers
        for pfn in (10, 11, 20):  # the guest writes after the copy
            _write(vm.mem_path, pfn, 0xB2)
        with b.overlay(snap):
            across = b.read(11 * PAGE_SIZE - 8, 16)  # spans pages 10 and 11
            assert across == b"\xa1" * 16
            assert b.read(20 * PAGE_SIZE, 4) == b"\xb2" * 4  # not copied: live
            view = b.view(10 * PAGE_SIZE, 32)
            assert bytes(view) == b"\xa1" * 32 and view.readonly
            assert b.regs(0) == snap.registers[0]
            with pytest.raises(TargetError, match="already"), b.overlay(snap):
                pass
        assert snap.touched == {10, 11, 20} and snap.missed == {20}
        assert not snap.consistent and not snap.registers_missed
        assert b.read(10 * PAGE_SIZE, 4) == b"\xb2" * 4  # outside the overlay: live again


def test_consistent_when_every_read_is_copied(bare_vm) -> None:
    vm = bare_vm(mem="64M")
    with QemuBackend(vm.qmp_path) as b:
        with b.frozen():
            snap = b.snapshot({5})
        with b.overlay(snap):
            b.read(5 * PAGE_SIZE + 100, 200)
        assert snap.consistent and snap.touched == {5}
        with b.overlay(snap):
            b.regs(0)  # registers were not copied: read live, which is a miss too
        assert snap.registers_missed and not snap.consistent


def test_pages_outside_ram_are_left_out_and_fail_like_live_reads(bare_vm) -> None:
    vm = bare_vm(mem="64M")
    beyond = (64 << 20) // PAGE_SIZE + 5  # below 4 GiB, past the end of a 64 MiB q35's RAM
    with QemuBackend(vm.qmp_path) as b:
        with b.frozen():
            snap = b.snapshot({1, beyond, beyond + 1})
        assert sorted(snap.pages) == [1]
        with b.overlay(snap), pytest.raises(MemoryAccessError):
            b.read(beyond * PAGE_SIZE, 8)
        assert beyond in snap.missed


def test_a_walk_touching_too_many_pages_overflows(bare_vm, monkeypatch) -> None:
    monkeypatch.setattr(pagesnap, "MAX_SNAPSHOT_PAGES", 4)
    vm = bare_vm(mem="64M")
    with QemuBackend(vm.qmp_path) as b:
        with b.frozen():
            snap = b.snapshot(range(100, 110))
        assert len(snap.pages) == 10  # page_runs' default limit was bound at import: 10 < 32768
        with b.overlay(snap):
            b.read(100 * PAGE_SIZE, 6 * PAGE_SIZE)
        assert snap.overflow and not snap.consistent


def test_a_big_enough_buffer_is_reused(bare_vm) -> None:
    vm = bare_vm(mem="64M")
    _write(vm.mem_path, 30, 0xC3)
    with QemuBackend(vm.qmp_path) as b:
        with b.frozen():
            first = b.snapshot({30, 31, 32})
            again = b.snapshot({30}, buffer=first.data)
            small = b.snapshot({30, 31, 32, 33, 34}, buffer=bytearray(PAGE_SIZE))
        assert again.data is first.data and again.size == PAGE_SIZE
        assert len(small.data) >= 5 * PAGE_SIZE and small.size == 5 * PAGE_SIZE
        for snap in (first, again, small):
            with b.overlay(snap):
                assert b.read(30 * PAGE_SIZE, 8) == b"\xc3" * 8
            assert snap.consistent
