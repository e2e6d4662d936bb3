"""Shared fixtures: one real lab guest (QEMU, infected scenario) for the whole test session.

Labs started by tests live in a private runtime dir (SVA_RUNTIME_DIR, set here unless the
caller set it), so they never mix with a developer's own labs; the kernel, initramfs and
KVM-probe caches stay in the default cache dir and are shared between runs. The dir's name
carries the pytest pid: a later session stops the labs of a session that was killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from sva import lab
from sva.lab import LabGuest

_RUNTIME_PREFIX = "sva-rt-"
_OWN_RUNTIME_DIR: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _OWN_RUNTIME_DIR
    _reap_runtime_dirs_of_dead_sessions()
    if not os.environ.get("SVA_RUNTIME_DIR"):
        # Short on purpose: QEMU's unix socket paths inside it must fit in 107 bytes.
        _OWN_RUNTIME_DIR = tempfile.mkdtemp(prefix=f"{_RUNTIME_PREFIX}{os.getpid()}-")
        os.environ["SVA_RUNTIME_DIR"] = _OWN_RUNTIME_DIR
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # `timeout` and CI stop pytest with SIGTERM, which would skip all teardown; as a
    # KeyboardInterrupt pytest still unconfigures, and that stops our labs.
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_RUNTIME_DIR is not None:
        _stop_labs_in(Path(_OWN_RUNTIME_DIR))


def _stop_labs_in(runtime_dir: Path) -> None:
    """Stop every lab recorded under `runtime_dir` (lab.down checks each pid is its QEMU)."""
    saved = os.environ.get("SVA_RUNTIME_DIR")
    os.environ["SVA_RUNTIME_DIR"] = str(runtime_dir)
    try:
        for guest in lab.list_guests(include_stopped=True):
            try:
                lab.down(guest.name)
            except Exception as e:  # noqa: BLE001 - best effort at exit; report and go on
                print(f"conftest: could not stop lab {guest.name} in {runtime_dir}: {e}")
    finally:
        if saved is None:
            os.environ.pop("SVA_RUNTIME_DIR", None)
        else:
            os.environ["SVA_RUNTIME_DIR"] = saved
    shutil.rmtree(runtime_dir, ignore_errors=True)


def _reap_runtime_dirs_of_dead_sessions() -> None:
    for d in Path(tempfile.gettempdir()).glob(f"{_RUNTIME_PREFIX}*-*"):
        owner = d.name[len(_RUNTIME_PREFIX) :].split("-")[0]
        if owner.isdigit() and not _alive(int(owner)) and d.is_dir():
            _stop_labs_in(d)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def lab_guest() -> Iterator[LabGuest]:
    """A booted lab guest running the infected scenario, shared by the session. Read-only use:
    tests may exec commands in it, but must not stop it or kill its scenario processes."""
    name = f"t{os.getpid()}"
    guest = lab.up(name, scenario="infected")
    try:
        yield guest
    finally:
        lab.down(name)
