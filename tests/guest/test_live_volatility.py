"""volatility3 over the live lab guest with symbols built from its own RAM: `sva ps`,
`sva modules`, `sva vol` against the guest's own view of itself."""

from __future__ import annotations

import pytest

from sva import lab
from sva.guest.context import GuestContext
from sva.guest.processes import list_modules, list_processes
from sva.vmi import open_target

pytestmark = pytest.mark.lab


def test_sva_ps_equals_the_guests_own_ps(lab_guest, ps_comparison) -> None:
    ours = ps_comparison(lab_guest.name).processes
    xmrig = [p for p in ours.values() if p["comm"] == "xmrig"]
    assert xmrig and "stratum+tcp://pool.invalid:3333" in xmrig[0]["argv"] and xmrig[0]["uid"] == 0


def test_context_is_reused_across_cycles(lab_guest) -> None:
    with open_target(f"lab:{lab_guest.name}") as b:
        gc = GuestContext.attach(b)
        first = None
        for _ in range(3):
            with b.frozen():
                gc.begin_cycle()
                procs = list_processes(gc, details=False)
            pids = {p.pid for p in procs}
            assert {1, 2} <= pids
            first = first or pids
        mods = list_modules(gc)
    guest_modules = lab.exec_in(lab_guest.name, "cut -d' ' -f1 /proc/modules").output.split()
    assert sorted(m.name for m in mods) == sorted(guest_modules)


@pytest.mark.parametrize(
    "plugin, expect",
    [
        ("linux.pslist", "xmrig"),
        ("linux.psscan", "xmrig"),
        ("linux.pidhashtable", "xmrig"),
        ("linux.lsmod", "virtio_net"),
        ("linux.check_syscall", "__x64_sys_read"),
        ("linux.check_idt", "__kernel__"),
        ("linux.malfind", "PID"),
        ("linux.proc.Maps", "/bin/busybox"),
        ("linux.elfs", "/bin/busybox"),
    ],
)
def test_volatility_plugins_through_sva_vol(lab_guest, sva_cli, plugin: str, expect: str) -> None:
    res = sva_cli("vol", "-q", f"lab:{lab_guest.name}", plugin)
    assert res.returncode == 0, res.stderr[-2000:]
    assert expect in res.stdout, res.stdout[-2000:]


def test_sva_vol_bad_plugin_and_bad_target(lab_guest, sva_cli, tmp_path) -> None:
    res = sva_cli("vol", "-q", f"lab:{lab_guest.name}", "linux.no_such_plugin")
    assert res.returncode == 2 and "no volatility3 plugin" in res.stderr and "Traceback" not in res.stderr
    junk = tmp_path / "junk.raw"
    junk.write_bytes(b"\0" * (4 << 20))
    res = sva_cli("ps", "-q", f"raw:{junk}")
    assert res.returncode == 2 and "Traceback" not in res.stderr and str(junk) in res.stderr, res.stderr
