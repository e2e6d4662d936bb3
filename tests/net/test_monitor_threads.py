"""Live monitoring: the detectors run in their own thread, so a slow detection cycle never
holds up the reading of frames (a capture ring would overflow behind it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from sva.engine.rules import RuleSet
from sva.engine.testing import FunctionDetector
from sva.net.capture import CaptureStats, RawFrame
from sva.net.monitor import Limits, NetMonitor


class PacedFrames:
    """A capture source that delivers real frames in small batches a few ms apart, as a
    mirror port does (implements sva.net.capture.CaptureSource)."""

    name = "paced:udp"

    def __init__(self, frames: list[bytes], per_batch: int, gap_s: float) -> None:
        self.frames, self.per_batch, self.gap_s = frames, per_batch, gap_s
        self.delivered = 0
        self.t0 = time.monotonic()

    def batches(self, stop: threading.Event | None = None, timeout: float = 0.2) -> Iterator[list[RawFrame]]:
        for i in range(0, len(self.frames), self.per_batch):
            if stop is not None and stop.is_set():
                return
            time.sleep(self.gap_s)
            batch = [(time.time(), f, len(f), "p0") for f in self.frames[i : i + self.per_batch]]
            self.delivered += len(batch)
            yield batch

    def stats(self) -> CaptureStats:
        n = self.delivered
        return CaptureStats(self.name, n, n * 60, 0, 0, 0, 0, time.monotonic() - self.t0, mode="stream")

    def close(self) -> None:
        pass


def test_a_slow_detection_cycle_does_not_hold_up_reading(tmp_path: Path) -> None:
    frames = [bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.9.0.1", dst="10.9.0.2")
                    / UDP(sport=40000 + i, dport=53) / Raw(b"x" * 16)) for i in range(200)]  # fmt: skip
    seen: list[tuple[str, int]] = []

    def slow(facts: Any, rules: Any) -> list[Any]:
        seen.append((threading.current_thread().name, len(facts["net_window"].flows)))
        time.sleep(0.25)
        return []

    det = FunctionDetector("slow_net", slow, frozenset({"net_window"}))
    source = PacedFrames(frames, per_batch=5, gap_s=0.01)  # 40 batches over ~0.4 s
    mon = NetMonitor(source, rules=RuleSet(), detectors=[det], live=True, limits=Limits(interval=0.02, horizon=60.0))
    reader_batches: list[float] = []
    summary = mon.run(on_idle=lambda: reader_batches.append(time.monotonic()))
    assert source.delivered == 200 and len(reader_batches) == 40
    # While one cycle slept, the reader went on and newer windows replaced waiting ones.
    assert mon.cycles_skipped > 0
    live = [n for name, n in seen if name.startswith("sva-net-detect")]
    assert live and summary.cycles == len(seen)
    # The last cycle (after the source ended, in the caller's thread) sees every flow.
    assert seen[-1] == (threading.current_thread().name, 200)
