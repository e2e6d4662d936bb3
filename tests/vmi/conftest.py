"""Throwaway QEMU processes for VMI-layer tests that need a VM but not a booted guest.

`qemu -S` creates the machine (RAM, memory map, vCPUs) without running it, in well under
a second: enough to test memory-map discovery, QMP errors and dying VMs for real.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sva.errors import QmpError
from sva.vmi.qmp import QmpClient


@dataclass
class BareVm:
    proc: subprocess.Popen[bytes]
    qmp_path: str
    mem_path: str | None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


def _accepts(path: str) -> bool:
    """The monitor answers a whole QMP handshake (the socket file appears at bind(),
    before QEMU listens and serves)."""
    if not os.path.exists(path):
        return False
    try:
        QmpClient(path, timeout=2.0).close()
        return True
    except QmpError:
        return False


@pytest.fixture
def bare_vm(tmp_path: Path) -> Iterator[Callable[..., BareVm]]:
    """Factory: start `qemu-system-x86_64 -S` with RAM laid out as asked."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/setup.sh installs it)")
    vms: list[BareVm] = []

    def start(mem: str = "64M", ram: str = "shared", smp: int = 1) -> BareVm:
        n = len(vms)
        qmp = str(tmp_path / f"qmp{n}.sock")
        mem_path = str(tmp_path / f"ram{n}")
        args = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", mem, "-smp", str(smp),
                "-display", "none", "-nodefaults", "-S",
                "-qmp", f"unix:{qmp},server=on,wait=off"]
        if ram in ("shared", "private"):
            share = "on" if ram == "shared" else "off"
            args[2] = "q35,accel=tcg,memory-backend=ram0"
            args += ["-object", f"memory-backend-file,id=ram0,size={mem},mem-path={mem_path},share={share}"]
        elif ram == "dir":
            args[2] = "q35,accel=tcg,memory-backend=ram0"
            args += ["-object", f"memory-backend-file,id=ram0,size={mem},mem-path={tmp_path},share=on"]
            mem_path = None  # QEMU makes an anonymous file in that directory
        else:
            mem_path = None
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        # Ready means: the monitor accepts a connection (the socket file appears at bind(),
        # before listen()) and the RAM file exists.
        while not (_accepts(qmp) and (mem_path is None or os.path.exists(mem_path))):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()  # before reading stderr, which blocks while QEMU lives
                err = proc.communicate(timeout=10)[1].decode(errors="replace")
                pytest.fail(f"bare QEMU did not start: {err}")
            time.sleep(0.02)
        vm = BareVm(proc, qmp, mem_path)
        vms.append(vm)
        return vm

    yield start
    for vm in vms:
        vm.kill()
