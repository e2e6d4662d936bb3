"""Detection-cycle benchmark (prints figures, asserts nothing).

1. One full `sva scan` cycle on the infected lab guest with the default detectors: the
   first cycle (symbols cached, full YARA scan) and the steady state (incremental), with
   the guest-pause time and each fact's time.
2. sva's per-process YARA (the `yara_matches` fact: scan + attribution to processes) vs
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

from sva import lab
from sva.engine.scan_cli import build_engine
from sva.vmi import open_target
from sva.vmi.snapshot import write_raw

SIGNATURES = Path(__file__).resolve().parents[1] / "signatures"


def fact_seconds(report: object, name: str) -> float:
    return next((f.seconds for f in report.facts if f.name == name), float("nan"))  # type: ignore[attr-defined]


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
            opts = argparse.Namespace(target=target, detectors=None, rules=None, isf_dir=[], jsonl=None)
            engine = build_engine(opts, backend, [])
            first = engine.run_cycle()
            steady = [engine.run_cycle() for _ in range(args.cycles)]
            engine.close()
            print(f"first sva scan cycle: {first.seconds:.2f} s (guest paused {first.pause_seconds or 0:.2f} s), "
                  f"{len(first.new)} alerts; yara_matches {fact_seconds(first, 'yara_matches'):.2f} s")
            med = statistics.median(r.seconds for r in steady)
            pause = statistics.median((r.pause_seconds or 0) for r in steady)
            yara = statistics.median(fact_seconds(r, "yara_matches") for r in steady)
            print(f"steady sva scan cycle (median of {args.cycles}): {med:.2f} s (guest paused {pause:.2f} s); "
                  f"yara_matches {yara:.2f} s")
            for f in steady[-1].facts:
                print(f"   fact {f.name:<22} {f.seconds * 1000:8.1f} ms")
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
        rules.write_text("\n".join(p.read_text() for p in sorted(SIGNATURES.glob("*/*.yar"))))
        vol = shutil.which("vol") or os.path.join(os.path.dirname(sys.executable), "vol")
        cmd = [vol, "-q", "-s", str(work / "symbols"), "-f", str(snap), "linux.vmayarascan", "--yara-file", str(rules)]
        t = time.perf_counter()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            status = "ok" if res.returncode == 0 else f"exit {res.returncode}: {res.stderr.strip()[-200:]}"
        except subprocess.TimeoutExpired:
            status = "timed out after 1800 s"
        base = time.perf_counter() - t
        first_yara = fact_seconds(first, "yara_matches")
        print(f"baseline `vol linux.vmayarascan`, same rules and ISF: {base:.1f} s ({status}); "
              f"sva per-process YARA is {base / first_yara:.0f}x faster on a full cycle, "
              f"{base / yara:.0f}x in steady state (goal >= 20x)")
    finally:
        lab.down(name)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
