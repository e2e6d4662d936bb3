"""The ivshmem backend: target parsing, and a real lab guest read the way the appliance reads it.

Outside an appliance VM there is no ivshmem BAR, but the BAR is only an mmap-able view of
the guest's RAM file with the same offsets: the live tests map the lab guest's RAM file
through `IvshmemBackend` (read-only, no read() calls) and reach its QMP over a unix socket
and over TCP through socat, as the appliance does through a slirp guestfwd. The appliance
image test (tests/appliance/test_image.py) runs the same backend against a real BAR.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sva.errors import MemoryAccessError, TargetError
from sva.vmi import open_target
from sva.vmi.ivshmem import SYSFS_PCI, IvshmemBackend, IvshmemSpec, parse_spec

MARKER_RULE = Path(__file__).resolve().parents[2] / "signatures" / "test" / "lab_marker.yar"


def lab_marker() -> bytes:
    m = re.search(r'"(SVA-LAB-MARKER-[^"]+)"', MARKER_RULE.read_text())
    assert m, f"no marker string in {MARKER_RULE}"
    return m.group(1).encode()


def find_all(backend: IvshmemBackend, pattern: bytes) -> list[int]:
    rx = re.compile(re.escape(pattern))
    hits = []
    for region, view in backend.region_views():
        hits += [region.gpa + m.start() for m in rx.finditer(view)]
        view.release()
    return hits


# -- parsing --------------------------------------------------------------------------
def test_pci_address_resolves_to_bar2() -> None:
    spec = parse_spec("00:04.0?qmp=/run/sva/proxy/vm1.sock")
    assert spec == IvshmemSpec(str(SYSFS_PCI / "0000:00:04.0" / "resource2"), "/run/sva/proxy/vm1.sock", "0000:00:04.0")
    assert spec.qmp_tcp is None
    assert parse_spec("0000:0A:1f.3?qmp=/q").ram_path.endswith("/0000:0a:1f.3/resource2")


def test_path_and_tcp_qmp() -> None:
    spec = parse_spec("/sys/bus/pci/devices/0000:00:05.0/resource2?qmp=tcp:10.0.2.100:4444")
    assert spec.ram_path == "/sys/bus/pci/devices/0000:00:05.0/resource2"
    assert spec.pci_address is None
    assert spec.qmp_tcp == ("10.0.2.100", 4444)


@pytest.mark.parametrize(
    ("rest", "message"),
    [
        ("00:04.0", r"needs \?qmp="),
        ("00:04.0?qmp=", r"needs \?qmp="),
        ("?qmp=/q", "needs a PCI address"),
        ("00:04.0?qmp=/q&ram=1", "unknown parameter 'ram'"),
        ("00:04.0?qmp=/q&qmp=/r", "given twice"),
        ("00:04.0?qmp=tcp:host", "not tcp:HOST:PORT"),
        ("00:04.0?qmp=tcp:host:70000", "not tcp:HOST:PORT"),
        ("00:04.0?novalue", "cannot parse"),
        ("x" * 5000 + "?qmp=/q", "longer than"),
    ],
)
def test_bad_specs_name_the_problem(rest: str, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        parse_spec(rest)


def test_open_target_routes_the_scheme(tmp_path: Path) -> None:
    # A PCI address that does not exist here fails on the device, before any QMP is tried.
    with pytest.raises(TargetError, match=r"ivshmem:00:1f.7\?qmp=/nope: no PCI device 0000:00:1f.7"):
        open_target("ivshmem:00:1f.7?qmp=/nope")
    ram = tmp_path / "ram"
    ram.write_bytes(b"\0" * 4096)
    with pytest.raises(TargetError, match="QMP /nope: no such QMP socket"):
        open_target(f"ivshmem:{ram}?qmp=/nope")


def test_non_ivshmem_pci_device_refused() -> None:
    """The BAR of any other PCI device (a NIC, a disk) is refused by its ids."""
    other = next(
        (d for d in sorted(SYSFS_PCI.glob("*")) if (d / "vendor").read_text().strip() != "0x1af4"
         or (d / "device").read_text().strip() != "0x1110"),
        None,
    ) if SYSFS_PCI.is_dir() else None
    if other is None:
        pytest.skip("no PCI device on this machine to try")
    with pytest.raises(TargetError, match=r"not ivshmem \(0x1af4:0x1110\)"):
        open_target(f"ivshmem:{other.name}?qmp=/nope")


# -- a real guest ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def qmp_over_tcp(lab_guest) -> Iterator[str]:
    """The lab guest's QMP behind socat on 127.0.0.1, one QMP session per TCP connection."""
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed (scripts/setup.sh installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"UNIX-CONNECT:{lab_guest.qmp_path}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("socat did not listen within 5 s")
            time.sleep(0.05)
    try:
        yield f"tcp:127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=5)


@pytest.mark.lab
@pytest.mark.parametrize("via", ["unix", "tcp"])
def test_live_guest_through_the_bar_view(lab_guest, qmp_over_tcp: str, via: str) -> None:
    qmp = lab_guest.qmp_path if via == "unix" else qmp_over_tcp
    with open_target(f"ivshmem:{lab_guest.mem_path}?qmp={qmp}") as b:
        assert isinstance(b, IvshmemBackend)
        assert b.memory_size == lab_guest.mem_size
        regs = b.regs(0)
        assert regs.cr3 != 0 and regs.rip != 0
        marker = lab_marker()
        with b.frozen() as rec:
            hits = find_all(b, marker)
            assert hits, "the implant's marker is not in guest RAM as seen through the BAR view"
            # readinto copies from the mapping (a BAR has no read()); it must agree with the view.
            for gpa in hits[:5]:
                assert b.read(gpa, len(marker)) == marker
            # A read across the first region's end is split over regions or refused, never garbage.
            first = b.memory_map.regions[0]
            with open(lab_guest.mem_path, "rb") as f:
                f.seek(first.offset + first.size - 8)
                assert b.read(first.gpa + first.size - 8, 8) == f.read(8)
        assert rec.seconds is not None and rec.seconds > 0
        with pytest.raises(MemoryAccessError, match="not guest RAM"):
            b.read(b.memory_map.regions[-1].end, 16)


@pytest.mark.lab
def test_bar_is_mapped_read_only(lab_guest) -> None:
    with open_target(f"ivshmem:{lab_guest.mem_path}?qmp={lab_guest.qmp_path}") as b:
        maps = Path("/proc/self/maps").read_text().splitlines()
        ours = [line for line in maps if line.endswith(" " + lab_guest.mem_path)]
        assert ours, "the RAM file is not mapped"
        assert all(line.split()[1] == "r--s" for line in ours), ours
        fd_flags = Path(f"/proc/self/fdinfo/{b._fd}").read_text()
        flags = int(next(x for x in fd_flags.splitlines() if x.startswith("flags:")).split()[1], 8)
        assert flags & 0o3 == 0, "descriptor not O_RDONLY"
        view = b.view(b.memory_map.regions[0].gpa, 4096)
        assert view.readonly
        with pytest.raises(TypeError):
            view[0] = 1
        view.release()
