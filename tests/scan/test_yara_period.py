"""YaraMemoryScan.min_interval: the daemon's `yara_period`, with the built-in rules on a
synthetic RAM file."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from sva.guest.memscan import YaraMemoryScan
from sva.testing import synthetic_backend


def test_scans_again_only_after_min_interval(tmp_path: Path) -> None:
    backend = synthetic_backend(tmp_path, [(0, 1 << 20)], seed=3)
    other = synthetic_backend(tmp_path, [(0, 1 << 20)], seed=4, name="other.bin")
    try:
        gc = SimpleNamespace(backend=backend)  # scan() reads only the context's backend
        every = YaraMemoryScan(min_interval=0.0)
        assert every.scan(gc) is not every.scan(gc)  # type: ignore[arg-type]
        spaced = YaraMemoryScan(min_interval=0.5)
        first = spaced.scan(gc)  # type: ignore[arg-type]
        assert spaced.scan(gc) is first  # type: ignore[arg-type]
        assert spaced.scan(SimpleNamespace(backend=other)) is not first  # type: ignore[arg-type]  # another guest
        again = spaced.scan(gc)  # type: ignore[arg-type]
        assert again is not first  # the backend changed in between: scanned
        time.sleep(0.6)
        assert spaced.scan(gc) is not again  # type: ignore[arg-type]
    finally:
        backend.close()
        other.close()
