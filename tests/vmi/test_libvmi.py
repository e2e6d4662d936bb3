"""The LibVMI backend: real LibVMI (File driver) over a raw snapshot of the lab guest, its
Linux support walking the guest's task list, bad inputs, a crashing worker, a Python
without the binding, and the Xen code path against a named stand-in.

Xen cannot run here. `XenStandIn` replaces LibVMI's Xen driver inside the worker so the
backend's Xen code path (pause/resume pairing, registers, RAM holes, a worker dying while
the domain is paused) runs end to end through the real child process and pipe protocol.
Those tests check sva's code, not Xen or LibVMI's Xen driver.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sva import lab
from sva.errors import MemoryAccessError, SnapshotFormatError, TargetError
from sva.vmi import Backend, open_target
from sva.vmi.libvmi_backend import (
    WORKER_PATH,
    LibvmiBackend,
    LibvmiDriver,
    LinuxOffsets,
    LinuxOsConfig,
    _Worker,
    isf_member_offset,
)
from sva.vmi.snapshot import write_raw

REPO = Path(__file__).resolve().parents[2]
HAVE_LIBVMI = importlib.util.find_spec("libvmi") is not None
needs_libvmi = pytest.mark.skipif(not HAVE_LIBVMI, reason="the libvmi package is not installed (CPython <= 3.11 extra)")
START_KERNEL_MAP = 0xFFFFFFFF80000000


# -- a raw snapshot of the lab guest, with what the guest and QEMU said at the time --------


@dataclass
class LabSnapshot:
    path: Path
    size: int
    samples: list[tuple[int, bytes]]  # (gpa, bytes) read through the QEMU backend while frozen
    ps_before: dict[int, str]
    ps_after: dict[int, str]


@pytest.fixture(scope="module")
def lab_snapshot(lab_guest, tmp_path_factory) -> LabSnapshot:
    path = tmp_path_factory.mktemp("libvmi") / "guest.raw"
    before = {p.pid: p.comm for p in lab.ps(lab_guest.name)}
    rng = random.Random(20240611)
    with open_target(f"lab:{lab_guest.name}") as live:
        end = live.memory_map.end
        spots = [(0, 4096), (end - 4096, 4096), (end - 1, 1), (0x1000 - 3, 6)]
        spots += [(rng.randrange(0, end - 70000), rng.choice((1, 8, 100, 4096, 4099, 65536))) for _ in range(300)]
        spots = [(g, n) for g, n in spots if live.memory_map.region_of(g) and live.memory_map.region_of(g + n - 1)]
        with live.frozen():
            write_raw(live, str(path))
            samples = [(g, live.read(g, n)) for g, n in spots]
    after = {p.pid: p.comm for p in lab.ps(lab_guest.name)}
    return LabSnapshot(path, path.stat().st_size, samples, before, after)


@pytest.fixture(scope="module")
def lab_isf(lab_snapshot, tmp_path_factory) -> tuple[dict[str, Any], Any]:
    """The guest's ISF as sva.symbols builds it from the snapshot's RAM, and its table record."""
    try:
        from sva.symbols.sources import load_isf, symbols_for_backend
    except ImportError:
        pytest.skip("needs sva.symbols ISF builder")
    from sva.vmi.snapshot import open_snapshot

    with open_snapshot(str(lab_snapshot.path)) as snap:
        table = symbols_for_backend(snap, cache_dir=tmp_path_factory.mktemp("isf-cache"))
    return load_isf(table.path), table


# -- physical memory through the File driver ------------------------------------------------


@needs_libvmi
@pytest.mark.lab
def test_file_reads_equal_the_snapshot_and_qemu(lab_snapshot) -> None:
    raw = lab_snapshot.path.read_bytes()
    with open_target(f"libvmi+file:{lab_snapshot.path}") as b:
        assert isinstance(b, LibvmiBackend) and isinstance(b, Backend)
        assert b.capabilities.to_json() == {"live": False, "pause": False, "registers": False, "write": False}
        assert b.memory_size == lab_snapshot.size == b.memory_map.total_size
        assert [(r.gpa, r.size) for r in b.memory_map] == [(0, lab_snapshot.size)]
        assert b.vcpu_count == 0
        for gpa, want in lab_snapshot.samples:
            got = b.read(gpa, len(want))
            assert got == want, f"LibVMI differs from QEMU at GPA {gpa:#x}+{len(want):#x}"
            assert got == raw[gpa : gpa + len(want)]
        # Several read requests in one call, into a caller's buffer, and a copied view.
        buf = bytearray(20 << 20)
        assert b.readinto(0x100000, buf) == len(buf) and buf == raw[0x100000 : 0x100000 + len(buf)]
        assert bytes(b.view(0x2000, 4096)) == raw[0x2000:0x3000]
        with pytest.raises(MemoryAccessError, match="not guest RAM"):
            b.read(lab_snapshot.size - 8, 16)
        with pytest.raises(TargetError, match="no vCPU state"):
            b.regs(0)
        with pytest.raises(TargetError, match="cannot be paused"):
            b.pause()
        with b.frozen() as rec:  # nothing to pause: the block just runs
            b.read(0, 1)
        assert rec.seconds == 0.0


# -- LibVMI's Linux support over the snapshot ------------------------------------------------


def _expected_kernel_pgd(isf: dict[str, Any], table: Any) -> int | None:
    if table.phys_base is None or table.kaslr_slide is None:
        return None
    va = isf["symbols"]["init_top_pgt"]["address"] + table.kaslr_slide
    return (va - START_KERNEL_MAP + table.phys_base) % (1 << 64)


def _same_comm(task_comm: str, proc_comm: str) -> bool:
    """task_struct.comm against /proc/PID/stat's name. For kernel threads /proc says more:
    a workqueue worker's current work ("kworker/0:0-rcu_gp" for "kworker/0:0") and the
    full name of a kthread whose comm was cut at 15 characters ("rcu_tasks_kthread")."""
    if proc_comm == task_comm:
        return True
    if task_comm.startswith("kworker/") and proc_comm.startswith(task_comm + "-"):
        return True
    return len(task_comm) == 15 and proc_comm.startswith(task_comm)


@needs_libvmi
@pytest.mark.lab
def test_linux_process_walk_matches_the_guests_ps(lab_snapshot, lab_isf) -> None:
    isf, table = lab_isf
    config = LinuxOsConfig.from_isf(isf)
    assert config.offsets == LinuxOffsets(
        tasks=isf["user_types"]["task_struct"]["fields"]["tasks"]["offset"],
        mm=isf["user_types"]["task_struct"]["fields"]["mm"]["offset"],
        pid=isf["user_types"]["task_struct"]["fields"]["pid"]["offset"],
        comm=isf["user_types"]["task_struct"]["fields"]["comm"]["offset"],
        pgd=isf_member_offset(isf, "mm_struct", "pgd"),  # inside an anonymous struct on 6.1
    )
    with open_target(f"libvmi+file:{lab_snapshot.path}") as b:
        assert isinstance(b, LibvmiBackend)
        with pytest.raises(TargetError, match="init_linux first"):
            b.processes()
        t0 = time.perf_counter()
        info = b.init_linux(config)  # no kpgd given: LibVMI finds page tables and KASLR itself
        init_seconds = time.perf_counter() - t0
        # What LibVMI found agrees with sva.symbols' own placement of the kernel.
        if table.kaslr_slide is not None:
            assert info.kaslr_offset == table.kaslr_slide
        expected = _expected_kernel_pgd(isf, table)
        if expected is not None:
            assert info.kpgd == expected
        assert info.page_mode == "IA32E"
        assert info.init_task == isf["symbols"]["init_task"]["address"] + info.kaslr_offset
        procs = b.processes()
        # The symbol read keeps NUL bytes (the binding's read_ksym would cut at the first).
        banner = b.read_ksym("linux_banner", 256)
        assert banner.startswith(b"Linux version ") and len(banner) == 256 and b"\0" in banner
        assert b.read_ksym("init_task", 64) == b.read_kernel(info.init_task, 64)
    print(f"LibVMI Linux init {init_seconds:.2f} s, {len(procs)} tasks")

    by_pid = {p.pid: p for p in procs}
    assert len(by_pid) == len(procs), "a pid twice in the task list"
    assert by_pid[0].comm.startswith("swapper") and by_pid[0].mm == 0
    assert by_pid[1].dtb is not None and by_pid[1].mm != 0
    stable = {pid: comm for pid, comm in lab_snapshot.ps_before.items() if lab_snapshot.ps_after.get(pid) == comm}
    for pid, comm in stable.items():
        assert pid in by_pid, f"pid {pid} ({comm}) is in the guest's ps but not in LibVMI's walk"
        assert _same_comm(by_pid[pid].comm, comm), (pid, by_pid[pid].comm, comm)
    listed = {**lab_snapshot.ps_before, **lab_snapshot.ps_after, 0: "swapper/0"}
    extra = [p for p in procs if p.pid not in listed]
    # What started and ended between the two listings can only be a kernel worker or a
    # new instance of a program the guest was running (its loops restart sleep, nc...).
    known = {comm[:15] for comm in listed.values()}
    assert all((p.comm.startswith("kworker/") and p.mm == 0) or p.comm in known for p in extra), extra
    for name in ("implant", "xmrig", "nc"):  # the infected scenario's processes
        assert any(p.comm == name for p in procs)


@needs_libvmi
@pytest.mark.lab
def test_linux_with_given_kernel_pgd(lab_snapshot, lab_isf) -> None:
    isf, table = lab_isf
    kpgd = _expected_kernel_pgd(isf, table)
    if kpgd is None:
        pytest.skip("the ISF builder did not report phys_base and the KASLR slide")
    backend = LibvmiBackend(LibvmiDriver.FILE, str(lab_snapshot.path), linux=LinuxOsConfig.from_isf(isf, kpgd=kpgd))
    with backend as b:
        assert b.linux is not None and b.linux.kpgd == kpgd and b.linux.kaslr_offset == table.kaslr_slide
        assert {p.pid for p in b.processes()} >= set(lab_snapshot.ps_before) & set(lab_snapshot.ps_after)


# -- bad targets -----------------------------------------------------------------------------


def test_bad_schemes_and_paths(tmp_path: Path) -> None:
    for spec, message in (
        ("libvmi+kvm:vm1", "unknown target"),
        ("libvmi:", "needs a name"),
        ("libvmi+file:", "needs a path"),
        (f"libvmi+file:{tmp_path}/missing.raw", "No such file"),
        (f"libvmi+file:{tmp_path}", "is a directory"),
        ("libvmi+file:/dev/null", "not a regular file"),
        (f"libvmi+file:{tmp_path}/a\0b", "embedded null"),
        (f"libvmi+file:{tmp_path}/" + "d" * 600, "File name too long|longer than"),
    ):
        with pytest.raises(TargetError, match=message) as err:
            open_target(spec)
        assert spec.split(":", 1)[0] in str(err.value)


def test_files_that_are_not_raw_images(tmp_path: Path) -> None:
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    odd = tmp_path / "random.bin"
    odd.write_bytes(os.urandom(10000))  # random, and not a whole number of pages
    elf = tmp_path / "core.raw"
    elf.write_bytes(b"\x7fELF" + bytes(8188))
    with pytest.raises(SnapshotFormatError, match="empty"):
        LibvmiBackend(LibvmiDriver.FILE, str(empty))
    with pytest.raises(SnapshotFormatError, match="page-multiple"):
        LibvmiBackend(LibvmiDriver.FILE, str(odd))
    with pytest.raises(TargetError, match="ELF snapshot; LibVMI's File driver reads raw images only"):
        LibvmiBackend(LibvmiDriver.FILE, str(elf))


# Offsets and symbols of no particular kernel: enough for LibVMI to look for one.
SOME_LINUX = LinuxOsConfig(
    LinuxOffsets(tasks=0x890, mm=0x8E0, pid=0x970, comm=0xBA0, pgd=0x48),
    symbols={"init_task": 0xFFFFFFFF82A1AA40, "init_top_pgt": 0xFFFFFFFF82A10000,
             "startup_64": 0xFFFFFFFF81000000, "phys_startup_64": 0x1000000},
)  # fmt: skip


@needs_libvmi
def test_random_bytes_read_back_but_hold_no_linux(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    path = tmp_path / "random.raw"
    path.write_bytes(data)
    with LibvmiBackend(LibvmiDriver.FILE, str(path)) as b:
        # A raw image has no header: any page-multiple file is "memory" ...
        assert b.read(0x1234, 5000) == data[0x1234 : 0x1234 + 5000]
        # ... but LibVMI finds no kernel in it, and says so.
        with pytest.raises(TargetError, match="could not initialise Linux"):
            b.init_linux(SOME_LINUX)
        assert b.read(0, 16) == data[:16]  # the worker lives on after a failed init


@needs_libvmi
def test_truncated_images(tmp_path: Path) -> None:
    data = os.urandom(256 << 10) * 32  # 8 MiB
    cut = tmp_path / "cut.raw"
    cut.write_bytes(data[: (4 << 20) + 123])
    with pytest.raises(SnapshotFormatError, match="page-multiple"):
        open_target(f"libvmi+file:{cut}")
    shrinking = tmp_path / "shrinking.raw"
    shrinking.write_bytes(data)
    with open_target(f"libvmi+file:{shrinking}") as b:
        assert b.read(0, 4096) == data[:4096]
        os.truncate(shrinking, 2 << 20)  # the snapshot is cut short while open
        with pytest.raises(MemoryAccessError, match="could not read guest-physical"):
            b.read(5 << 20, 4096)
        assert b.read(4096, 4096) == data[4096:8192]


# -- the worker is a separate process -------------------------------------------------------


@needs_libvmi
def test_a_crashing_worker_is_an_error_not_a_dead_appliance(tmp_path: Path) -> None:
    path = tmp_path / "m.raw"
    path.write_bytes(bytes(range(256)) * 64)
    b = LibvmiBackend(LibvmiDriver.FILE, str(path))
    pid = b.worker_pid
    assert b.read(256, 4) == b"\0\1\2\3"
    with pytest.raises(TargetError, match=r"died from signal SIGABRT during _debug_abort") as err:
        b._debug_crash_worker()
    assert err.value.target == f"libvmi+file:{path}"
    with pytest.raises(TargetError, match="SIGABRT"):  # and stays an error
        b.read(0, 4)
    b.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie


@needs_libvmi
def test_libvmi_segfault_on_a_missing_file_is_contained(tmp_path: Path) -> None:
    """The defect the path checks exist for, run for real: bypass them and let LibVMI crash."""
    worker = _Worker("libvmi+file:missing", [sys.executable, WORKER_PATH], 30.0)
    try:
        with pytest.raises(TargetError, match="died from signal SIGSEGV during open") as err:
            worker.call("open", 30.0, driver="file", name=str(tmp_path / "missing.raw"))
        assert "Failed to open file" in str(err.value)  # LibVMI's own words, quoted
    finally:
        worker.close()


# -- a Python without the binding ------------------------------------------------------------


def test_no_binding_in_this_python(tmp_path: Path) -> None:
    """As on CPython >= 3.12, where PyPI has no libvmi wheel: simulated with sys.modules."""
    raw = tmp_path / "m.raw"
    raw.write_bytes(bytes(4096))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['libvmi'] = None\n")
    code = (
        "import sys\nfrom sva.errors import SvaError\nfrom sva.vmi import open_target\n"
        f"try:\n    open_target({f'libvmi+file:{raw}'!r})\nexcept SvaError as e:\n    print(e)\n    sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 3, res.stderr
    assert "libvmi+file:" in res.stdout and "No module named 'libvmi'" in res.stdout
    assert "pip install 'sva[libvmi]'" in res.stdout and "CPython <= 3.11" in res.stdout


def test_no_binding_in_the_worker(tmp_path: Path) -> None:
    raw = tmp_path / "m.raw"
    raw.write_bytes(bytes(4096))
    command = [sys.executable, "-c",
               f"import sys, runpy; sys.modules['libvmi'] = None; runpy.run_path({WORKER_PATH!r}, run_name='__main__')"]
    with pytest.raises(TargetError, match=r"install the libvmi extra.*CPython <= 3\.11"):
        LibvmiBackend(LibvmiDriver.FILE, str(raw), worker_command=command)


# -- the Xen code path, against a stand-in ---------------------------------------------------


class XenStandIn:
    """Stands in for LibVMI's Xen driver, which cannot run here: a `libvmi.Libvmi`-shaped
    object over a raw image (the "domain name" is its path), with a RAM hole, two vCPUs
    with fixed registers, and pause/resume calls appended to `<image>.control`.
    It exercises sva's Xen code path; it says nothing about Xen."""

    HOLE = (0xA0000, 0x100000)
    PAGE_MODE = SimpleNamespace(name="IA32E")

    def __init__(self, driver: str, name: str) -> None:
        assert driver == "xen", driver
        self.data = Path(name).read_bytes()
        self.control = Path(name + ".control")

    def get_memsize(self) -> int:
        return len(self.data) - (self.HOLE[1] - self.HOLE[0])

    def get_max_physical_address(self) -> int:
        return len(self.data)

    def get_num_vcpus(self) -> int:
        return 2

    def get_page_mode(self, vcpu: int) -> Any:
        return self.PAGE_MODE

    def read_pa(self, addr: int, size: int, padding: bool = False) -> tuple[bytes, int]:
        got = size
        if addr < self.HOLE[1] and addr + size > self.HOLE[0]:
            got = max(0, self.HOLE[0] - addr)
        got = min(got, max(0, len(self.data) - addr))
        return self.data[addr : addr + got] + bytes(size - got), got

    def get_vcpuregs(self, vcpu: int) -> Any:
        if vcpu not in (0, 1):
            raise RuntimeError("VMI_FAILURE")
        names = ("rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags cr0 cr2 cr3 cr4 "
                 "msr_efer fs_base gs_base").split()  # fmt: skip
        x86 = SimpleNamespace(**{n: 0x1000 * (vcpu + 1) + i for i, n in enumerate(names)})
        x86.cr3, x86.cr0, x86.msr_efer = 0x2AF4000 + vcpu * 0x1000, 0x80050033, 0xD01
        return SimpleNamespace(cffi_regs=SimpleNamespace(x86=x86))

    def get_vcpureg(self, reg: int, vcpu: int) -> int:
        return {45: 0xFFF, 46: 0x7F, 55: 0xFFFFFE0000000000, 56: 0xFFFFFE0000001000 + vcpu}[reg]

    def pause_vm(self) -> None:
        with self.control.open("a") as f:
            f.write("pause\n")

    def resume_vm(self) -> None:
        with self.control.open("a") as f:
            f.write("resume\n")

    def destroy(self) -> None:
        pass


XEN_STAND_IN = [sys.executable, "-c",
                f"import sys; sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(REPO)!r}]\n"
                "from test_libvmi import XenStandIn\nfrom sva.vmi.libvmi_worker import main\n"
                "sys.exit(main(XenStandIn))"]  # fmt: skip


@pytest.fixture
def xen_stand_in(tmp_path: Path) -> Iterator[tuple[LibvmiBackend, bytes, Path]]:
    data = os.urandom(4 << 20)
    image = tmp_path / "domU.raw"
    image.write_bytes(data)
    backend = LibvmiBackend(LibvmiDriver.XEN, str(image), target="libvmi:domU", worker_command=XEN_STAND_IN)
    yield backend, data, Path(str(image) + ".control")
    backend.close()


def _control(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_xen_path_memory_and_registers(xen_stand_in) -> None:
    b, data, _ = xen_stand_in
    assert isinstance(b, Backend)
    assert b.capabilities.to_json() == {"live": True, "pause": True, "registers": True, "write": False}
    assert b.traits.libvmi_events and b.vcpu_count == 2 and b.path is None
    assert b.memory_map.total_size == len(data) and b.memory_size == len(data) - 0x60000
    assert b.read(0x100000, 0x10000) == data[0x100000:0x110000]
    with pytest.raises(MemoryAccessError, match="could not read guest-physical 0xa0000"):
        b.read(0x9F000, 0x2000)  # runs into the RAM hole LibVMI does not report
    r = b.regs(1)
    assert (r.vcpu, r.cr3, r.efer, r.idtr_base, r.gdtr_base, r.gdtr_limit) == (
        1, 0x2AF5000, 0xD01, 0xFFFFFE0000000000, 0xFFFFFE0000001001, 0x7F)  # fmt: skip
    assert r.extra["rax"] == 0x2000 and "cr3" not in r.extra
    with pytest.raises(TargetError, match="no vCPU 2"):
        b.regs(2)


def test_xen_path_frozen_pairs_pause_and_resume(xen_stand_in) -> None:
    b, _, control = xen_stand_in
    with b.frozen() as rec:
        assert _control(control) == ["pause"]
        time.sleep(0.05)
    assert _control(control) == ["pause", "resume"] and rec.seconds is not None and rec.seconds >= 0.05
    with pytest.raises(RuntimeError, match="boom"):
        with b.frozen():
            raise RuntimeError("boom")
    assert _control(control) == ["pause", "resume"] * 2


def test_xen_path_worker_dying_while_paused(xen_stand_in) -> None:
    b, _, control = xen_stand_in
    with pytest.raises(TargetError, match=r"SIGABRT during _debug_abort; the domain may still be paused.*xl unpause"):
        with b.frozen():
            b._debug_crash_worker()
    assert _control(control) == ["pause"]


def test_ctrl_c_in_the_middle_of_an_answer_still_resumes(xen_stand_in, monkeypatch) -> None:
    """Ctrl-C after the first bytes of an answer: the next request finds its frame again
    (and frozen() can still resume the domain)."""
    b, data, control = xen_stand_in
    real_readv = os.readv
    armed = [True]

    def readv_then_ctrl_c(fd: int, buffers: list[memoryview]) -> int:
        if armed[0]:
            armed[0] = False
            real_readv(fd, buffers)
            raise KeyboardInterrupt
        return real_readv(fd, buffers)

    with pytest.raises(KeyboardInterrupt):
        with b.frozen():
            monkeypatch.setattr(os, "readv", readv_then_ctrl_c)
            b.read(0x100000, 3 << 20)  # interrupted right after the answer's header
    assert not armed[0] and _control(control) == ["pause", "resume"]
    assert b.read(0x200000, 0x1000) == data[0x200000:0x201000]


@needs_libvmi
def test_xen_without_xen_is_a_clear_error() -> None:
    """Real LibVMI, Xen driver, on a machine without Xen."""
    with pytest.raises(TargetError, match=r"libvmi:nosuchdomain: LibVMI could not open xen target 'nosuchdomain'"):
        open_target("libvmi:nosuchdomain")


@needs_libvmi
def test_cli_info(tmp_path: Path) -> None:
    raw = tmp_path / "m.raw"
    raw.write_bytes(bytes(1 << 20))
    res = subprocess.run([sys.executable, "-m", "sva", "info", f"libvmi+file:{raw}", "--json"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["backend"] == "LibvmiBackend" and info["memory_size"] == 1 << 20 and info["vcpus"] == []
    missing = subprocess.run([sys.executable, "-m", "sva", "info", f"libvmi+file:{tmp_path}/nope.raw"],
                             capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert missing.returncode == 2 and "No such file" in missing.stderr and len(missing.stderr.splitlines()) == 1
