"""Guest-memory YARA benchmark (not a test: prints figures, asserts nothing).

1. Full scan of guest RAM through sva (`PhysicalScanner.scan`: zero-copy views, 16 MiB
   chunks with overlap, match objects built) vs the baseline, yara-python's
   `rules.match(data=...)` on a bytes copy of the same RAM in one call per region, same
   rules (goal: sva throughput >= 0.9x the baseline). The guest is frozen meanwhile, so
   both see the same bytes.
2. Steady-state incremental rescans (`IncrementalScanner.cycle` on the running guest, one
   second apart) vs a full scan (goal: >= 10x faster), with pages changed and rescanned.
3. For context: full-scan throughput by chunk size.

Rule sets: the built-in bundle (signatures/), and the built-in bundle plus elastic-linux
and signature-base (4 193 rules) when ../shared/testdata/yara is present.

Usage: python bench/bench_yara.py [--target qemu:SOCK|lab:NAME] [--rounds 3] [--cycles 8]
Without --target it boots an infected lab guest of its own and shuts it down after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from sva.scan import CompiledRuleSet, IncrementalScanner, PhysicalScanner, ScanConfig, signatures_dir
from sva.vmi import open_target
from sva.vmi.base import MappedBackend

MiB = 1 << 20
TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "yara"


def baseline_seconds(rules: CompiledRuleSet, ram: list[bytes]) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for data in ram:
        n += len(rules.rules.match(data=data, timeout=600))
    return time.perf_counter() - t0, n


def sva_seconds(rules: CompiledRuleSet, b: MappedBackend, chunk: int = 16 * MiB) -> tuple[float, int]:
    t0 = time.perf_counter()
    report = PhysicalScanner(rules, ScanConfig(chunk_size=chunk, timeout_s=600)).scan(b)
    return time.perf_counter() - t0, len(report.rules_matched)


def full_scan_rounds(name: str, rules: CompiledRuleSet, b: MappedBackend, rounds: int) -> float:
    mib = b.memory_size / MiB
    with b.frozen():
        ram = [b.read(r.gpa, r.size) for r in b.memory_map]
        base = ours = float("inf")
        base_hits = our_hits = 0
        for _ in range(rounds):  # alternate, keep each side's best: noise hits both alike
            t, base_hits = baseline_seconds(rules, ram)
            base = min(base, t)
            t, our_hits = sva_seconds(rules, b)
            ours = min(ours, t)
    print(f"[{name}] {rules.rule_count} rules")
    print(f"  full scan, yara-python match(data=bytes) (baseline): {base:6.2f} s  {mib / base:7.1f} MiB/s  "
          f"{base_hits} rules matched")
    print(f"  full scan, sva PhysicalScanner (views, 16 MiB):      {ours:6.2f} s  {mib / ours:7.1f} MiB/s  "
          f"{our_hits} rules matched   ratio {base / ours:.2f}x (goal >= 0.9x)")
    return ours


def incremental_rounds(name: str, rules: CompiledRuleSet, b: MappedBackend, full: float, cycles: int) -> None:
    inc = IncrementalScanner(rules)
    first = inc.cycle(b)
    times, hashes, changed, rescanned, calls = [], [], [], [], []
    for _ in range(cycles):
        time.sleep(1.0)
        r = inc.cycle(b)
        if r.full:
            continue
        times.append(r.seconds)
        hashes.append(r.extra.get("hash_seconds", 0.0))
        changed.append(r.pages_changed or 0)
        rescanned.append(r.pages_rescanned or 0)
        calls.append(r.calls)
    if not times:
        print("  incremental: every cycle was a full scan (the guest changes too much)")
        return
    med = statistics.median(times)
    print(f"  incremental, first cycle (full): {first.seconds:6.2f} s; steady state over {len(times)} cycles "
          f"1 s apart: median {med * 1000:6.1f} ms (hashing {statistics.median(hashes) * 1000:.1f} ms), "
          f"{statistics.median(changed):.0f} pages changed, {statistics.median(rescanned):.0f} of "
          f"{first.pages_total} rescanned in {statistics.median(calls):.0f} calls")
    print(f"  incremental vs full scan: {full / med:6.1f}x faster (goal >= 10x)")


def chunk_table(rules: CompiledRuleSet, b: MappedBackend) -> None:
    mib = b.memory_size / MiB
    parts = []
    with b.frozen():
        for chunk in (1, 4, 16, 64):
            t, _ = sva_seconds(rules, b, chunk * MiB)
            parts.append(f"{chunk} MiB: {mib / t:.0f} MiB/s")
    print("  by chunk size: " + ", ".join(parts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=8)
    args = ap.parse_args()

    sets: list[tuple[str, CompiledRuleSet]] = [("built-in", CompiledRuleSet.default())]
    public = [TESTDATA / "elastic-linux", TESTDATA / "signature-base"]
    if all(p.is_dir() for p in public):
        sets.append(("built-in + elastic-linux + signature-base", CompiledRuleSet.load(signatures_dir(), *public)))
    else:
        print(f"(public rule sets not found at {TESTDATA}: built-in rules only)")

    lab_name = None
    target = args.target
    if target is None:
        from sva import lab

        lab_name = f"benchy{os.getpid()}"
        guest = lab.up(lab_name, scenario="infected", mem="256M")
        target = f"lab:{guest.name}"
    try:
        with open_target(target) as b:
            print(f"target {target}: {b.memory_size / MiB:.0f} MiB guest RAM, {len(b.memory_map)} regions")
            for name, rules in sets:
                full = full_scan_rounds(name, rules, b, args.rounds)
                incremental_rounds(name, rules, b, full, args.cycles)
                chunk_table(rules, b)
    finally:
        if lab_name:
            from sva import lab

            lab.down(lab_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
