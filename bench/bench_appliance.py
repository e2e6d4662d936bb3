"""The appliance daemon (`sva run`) on lab guests: detection latency, guest slowdown, RSS.

    .venv/bin/python bench/bench_appliance.py [--samples 5] [--guests 8] [--skip-rss | --only-rss]

1. Detection latency: a process named like a coin miner is started in the guest (serial
   console exec); the time from the exec (the process's start time in the guest, mapped
   to host time by reading the guest's uptime over the console just before, to within
   half the shortest round trip plus /proc/uptime's 10 ms resolution) to the alert at an authenticated bus
   subscriber, p50/p95 (goal <= 0.5 s / <= 1 s). Interval 0.25 s (4 Hz), cpu_budget 1.
   Also from issuing the exec on the console (includes its round trip and the shell).
2. Guest CPU slowdown: a busy loop in the guest, timed from the host, with the daemon
   monitoring it at 4 Hz vs not monitored at all (the baseline: the same daemon stopped
   with SIGSTOP, at a moment the guest is not paused), in alternating pairs so that drift
   of the host's speed hits both alike; ratio (goal <= 3 %); with the cycle rate the
   daemon achieved, its mean cycle time and the share of time the guest was paused.
3. Daemon RSS (of the `sva run` process after a few cycles, median of samples over a few
   seconds, from smaps_rollup) with 1 and with N lab guests at a 5 s interval (goal <=
   250 MB, + <= 60 MB per extra VM), split into anonymous memory (the daemon's own) and
   mapped files (libraries, and guest RAM pages of the read-only mappings, which the
   workers drop after each cycle); also the 1-guest daemon of sections 1-2 at 4 Hz.
   `--only-rss` runs this part alone.

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

    def suspend(self, guest: str) -> None:
        """SIGSTOP the daemon at a moment it has not paused the guest (checked through the
        lab's control monitor; retried otherwise), so the guest runs unmonitored."""
        from sva.lab.machine import RunFiles
        from sva.lab.paths import lab_dir
        from sva.vmi.qmp import QmpClient

        with QmpClient(str(RunFiles(lab_dir(guest)).control), timeout=5) as qmp:
            for _ in range(50):
                self.proc.send_signal(signal.SIGSTOP)
                if qmp.execute("query-status").get("status") == "running":
                    return
                self.proc.send_signal(signal.SIGCONT)
                time.sleep(0.05)
        raise RuntimeError(f"{guest} stayed paused: cannot stop the daemon outside a pause")

    def totals(self, vm: str) -> tuple[float, float, float, float]:
        """(monotonic now, cycles, cycle seconds, pause seconds) so far for `vm`."""
        return (time.monotonic(), self.per_vm("sva_vm_cycles_total").get(vm, 0.0),
                self.per_vm("sva_vm_cycle_seconds_total").get(vm, 0.0),
                self.per_vm("sva_vm_pause_seconds_total").get(vm, 0.0))  # fmt: skip

    def rss_mb(self, samples: int = 10, every: float = 0.5) -> Rss:
        """The daemon's RSS parts, each the median of `samples` readings `every` s apart
        (the guest RAM part rises during a cycle and drops after it). From smaps_rollup,
        which counts exactly: /proc/PID/status's counters of a threaded process lag (each
        thread batches its updates), by tens of MB here."""
        readings: list[Rss] = []
        for i in range(samples):
            if i:
                time.sleep(every)
            kib = {}
            for line in Path(f"/proc/{self.proc.pid}/smaps_rollup").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in ("Rss", "Anonymous"):
                    kib[name] = int(value.split()[0])
            readings.append(Rss(kib["Rss"] / 1024, kib["Anonymous"] / 1024,
                                (kib["Rss"] - kib["Anonymous"]) / 1024))  # fmt: skip
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
    """MB: RSS = anonymous (the daemon's own) + file and shared memory mapped (guest RAM, libraries)."""

    vm: float
    anon: float
    mapped: float

    def __str__(self) -> str:
        return f"RSS {self.vm:.0f} MB = anonymous {self.anon:.0f} MB + files/guest RAM mapped {self.mapped:.0f} MB"


def rss_section(args: argparse.Namespace, tmp: Path, tag: str, started: list[str], g0: str,
                rss_fast: Rss | None) -> None:  # fmt: skip
    """3. RSS with 1 guest and with args.guests guests, at the same settings (interval 5 s),
    and `rss_fast`, the 1-guest daemon of sections 1-2 (4 Hz, after the latency samples)."""
    d = Daemon(tmp, [g0], 5.0, 0.5)
    try:
        d.wait_cycles([g0])
        rss1 = d.rss_mb()
    finally:
        d.stop()
    if rss_fast is not None:
        print(f"daemon RSS with 1 guest at 4 Hz: {rss_fast} (goal <= 250 MB: {rss_fast.vm / 250:.2f}x the goal)",
              flush=True)  # fmt: skip
    print(f"daemon RSS with 1 guest at a 5 s interval: {rss1} (goal <= 250 MB: {rss1.vm / 250:.2f}x the goal)",
          flush=True)  # fmt: skip
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
    print(f"daemon RSS with {args.guests} guests at a 5 s interval: {rssn}; per extra VM: {per_vm:.0f} MB "
          f"(goal <= 60 MB: {per_vm / 60:.2f}x the goal) = anonymous {per_anon:.0f} MB + mapped "
          f"{per_mapped:.0f} MB; ratio to 1 guest {rssn.vm / rss1.vm:.2f}x", flush=True)  # fmt: skip


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def guest_clock_offset(name: str, probes: int = 5) -> float:
    """Host perf_counter() minus the guest's uptime (its monotonic clock, in which task
    start times are counted), from the probe with the shortest console round trip: the
    guest read its clock within half that round trip of the probe's midpoint."""
    best: tuple[float, float] | None = None
    for _ in range(probes):
        t = time.perf_counter()
        out = lab.exec_in(name, "cat /proc/uptime", timeout=30).output
        rtt = time.perf_counter() - t
        if best is None or rtt < best[0]:
            best = (rtt, t + rtt / 2 - float(out.split()[0]))
    assert best is not None
    return best[1]


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
    ap.add_argument("--monitored", type=int, default=8, help="busy-loop pairs (unmonitored, monitored)")
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

        # 2. busy loop, in pairs: the daemon stopped (SIGSTOP, outside a guest pause), then running
        busy(g0, 1000)  # warm the serial console
        console = statistics.median(busy(g0, 0) for _ in range(5))

        d = Daemon(tmp, [g0], 0.25, 1.0)
        try:
            d.wait_cycles([g0])
            base: list[float] = []
            monitored: list[float] = []
            spent = [0.0, 0.0, 0.0, 0.0]  # seconds, cycles, cycle seconds, pause seconds while monitored
            def unmonitored() -> None:
                d.suspend(g0)
                try:
                    base.append(busy(g0, args.loop))
                finally:
                    d.proc.send_signal(signal.SIGCONT)
                time.sleep(1.0)  # back to its cycles

            def watched() -> None:
                nonlocal spent
                before = d.totals(g0)
                monitored.append(busy(g0, args.loop))
                after = d.totals(g0)
                spent = [x + (a - b) for x, a, b in zip(spent, after, before, strict=True)]

            for i in range(args.monitored):  # A B, B A, A B, ...: a drift of the host hits both alike
                for step in ((unmonitored, watched) if i % 2 == 0 else (watched, unmonitored)):
                    step()
            # 1. latency
            sub = BusSubscriber(f"tcp://127.0.0.1:{d.bus}", f"tcp://127.0.0.1:{d.replay}", security=d.security)
            lat: list[float] = []
            lat_exec: list[float] = []  # from the process's start time in the guest
            try:
                for i in range(args.samples):
                    comm = f"xmrig{i}"
                    # a script (busybox itself would look up an applet by that name and exit)
                    lab.exec_in(g0, f"printf '#!/bin/sh\\nsleep 600\\n' > /tmp/{comm}; chmod +x /tmp/{comm}",
                                timeout=60)  # fmt: skip
                    offset = guest_clock_offset(g0)
                    t0 = time.perf_counter()
                    lab.exec_in(g0, f"(/tmp/{comm} &) ; true", timeout=60)
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        ev = sub.recv(timeout=0.5)
                        if ev is not None and ev.type is EventType.ALERT and f"({comm})" in str(
                                ev.payload["finding_info"]["title"]):
                            now = time.perf_counter()
                            lat.append(now - t0)
                            started_at = ev.payload["unmapped"]["sva"]["process"].get("start_time")
                            if started_at is not None:
                                lat_exec.append(now - (offset + started_at / 1e9))
                            break
            finally:
                sub.close()
            rss1 = d.rss_mb()
        finally:
            d.stop()
        b, m = statistics.median(base), statistics.median(monitored)
        ratios = [mo / un - 1 for un, mo in zip(base, monitored, strict=True)]
        span, cycles = spent[0], spent[1]
        print(f"guest busy loop ({args.loop} iterations, {len(base)} pairs): slowdown monitored at a 0.25 s interval "
              f"vs the daemon stopped (baseline), median of the pairs {100 * statistics.median(ratios):+.1f} % "
              f"(goal <= 3 %); medians {m:.2f} s vs {b:.2f} s ({100 * (m / b - 1):+.1f} %); per pair "
              f"{', '.join(f'{100 * r:+.1f}' for r in ratios)} %", flush=True)  # fmt: skip
        if cycles > 0:
            print(f"  while monitored: {cycles / span:.2f} cycles/s (4 Hz asked), mean cycle "
                  f"{1000 * spent[2] / cycles:.0f} ms, mean guest pause {1000 * spent[3] / cycles:.1f} ms per "
                  f"cycle = {100 * spent[3] / span:.2f} % of the time paused", flush=True)  # fmt: skip
        if lat_exec:
            print(f"exec -> alert latency over {len(lat_exec)} samples, from the process's start in the guest: "
                  f"p50 {pct(lat_exec, 0.5):.2f} s (goal <= 0.5 s), p95 {pct(lat_exec, 0.95):.2f} s (goal <= 1 s); "
                  f"samples {', '.join(f'{x:.2f}' for x in sorted(lat_exec))} s", flush=True)  # fmt: skip
        if lat:
            print(f"  from issuing the exec on the serial console (its round trip: {console:.2f} s for a no-op; "
                  f"the shell's start of the script): p50 {pct(lat, 0.5):.2f} s, p95 {pct(lat, 0.95):.2f} s; "
                  f"samples {', '.join(f'{x:.2f}' for x in sorted(lat))} s", flush=True)  # fmt: skip
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
