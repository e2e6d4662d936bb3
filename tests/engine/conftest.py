"""Engine test fixtures: real backends over generated files, real rules, real sinks."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sva.engine.model import VmIdentity
from sva.engine.sinks import MemorySink
from sva.errors import TargetError
from sva.testing import synthetic_backend
from sva.vmi.base import Capabilities
from sva.vmi.formats.common import SnapshotBackend

VM = VmIdentity(name="web01", target="snapshot:web01.raw", boot_id="boot-1")


class PausableSnapshot(SnapshotBackend):
    """A snapshot that behaves like a pausable guest: pause/resume flip `paused` and are
    logged, so tests can see what ran inside the freeze. `fail_pause` makes pause fail the
    way a vanished QEMU does."""

    def __init__(self, base: SnapshotBackend, fail_pause: bool = False) -> None:
        super().__init__(base.target, base.path, base.memory_map)
        self.capabilities = Capabilities(live=True, pause=True, registers=False)
        self.paused = False
        self.log: list[str] = []
        self.fail_pause = fail_pause

    def pause(self) -> None:
        if self.fail_pause:
            raise TargetError(self.target, "QMP socket went away")
        self.paused = True
        self.log.append("pause")

    def resume(self) -> None:
        self.paused = False
        self.log.append("resume")


@pytest.fixture
def snapshot(tmp_path: Path) -> Iterator[SnapshotBackend]:
    b = synthetic_backend(tmp_path, [(0, 1 << 20), (1 << 32, 1 << 16)], seed=7)
    yield b
    b.close()


@pytest.fixture
def pausable(snapshot: SnapshotBackend) -> Iterator[PausableSnapshot]:
    b = PausableSnapshot(snapshot)
    yield b
    b.close()


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


class Clock:
    """A settable clock: `clock()` returns now; tests advance it between cycles."""

    def __init__(self, start: float = 1_764_212_400.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 10.0) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def uid_factory() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"uid-{next(counter)}"
