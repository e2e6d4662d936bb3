"""The appliance daemon (`sva run`) on lab guests: detection latency, guest slowdown, RSS.

    .venv/bin/python bench/bench_appliance.py [--samples 5] [--guests 8] [--skip-rss | --only-rss]

1. Detection latency: a process named like a coin miner is started in the guest (serial
   console exec); the time from issuing the exec to the alert at an authenticated bus
   subscriber, p50/p95 (goal <= 0.5 s / <= 1 s). Interval 0.25 s (4 Hz), cpu_budget 1.
   The figure includes the console round trip, printed beside it.
2. Guest CPU slowdown: a busy loop in the guest, timed from the host, with the daemon
   monitoring it at 4 Hz vs not monitored at all (the baseline: runs before the daemon
   starts and after it stops), ratio (goal <= 3 %); with the cycle rate the daemon
   achieved, its mean cycle time and the share of time the guest was paused.
3. Daemon RSS (VmRSS of the `sva run` process after a few cycles, median of samples over
   a few seconds) with 1 and with N lab guests (goal <= 250 MB, + <= 60 MB per extra VM),
   split into RssAnon (the daemon's own memory) and RssFile + RssShmem (guest RAM pages
   of the read-only mappings, which the workers drop after each cycle).
   `--only-rss` runs this part alone (the 1-guest figure then at the N-guest settings).

Figures are printed whether or not the goals are met. Lab guests get names unique to this
run in a private SVA_RUNTIME_DIR and are stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SVA_RUNTIME_DIR", tempfile.mkdtemp(prefix="sva-bench-app-"))
os.environ["SVA_SIGS_DIR"] = "/nonexistent/sva-sigs"  # the built-in signatures

from sva import lab
from sva.bus.event import EventType
from sva.bus.subscriber import BusSubscriber
from sva.bus.testing import make_keys

BUSY = "i=0; while [ $i -lt {n} ]; do i=$((i+1)); done; echo done"  # n = 0: the console round trip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, tmp: Path, guests: list[str], interval: float, budget: float) -> None:
        if not (tmp / "keys" / "server.key").exists():
            make_keys(tmp / "keys")
        from sva.bus.subscriber import security_from_keys_dir

        self.security = security_from_keys_dir(tmp / "keys")
        self.bus, self.replay, self.metrics = _port(), _port(), _port()
        targets = "".join(f'[[targets]]\nuri = "lab:{g}"\n' for g in guests)
        cfg = tmp / f"sva-{len(guests)}.toml"
        cfg.write_text(f"""[appliance]\nlog_format = "json"\n[bus]\nendpoint = "tcp://127.0.0.1:{self.bus}"
replay_endpoint = "tcp://127.0.0.1:{self.replay}"\njournal = "{tmp}/journal-{len(guests)}"\nkeys_dir = "{tmp}/keys"
[defaults]\ninterval = {interval}\ncpu_budget = {budget}\nretry = 0.5\n{targets}[metrics]\nport = {self.metrics}\n""")
        self.out: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "sva", "run", "--config", str(cfg)], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        threading.Thread(target=lambda: self.out.extend(self.proc.stdout), daemon=True).start()  # type: ignore[arg-type]

    def per_vm(self, metric: str) -> dict[str, float]:
        """One per-VM series of the metrics endpoint, by VM name (empty if unreachable)."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
                if line.startswith(metric + "{")}  # fmt: skip

    def wait_cycles(self, guests: list[str], timeout: float = 300) -> None:
        """Until every guest had two cycles (sva_vm_cycles_total from the metrics endpoint)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            cycles = self.per_vm("sva_vm_cycles_total")
            if all(cycles.get(g, 0) >= 2 for g in guests):
                return
            time.sleep(0.5)

    def totals(self, vm: str) -> tuple[float, float, float, float]:
        """(monotonic now, cycles, cycle seconds, pause seconds) so far for `vm`."""
        return (time.monotonic(), self.per_vm("sva_vm_cycles_total").get(vm, 0.0),
                self.per_vm("sva_vm_cycle_seconds_total").get(vm, 0.0),
                self.per_vm("sva_vm_pause_seconds_total").get(vm, 0.0))  # fmt: skip

    def rss_mb(self, samples: int = 10, every: float = 0.5) -> Rss:
        """The daemon's RSS parts, each the median of `samples` readings `every` s apart
        (the guest RAM part rises during a cycle and drops after it)."""
        readings: list[Rss] = []
        for i in range(samples):
            if i:
                time.sleep(every)
            kib = {}
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    kib[name] = int(value.split()[0])
            readings.append(Rss(kib["VmRSS"] / 1024, kib["RssAnon"] / 1024,
                                (kib["RssFile"] + kib["RssShmem"]) / 1024))  # fmt: skip
        return Rss(*(statistics.median(getattr(r, f) for r in readings) for f in ("vm", "anon", "mapped")))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True)
class Rss:
    """MB: VmRSS = RssAnon (the daemon's own) + RssFile/RssShmem (mapped guest RAM, libraries)."""

    vm: float
    anon: float
    mapped: float

    def __str__(self) -> str:
        return f"VmRSS {self.vm:.0f} MB = RssAnon {self.anon:.0f} MB + RssFile/RssShmem {self.mapped:.0f} MB"


def rss_section(args: argparse.Namespace, tmp: Path, tag: str, started: list[str], g0: str,
                rss1: Rss | None) -> None:  # fmt: skip
    """3. RSS with 1 guest (measured here unless given) and with args.guests guests."""
    if rss1 is None:
        d = Daemon(tmp, [g0], 5.0, 0.5)
        try:
            d.wait_cycles([g0])
            rss1 = d.rss_mb()
        finally:
            d.stop()
    print(f"daemon RSS with 1 guest: {rss1} (goal VmRSS <= 250 MB: {rss1.vm / 250:.2f}x the goal)", flush=True)
    if args.skip_rss or args.guests <= 1:
        return
    names = [f"{tag}-{i}" for i in range(1, args.guests)]
    for n in names:
        lab.up(n, scenario="clean", mem="128M")
        started.append(n)
    d = Daemon(tmp, [g0, *names], 5.0, 0.5)
    try:
        d.wait_cycles([g0, *names], timeout=600)
        rssn = d.rss_mb()
    finally:
        d.stop()
    extra = args.guests - 1
    per_vm, per_anon, per_mapped = ((b - a) / extra for a, b in zip(
        (rss1.vm, rss1.anon, rss1.mapped), (rssn.vm, rssn.anon, rssn.mapped)))  # fmt: skip
    print(f"daemon RSS with {args.guests} guests: {rssn}; per extra VM: VmRSS {per_vm:.0f} MB "
          f"(goal <= 60 MB: {per_vm / 60:.2f}x the goal) = RssAnon {per_anon:.0f} MB + RssFile/RssShmem "
          f"{per_mapped:.0f} MB; VmRSS ratio to 1 guest {rssn.vm / rss1.vm:.2f}x", flush=True)  # fmt: skip


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def busy(name: str, n: int) -> float:
    t = time.perf_counter()
    lab.exec_in(name, BUSY.format(n=n), timeout=300)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--guests", type=int, default=8)
    ap.add_argument("--loop", type=int, default=300000, help="busy-loop iterations in the guest")
    ap.add_argument("--skip-rss", action="store_true", help="no N-guest RSS run")
    ap.add_argument("--only-rss", action="store_true", help="only the RSS runs (section 3)")
    ap.add_argument("--monitored", type=int, default=5, help="busy-loop runs while monitored")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sva-bench-app-"))
    tag = f"ba{os.getpid()}"
    started: list[str] = []
    try:
        g0 = f"{tag}-0"
        lab.up(g0, scenario="clean")
        started.append(g0)
        if args.only_rss:
            rss_section(args, tmp, tag, started, g0, None)
            return 0

        # 2. baseline busy loop, unmonitored (before the daemon starts and after it stops)
        busy(g0, 1000)  # warm the serial console
        console = statistics.median(busy(g0, 0) for _ in range(5))
        base = [busy(g0, args.loop) for _ in range(3)]

        d = Daemon(tmp, [g0], 0.25, 1.0)
        try:
            d.wait_cycles([g0])
            before = d.totals(g0)
            monitored = [busy(g0, args.loop) for _ in range(args.monitored)]
            after = d.totals(g0)
            # 1. latency
            sub = BusSubscriber(f"tcp://127.0.0.1:{d.bus}", f"tcp://127.0.0.1:{d.replay}", security=d.security)
            lat: list[float] = []
            try:
                for i in range(args.samples):
                    comm = f"xmrig{i}"
                    # a script (busybox itself would look up an applet by that name and exit)
                    lab.exec_in(g0, f"printf '#!/bin/sh\\nsleep 600\\n' > /tmp/{comm}; chmod +x /tmp/{comm}",
                                timeout=60)  # fmt: skip
                    t0 = time.perf_counter()
                    lab.exec_in(g0, f"(/tmp/{comm} &) ; true", timeout=60)
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        ev = sub.recv(timeout=0.5)
                        if ev is not None and ev.type is EventType.ALERT and f"({comm})" in str(
                                ev.payload["finding_info"]["title"]):
                            lat.append(time.perf_counter() - t0)
                            break
            finally:
                sub.close()
            rss1 = d.rss_mb()
        finally:
            d.stop()
        base += [busy(g0, args.loop) for _ in range(2)]

        b, m = statistics.median(base), statistics.median(monitored)
        span, cycles = after[0] - before[0], after[1] - before[1]
        print(f"guest busy loop ({args.loop} iterations): unmonitored {b:.2f} s (baseline, median of {len(base)}), "
              f"monitored at a 0.25 s interval {m:.2f} s (median of {len(monitored)}): slowdown "
              f"{100 * (m / b - 1):+.1f} % (goal <= 3 %)", flush=True)  # fmt: skip
        if cycles > 0:
            print(f"  while monitored: {cycles / span:.2f} cycles/s (4 Hz asked), mean cycle "
                  f"{1000 * (after[2] - before[2]) / cycles:.0f} ms, mean guest pause "
                  f"{1000 * (after[3] - before[3]) / cycles:.1f} ms per cycle = "
                  f"{100 * (after[3] - before[3]) / span:.2f} % of the time paused", flush=True)  # fmt: skip
        if lat:
            print(f"exec -> alert latency over {len(lat)} samples: p50 {pct(lat, 0.5):.2f} s (goal <= 0.5 s), "
                  f"p95 {pct(lat, 0.95):.2f} s (goal <= 1 s); includes the serial-console round trip of the "
                  f"exec (median {console:.2f} s for a no-op command)", flush=True)  # fmt: skip
        else:
            print("exec -> alert latency: no alert within 30 s", flush=True)
        rss_section(args, tmp, tag, started, g0, rss1)
    finally:
        for n in started:
            try:
                lab.down(n)
            except Exception as e:  # noqa: BLE001 - stop the others
                print(f"could not stop {n}: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
