"""Signature update benchmark (not a test: prints figures; exit status 1 only if scanning
ever ran without rules or failed during the swaps).

1. The whole update pipeline for a 5 000-rule bundle — verify the Ed25519 signature and
   every file hash, unpack to staging, compile with the public externals, time the rules
   on 2 MiB of sample memory, canary (clean must not match, marker must), rename into
   place — median of several installs (each a new version), by stage. Goal: <= 5 s.
   Baseline beside it: a plain `yara.compile` of the same rule files, the least any
   updater pays (no verification, no timing, no canary).
2. The same for a realistic bundle (the built-in rules plus elastic-linux and
   signature-base from ../shared/testdata/yara, ~4 200 rules) when that data is present.
3. Scanning during the swaps: two threads scan 1 MiB of sample memory in a loop with the
   rules callable — one primed by the updater in the same process (as in the daemon),
   one following the store's `active` link on its own (as a separate `sva watch` would)
   — while bundles are installed one after another. Counts cycles, cycles that had no
   rules (must be 0), failed cycles (must be 0) and the versions each thread saw.

Usage: python bench/bench_sigs.py [--rules 5000] [--rounds 3] [--swaps 6]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yara

from sva.scan.rules import DEFAULT_EXTERNALS
from sva.scan.sample import synthetic_memory
from sva.sigs.active import ActiveRules
from sva.sigs.config import SigsConfig
from sva.sigs.keys import generate, load_secret
from sva.sigs.pack import pack
from sva.sigs.pipeline import Outcome, Refresher
from sva.sigs.testing import generate_rules, write_source

GOAL_S = 5.0
TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "yara"


def build_bundles(src: Path, key_file: Path, out_dir: Path, versions: range) -> list[Path]:
    key = load_secret(key_file)
    out = []
    for v in versions:
        path = out_dir / f"bench-{v}.tar.gz"
        pack(src, key, path, name="bench", version=v, check=False)  # the installs check them
        out.append(path)
    return out


def plain_compile_seconds(src: Path) -> float:
    files = sorted(p for p in src.rglob("*") if p.suffix in (".yar", ".yara") and "network" not in p.parts)
    groups: dict[str, list[str]] = {}
    for f in files:
        ns = f.relative_to(src).parts[0] if len(f.relative_to(src).parts) > 1 else "bench"
        groups.setdefault(ns, []).append(f'include "{f}"\n')
    t0 = time.perf_counter()
    yara.compile(sources={ns: "".join(inc) for ns, inc in groups.items()}, externals=dict(DEFAULT_EXTERNALS))
    return time.perf_counter() - t0


def pipeline_rounds(label: str, src: Path, key_file: Path, pub: Path, work: Path, rounds: int) -> None:
    bundles = build_bundles(src, key_file, work / f"{label}-bundles", range(1, rounds + 1))
    ref = Refresher(SigsConfig(state_dir=work / f"{label}-store", trusted_keys=(pub,)))
    ref.sample  # noqa: B018 - make the sample memory before timing (it is made once per refresher)
    totals, stages = [], {"verify": [], "compile_time_canary": [], "swap": []}
    rules = 0
    for b in bundles:
        t0 = time.perf_counter()
        r = ref.install_bytes(b.read_bytes(), str(b))
        total = time.perf_counter() - t0
        if r.outcome is not Outcome.ACTIVATED:
            print(f"{label}: install refused: {r.message}")
            return
        totals.append(total)
        for k in stages:
            stages[k].append(r.seconds[k])
        rules = ref.store.info().counts["memory_rules"]
    base = min(plain_compile_seconds(src) for _ in range(3))
    med = statistics.median(totals)
    size = bundles[-1].stat().st_size
    print(f"\n[{label}] {rules} memory rules, bundle {size / 1024:.0f} KiB, {rounds} installs")
    print(f"  verify + unpack + compile + time + canary + swap: median {med:.2f} s "
          f"(min {min(totals):.2f}, max {max(totals):.2f})   goal <= {GOAL_S:.0f} s: "
          f"{'MET' if med <= GOAL_S else 'NOT MET'} ({med / GOAL_S:.2f}x of the goal)")
    print("  by stage (median): " + ", ".join(f"{k} {statistics.median(v):.3f} s" for k, v in stages.items()))
    print(f"  baseline, plain yara.compile of the same files: {base:.2f} s  -> pipeline = {med / base:.1f}x the baseline")


def scanning_during_swaps(src: Path, key_file: Path, pub: Path, work: Path, swaps: int) -> bool:
    bundles = build_bundles(src, key_file, work / "swap-bundles", range(1, swaps + 1))
    cfg = SigsConfig(state_dir=work / "swap-store", trusted_keys=(pub,))
    primed = ActiveRules(Refresher(cfg).store)
    follower = ActiveRules(Refresher(cfg).store)
    ref = Refresher(cfg, active=primed)
    data = synthetic_memory(1 << 20, seed=3)
    stop = threading.Event()
    stats = {name: {"cycles": 0, "no_rules": 0, "failed": 0, "fingerprints": set(), "max_cycle_s": 0.0}
             for name in ("primed", "follower")}

    def scan(name: str, rules_callable: ActiveRules) -> None:
        s = stats[name]
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                rules = rules_callable()
                if rules is None or rules.rule_count == 0:
                    s["no_rules"] += 1
                else:
                    rules.rules.match(data=data, timeout=60)
                    s["fingerprints"].add(rules.fingerprint)
            except Exception as e:  # noqa: BLE001 - counted and shown: a failed cycle is the finding
                s["failed"] += 1
                print(f"  {name}: cycle failed: {e}")
            s["cycles"] += 1
            s["max_cycle_s"] = max(s["max_cycle_s"], time.perf_counter() - t0)

    threads = [threading.Thread(target=scan, args=(n, c)) for n, c in (("primed", primed), ("follower", follower))]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    outcomes = [ref.install_bytes(b.read_bytes(), str(b)).outcome for b in bundles]
    time.sleep(2.0)  # let the follower notice the last swap
    stop.set()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    print(f"\n[scanning during {swaps} swaps, {took:.1f} s; installs: "
          f"{sum(o is Outcome.ACTIVATED for o in outcomes)} activated]")
    ok = True
    for name, s in stats.items():
        print(f"  {name:9s} cycles {s['cycles']:5d}   without rules {s['no_rules']}   failed {s['failed']}   "
              f"rule sets seen {len(s['fingerprints'])}   longest cycle {s['max_cycle_s']:.2f} s")
        ok &= s["no_rules"] == 0 and s["failed"] == 0 and s["cycles"] > 0
    print("  no cycle ran without rules, none failed" if ok else "  FAILED: a cycle ran without rules or failed")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--swaps", type=int, default=6)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sva-bench-sigs-"))
    try:
        key_file, pub = generate(work / "keys", "bench")
        gen = write_source(work / "gen-src")
        generate_rules(gen / "gen", args.rules)
        pipeline_rounds(f"generated {args.rules}", gen, key_file, pub, work, args.rounds)
        if (TESTDATA / "signature-base").is_dir() and (TESTDATA / "elastic-linux").is_dir():
            real = write_source(work / "real-src")
            for name in ("elastic-linux", "signature-base"):
                shutil.copytree(TESTDATA / name, real / name)
            pipeline_rounds("built-in + elastic-linux + signature-base", real, key_file, pub, work, args.rounds)
        else:
            print(f"\n[public rule sets] skipped: not found at {TESTDATA}")
        ok = scanning_during_swaps(gen, key_file, pub, work, args.swaps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
