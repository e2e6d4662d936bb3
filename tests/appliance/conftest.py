"""Fixtures for the appliance tests (QMP proxy, units, firewall, sysctl, image)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A temporary directory with a short path: unix socket paths must fit in 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="sva-ap-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def wait_for_path(path: Path, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


@pytest.fixture
def bare_qemu(short_dir: Path) -> Iterator[Callable[[Path], subprocess.Popen[bytes]]]:
    """Start real, minimal QEMUs (`-machine none`: no guest, just a QMP monitor, ~50 ms to
    start) serving QMP at a given path; all are killed at the end of the test."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/setup.sh installs it)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(sock: Path) -> subprocess.Popen[bytes]:
        sock.parent.mkdir(parents=True, exist_ok=True)
        p = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{sock},server=on,wait=off"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(p)
        wait_for_path(sock, proc=p)
        return p

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(5)
