"""Detection-cycle benchmark (prints figures, asserts nothing).

1. One full `sva scan` cycle on the infected lab guest with the default detectors: the
   first cycle (symbols cached, full YARA scan) and the steady state (incremental), with
   the time the guest stood paused in each cycle and each fact's time. Run twice, side by
   side: with the RAM sweeps (task structs, module carving) inside the freeze, as before
   they became live prerequisites (`Engine(live_prefetch=False)`); swept with the guest
   running and re-checked in a classic freeze (`snapshot_attempts=0`); and as `sva scan`
   runs now: the re-checks read a copy of their pages taken in a short pause, and keep
   last cycle's value when their pages did not change (sva.vmi.pagesnap). Goal: a short
   freeze.
2. sva's per-process YARA (the `yara_scan` and `yara_matches` facts: scan, re-check and
   attribution to processes) vs
   volatility3's `linux.vmayarascan` on a snapshot of the same guest with the same rules
   and the same symbol table (goal: sva >= 20x faster).

Usage: python bench/bench_scan.py [--cycles 5]   (boots its own lab guest)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sva import lab
from sva.engine.scan_cli import build_engine
from sva.scan.rules import NON_MEMORY_SETS
from sva.vmi import open_target
from sva.vmi.snapshot import write_raw

SIGNATURES = Path(__file__).resolve().parents[1] / "signatures"


def fact_seconds(report: Any, name: str) -> float:
    return next((f.seconds for f in report.facts if f.name == name), float("nan"))


def yara_seconds(report: Any) -> float:
    """sva's per-process YARA: the scan (live, `yara_scan`) plus re-check and attribution
    (`yara_matches`, frozen). Each fact's time is its own (a fact's record does not
    include what it read from facts computed before it)."""
    return fact_seconds(report, "yara_scan") + fact_seconds(report, "yara_matches")


def run_cycles(target: str, backend: Any, cycles: int, **engine_options: Any) -> tuple[Any, list[Any]]:
    opts = argparse.Namespace(target=target, detectors=None, rules=None, isf_dir=[], jsonl=None, signatures=None)
    engine = build_engine(opts, backend, [], **engine_options)
    try:
        first = engine.run_cycle()
        steady = [engine.run_cycle() for _ in range(cycles)]
    finally:
        engine.close()
    return first, steady


def describe(label: str, first: Any, steady: list[Any]) -> tuple[float, float]:
    pauses = [r.pause_seconds or 0.0 for r in steady]
    pause = statistics.median(pauses)
    print(f"{label}:")
    print(f"  first cycle  {first.seconds:6.2f} s, guest paused {first.pause_seconds or 0:.3f} s, "
          f"{len(first.new)} alerts; per-process YARA {yara_seconds(first):.2f} s")  # fmt: skip
    print(f"  steady cycle {statistics.median(r.seconds for r in steady):6.2f} s (median of {len(steady)}), "
          f"guest paused {pause:.3f} s (per cycle: {', '.join(f'{p:.3f}' for p in pauses)}); "
          f"per-process YARA {statistics.median(yara_seconds(r) for r in steady):.2f} s")  # fmt: skip
    frozen = sorted((f for f in steady[-1].facts), key=lambda f: (not f.in_freeze, f.name))
    for f in frozen:
        kind = ("frozen" if f.in_freeze else "live") + (", last value kept" if f.reused else "")
        print(f"     fact {f.name:<22} {f.seconds * 1000:8.1f} ms  {kind}")
    return first.pause_seconds or 0.0, pause


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=5)
    args = ap.parse_args()
    name = f"bscan{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="sva-bench-scan-"))
    lab.up(name, scenario="infected")
    try:
        target = f"lab:{name}"
        with open_target(target) as backend:
            before = describe("sweeps inside the freeze (before)", *run_cycles(
                target, backend, args.cycles, live_prefetch=False, snapshot_attempts=0))
            classic = describe("sweeps live, re-checked in a classic freeze", *run_cycles(
                target, backend, args.cycles, snapshot_attempts=0))
            first, steady = run_cycles(target, backend, args.cycles)
            after = describe("sweeps live, re-checks on a short-pause copy, unchanged facts kept (sva scan now)",
                             first, steady)  # fmt: skip
            print(f"guest pause per cycle, before -> after: first {before[0]:.3f} -> {after[0]:.3f} s, "
                  f"steady {before[1]:.3f} -> {after[1]:.3f} s ({before[1] / max(after[1], 1e-9):.1f}x shorter); "
                  f"classic freeze -> short-pause copy, steady: {classic[1] * 1000:.1f} -> {after[1] * 1000:.1f} ms "
                  f"({classic[1] / max(after[1], 1e-9):.1f}x shorter)")  # fmt: skip
            yara = statistics.median(yara_seconds(r) for r in steady)
            snap = work / "guest.raw"
            with backend.frozen():
                write_raw(backend, str(snap))
        from sva.symbols.sources import symbols_for_backend

        with open_target(f"file:{snap}") as b:
            table = symbols_for_backend(b)
        symdir = work / "symbols" / "linux"
        symdir.mkdir(parents=True)
        shutil.copy(table.path, symdir / table.path.name)
        rules = work / "rules.yar"
        # the memory rule sets sva scans with (CompiledRuleSet.default(): not network/)
        rules.write_text("\n".join(
            p.read_text() for p in sorted(SIGNATURES.glob("*/*.yar")) if p.parent.name not in NON_MEMORY_SETS
        ))  # fmt: skip
        vol = shutil.which("vol") or os.path.join(os.path.dirname(sys.executable), "vol")
        cmd = [vol, "-q", "-s", str(work / "symbols"), "-f", str(snap), "linux.vmayarascan", "--yara-file", str(rules)]
        t = time.perf_counter()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            status = "ok" if res.returncode == 0 else f"exit {res.returncode}: {res.stderr.strip()[-200:]}"
        except subprocess.TimeoutExpired:
            status = "timed out after 1800 s"
        base = time.perf_counter() - t
        first_yara = yara_seconds(first)
        print(f"baseline `vol linux.vmayarascan`, same rules and ISF: {base:.1f} s ({status}); "
              f"sva per-process YARA ({first_yara:.2f} s full, {yara:.2f} s steady) is {base / first_yara:.0f}x "
              f"faster on a full cycle, {base / yara:.0f}x in steady state (goal >= 20x)")  # fmt: skip
    finally:
        lab.down(name)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
