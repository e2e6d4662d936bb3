"""The live QEMU backend against real (not booted) QEMU machines: map, errors, read-only."""

from __future__ import annotations

import errno
import mmap
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sva.errors import MemoryAccessError, QmpError, SvaError, TargetError
from sva.vmi import open_target
from sva.vmi.qemu import QemuBackend, parse_flat_memory_map
from sva.vmi.qmp import QmpClient

GiB = 1 << 30


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sva", *args], capture_output=True, text=True, timeout=120)


def assert_clean_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit status 2, one line on stderr naming the problem, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_q35_above_4g_map_follows_qemu_not_identity(bare_vm) -> None:
    vm = bare_vm(mem="3G")
    # The test harness (not the appliance) plants a pattern in the RAM file where QEMU keeps
    # guest RAM above the PCI hole, then asks QEMU itself which GPA shows it.
    pattern = b"SVA-HIGH-RAM-PATTERN"
    with open(vm.mem_path, "r+b") as f:
        f.seek(2 * GiB + 0x1230)
        f.write(pattern)
    with QemuBackend(vm.qmp_path) as b:
        regions = list(b.memory_map)
        high = [r for r in regions if r.gpa >= 4 * GiB]
        assert high and high[0].gpa == 4 * GiB and high[0].offset == 2 * GiB and high[0].size == 1 * GiB
        assert b.memory_size <= 3 * GiB and b.memory_size > 3 * GiB - 2 * (1 << 20)
        assert b.read(4 * GiB + 0x1230, len(pattern)) == pattern
        xp = b.qmp.hmp("xp /1bx 0x100001230")
        assert f"0x{pattern[0]:02x}" in xp
        # GPA 2 GiB is the PCI hole on q35: not RAM, although the file has bytes there.
        with pytest.raises(MemoryAccessError, match="not guest RAM"):
            b.read(2 * GiB + 0x1230, 4)
        with pytest.raises(MemoryAccessError):
            b.read(b.memory_map.end - 2, 4)
        with pytest.raises(MemoryAccessError):
            b.read(-1, 4)


def test_registers_of_every_vcpu_in_reset_state(bare_vm) -> None:
    vm = bare_vm(smp=2)
    with QemuBackend(vm.qmp_path) as b:
        assert b.vcpu_count == 2
        for i in range(2):
            r = b.regs(i)
            assert r.vcpu == i and r.rip == 0xFFF0 and r.cr0 == 0x60000010
            assert r.idtr_limit == 0xFFFF and r.gdtr_limit == 0xFFFF
        with pytest.raises(TargetError, match="no vCPU 2"):
            b.regs(2)


def test_mapping_is_read_only(bare_vm) -> None:
    vm = bare_vm()
    with QemuBackend(vm.qmp_path) as b:
        view = b.view(0x1000, 16)
        assert view.readonly
        with pytest.raises(TypeError):
            view[0] = 1  # type: ignore[index]
        with pytest.raises(TypeError):
            b._mmap.write_byte(0)  # type: ignore[union-attr]
        with pytest.raises(OSError) as e:
            os.write(b._fd, b"x")
        assert e.value.errno == errno.EBADF
        # The kernel's own record of the mapping: readable, shared, not writable.
        maps = Path("/proc/self/maps").read_text().splitlines()
        mine = [m for m in maps if m.endswith(vm.mem_path)]
        assert mine and all(m.split()[1] == "r--s" for m in mine), mine
        view.release()


def test_vm_without_file_ram_is_refused_with_advice(bare_vm) -> None:
    vm = bare_vm(ram="none")
    res = run_cli("info", f"qemu:{vm.qmp_path}")
    assert_clean_error(res, "memory-backend-file", "share=on")


def test_vm_with_private_ram_is_refused(bare_vm) -> None:
    vm = bare_vm(ram="private")
    with pytest.raises(TargetError, match="share=off"):
        QemuBackend(vm.qmp_path)


def test_vm_with_anonymous_ram_file_is_refused(bare_vm) -> None:
    vm = bare_vm(ram="dir")
    with pytest.raises(TargetError, match="directory"):
        QemuBackend(vm.qmp_path)


def test_missing_socket_and_non_socket(tmp_path: Path) -> None:
    assert_clean_error(run_cli("info", f"qemu:{tmp_path}/nope.sock"), "no such QMP socket")
    f = tmp_path / "plain"
    f.write_text("hello")
    assert_clean_error(run_cli("info", f"qemu:{f}"), "not a unix socket")
    assert_clean_error(run_cli("info", "bogus:thing"), "unknown target")
    assert_clean_error(run_cli("info", "qemu:"), "needs a path")


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n", b'["not", "qmp"]\n', b"x" * 100])
def test_socket_that_is_not_qmp(tmp_path: Path, reply: bytes) -> None:
    path = str(tmp_path / "fake.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.sendall(reply)
        if reply:
            conn.close()
        else:
            threading.Event().wait(3)  # silent peer: the client must give up by itself
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with pytest.raises(QmpError) as e:
        QmpClient(path, timeout=1.0)
    assert path in str(e.value)
    srv.close()


def test_qemu_dying_mid_read(bare_vm) -> None:
    vm = bare_vm(mem="128M")
    b = QemuBackend(vm.qmp_path)
    try:
        before = b.read(0, 4096)
        vm.kill()
        # Memory already mapped stays readable (the file outlives QEMU), and every
        # control call says clearly that QEMU is gone.
        assert b.read(0, 4096) == before
        with pytest.raises(QmpError, match="did QEMU exit"):
            b.pause()
        with pytest.raises(QmpError):
            b.regs(0)
        with pytest.raises(QmpError):
            with b.frozen():
                pass
        # A truncated RAM file must give an error, not SIGBUS.
        os.truncate(vm.mem_path, 4096)
        with pytest.raises(MemoryAccessError, match="ended|shrank"):
            b.read(0x100000, 4096)
        with pytest.raises(MemoryAccessError, match="shrank"):
            b.view(0x100000, 4096)
    finally:
        b.close()
    assert_clean_error(run_cli("info", f"qemu:{vm.qmp_path}"), vm.qmp_path)


def test_busy_monitor_gives_clear_error(bare_vm) -> None:
    vm = bare_vm()
    with QemuBackend(vm.qmp_path):
        with pytest.raises(QmpError, match="another client"):
            QmpClient(vm.qmp_path, timeout=1.0)


def test_flat_map_parser_merges_and_ignores_other_regions() -> None:
    text = """FlatView #0
 AS "I/O", root: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan

FlatView #1
 AS "memory", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): ram0
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000dffff (prio 1, rom): ram0 @00000000000c0000
  00000000000e0000-00000000000fffff (prio 1, rom): ram0 @00000000000e0000
  0000000000100000-000000007fffffff (prio 0, ram): ram0 @0000000000100000
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): ram0 @0000000080000000
"""
    got = parse_flat_memory_map(text, {"ram0"})
    assert got == [
        ("ram0", 0, 0xA0000, 0),
        ("ram0", 0xC0000, 0x80000000 - 0xC0000, 0xC0000),
        ("ram0", 0x100000000, 0x40000000, 0x80000000),
    ]
    assert parse_flat_memory_map(text, {"other"}) == []
    assert parse_flat_memory_map("garbage", {"ram0"}) == []


def test_open_target_bare_path_is_detected(bare_vm) -> None:
    vm = bare_vm()
    with open_target(vm.qmp_path) as b:
        assert isinstance(b, QemuBackend)
    with pytest.raises(SvaError):
        open_target("/nonexistent/definitely")


@pytest.mark.parametrize(
    "content",
    [b"", b"\x7fELF" + b"\x02\x01\x01" + b"\x00" * 9, b"EMiL\x01\x00\x00\x00" + b"\xff" * 20, os.urandom(5000)],
    ids=["empty", "truncated-elf", "truncated-lime", "random-bytes"],
)
def test_cli_refuses_bad_snapshot_files(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "bad.img"
    f.write_bytes(content)
    assert_clean_error(run_cli("info", f"file:{f}"), str(f))
    assert_clean_error(run_cli("snapshot", f"file:{f}", str(tmp_path / "out.raw")), str(f))
    assert not (tmp_path / "out.raw").exists()


def test_cli_snapshot_of_a_snapshot_round_trips(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(64 * 4096))
    res = run_cli("snapshot", f"file:{src}", str(tmp_path / "copy.elf"), "--format", "elf")
    assert res.returncode == 0, res.stderr
    assert "guest paused 0.0 ms" in res.stdout
    with open_target(f"file:{tmp_path / 'copy.elf'}") as b:
        assert b.read(0, 64 * 4096) == src.read_bytes()
    missing_dir = tmp_path / "no" / "such" / "dir" / "x.raw"
    assert_clean_error(run_cli("snapshot", f"file:{src}", str(missing_dir)), str(missing_dir))
