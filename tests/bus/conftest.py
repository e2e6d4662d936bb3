"""Fixtures for bus tests: real keys, real publishers (in-process or a child process), real sockets.

Everything binds loopback with random ports (`tcp://127.0.0.1:*`) or ipc in tmp_path.
Waits are bounded loops with generous limits; nothing asserts on how fast anything is.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sva.bus import BusPublisher, BusSubscriber, ClientSecurity, Event
from sva.bus.testing import local_config, make_keys

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def keys(tmp_path: Path) -> ClientSecurity:
    """A key directory at tmp_path/keys with server + authorized client; the client's settings."""
    return make_keys(tmp_path / "keys")


@pytest.fixture
def publisher(tmp_path: Path, keys: ClientSecurity) -> Iterator[Callable[..., BusPublisher]]:
    """Factory: an in-process BusPublisher on loopback (random ports), journal in tmp_path."""
    made: list[BusPublisher] = []

    def start(**kw: object) -> BusPublisher:
        bus = BusPublisher(local_config(tmp_path, **kw))  # type: ignore[arg-type]
        made.append(bus)
        return bus

    yield start
    for bus in made:
        bus.close()


@pytest.fixture
def subscriber() -> Iterator[Callable[..., BusSubscriber]]:
    made: list[BusSubscriber] = []

    def start(*args: object, **kw: object) -> BusSubscriber:
        sub = BusSubscriber(*args, **kw)  # type: ignore[arg-type]
        made.append(sub)
        return sub

    yield start
    for sub in made:
        sub.close()


def collect(sub: BusSubscriber, n: int, limit_s: float = 60.0, on_event: Callable[[Event], None] | None = None
            ) -> list[Event]:
    """Receive until n events arrived or limit_s passed (a safety net, not a speed check)."""
    out: list[Event] = []
    deadline = time.monotonic() + limit_s
    while len(out) < n and time.monotonic() < deadline:
        ev = sub.recv(timeout=0.5)
        if ev is not None:
            out.append(ev)
            if on_event is not None:
                on_event(ev)
    return out


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@dataclass
class ChildPublisher:
    """`python -m sva.bus.testing` in a child process."""

    proc: subprocess.Popen[str]
    endpoint: str = ""
    replay_endpoint: str = ""
    first_seq: int = 0
    lines: list[str] = field(default_factory=list)

    def read_line(self, prefix: str, limit_s: float = 60.0) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if r:
                line = self.proc.stdout.readline()
                if not line:
                    break
                self.lines.append(line.strip())
                if line.startswith(prefix):
                    return line.strip()
            elif self.proc.poll() is not None:
                break
        err = self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""
        raise AssertionError(f"child publisher never printed {prefix!r}; output {self.lines}; stderr {err}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def child_publisher(tmp_path: Path) -> Iterator[Callable[..., ChildPublisher]]:
    children: list[ChildPublisher] = []

    def start(endpoint: str, replay_endpoint: str, *extra: str, journal: Path | None = None) -> ChildPublisher:
        cmd = [sys.executable, "-m", "sva.bus.testing", "--journal", str(journal or tmp_path / "journal"),
               "--endpoint", endpoint, "--replay-endpoint", replay_endpoint, "--keys-dir", str(tmp_path / "keys"),
               *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                                cwd=REPO)
        child = ChildPublisher(proc)
        children.append(child)
        _, ep, rep, first = child.read_line("ready").split()
        child.endpoint, child.replay_endpoint, child.first_seq = ep, rep, int(first)
        return child

    yield start
    for c in children:
        c.kill()


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Factory: a small tmpfs of the given size (e.g. "512k") for full-disk tests; skips
    when it cannot be mounted here. Unmounted at teardown."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
