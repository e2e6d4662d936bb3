"""Alert bus benchmark (not a test: prints figures, asserts nothing).

1. End-to-end throughput: N events through BusPublisher (journal write + CURVE + JSON)
   to a BusSubscriber in another process (which decodes each one and checks its
   sequence number), vs bare pyzmq PUB/SUB carrying the same payload as JSON (dumps +
   send, recv + loads), plaintext, no journal, in the same run. The bus is measured with
   one `publish()` per event and with `publish_many()` batches (`--batch`, as the engine
   publishes a cycle's alerts). Goals: >= 50 000 events/s and >= 0.4x bare.
2. Publish-to-receive latency at a fixed rate (default 2 000 events/s, single publish()):
   p50/p99 for the bus and for bare PUB/SUB. Goal: bus p99 <= 2 ms.

Both payloads are measured by default: the realistic ~2 KB OCSF alert and a ~80-byte
health event (`--payload alert|small|both`).

Usage: python bench/bench_bus.py [--count 100000] [--batch 100] [--rate 2000] [--seconds 5] [--payload both]
The subscriber runs in a child process (this script with --role), so publisher and
subscriber each get a core; on a shared machine the figures move with other load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sva.bus import BusConfig, BusPublisher, BusSubscriber, alert_payload  # noqa: E402
from sva.bus.keys import generate  # noqa: E402
from sva.bus.subscriber import security_from_keys_dir  # noqa: E402
from sva.bus.testing import sample_alert  # noqa: E402

KIND = "alert"  # set from --payload


def _topic() -> bytes:
    return b"sva.alert.high.hidden_process" if KIND == "alert" else b"sva.health.bench"


def _payload(i: int = 1) -> dict[str, Any]:
    """The realistic OCSF alert (about 2 KiB of JSON), or a small health event (about 100 bytes)."""
    if KIND == "alert":
        return alert_payload(sample_alert(i, detector="hidden_process", severity="high"))
    return {"component": "bench", "status": "ok", "message": "m", "details": {"t_pub_ns": 0}}


def _stamp_slot(payload: dict[str, Any]) -> dict[str, Any]:
    """The dict in the payload where the publish time goes."""
    if KIND == "alert":
        return payload["unmapped"]["sva"]["evidence"]  # type: ignore[no-any-return]
    return payload["details"]  # type: ignore[no-any-return]


# ---- child roles (subscribers) ---------------------------------------------------------


def role_bare_sub(args: argparse.Namespace) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.rcvhwm = 0
    s.linger = 0
    s.setsockopt(zmq.SUBSCRIBE, b"sva.")
    s.connect(args.endpoint)
    while True:  # handshake: probes until the first arrives
        topic, body = s.recv_multipart()
        if topic == b"sva.probe":
            break
    print("ready", flush=True)
    n, first, last, lat = 0, 0.0, 0.0, []
    while n < args.count:
        topic, body = s.recv_multipart()
        if topic == b"sva.probe":
            continue
        d = json.loads(body)
        now = time.monotonic_ns()
        if n == 0:
            first = now
        last = now
        n += 1
        if args.latency:
            lat.append(now - _stamp_slot(d)["t_pub_ns"])
    print(json.dumps({"n": n, "first_ns": first, "last_ns": last, "lat_ns": lat}), flush=True)


def role_bus_sub(args: argparse.Namespace) -> None:
    sec = security_from_keys_dir(args.keys_dir)
    sub = BusSubscriber(args.endpoint, args.replay_endpoint, security=sec, since=args.since)
    while sub.last_heartbeat is None:
        sub.recv(timeout=0.2)
    print("ready", flush=True)
    n, first, last, lat, expect = 0, 0, 0, [], args.since + 1
    while n < args.count:
        ev = sub.recv(timeout=5.0)
        if ev is None:
            continue
        now = time.monotonic_ns()
        if ev.seq != expect:
            raise SystemExit(f"out of sequence: {ev.seq} where {expect} was expected")
        expect += 1
        if n == 0:
            first = now
        last = now
        n += 1
        if args.latency:
            lat.append(now - _stamp_slot(dict(ev.payload))["t_pub_ns"])
    out = {"n": n, "first_ns": first, "last_ns": last, "lat_ns": lat, "live": sub.stats.live,
           "replayed": sub.stats.replayed}
    print(json.dumps(out), flush=True)
    sub.close()


# ---- driver ----------------------------------------------------------------------------


def _child(role: str, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, __file__, "--role", role, "--payload", KIND, *extra],
                            stdout=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.wait(timeout=120)
    return json.loads(line)


def _paced(i: int, t0: float, rate: float) -> None:
    if rate > 0:
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def bare(count: int, rate: float = 0.0, latency: bool = False) -> dict[str, Any]:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.sndhwm = 0
    pub.linger = 0
    pub.bind("tcp://127.0.0.1:*")
    ep = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    child = _child("bare-sub", "--endpoint", ep, "--count", str(count), *(["--latency"] if latency else []))
    assert child.stdout is not None
    while True:
        pub.send_multipart([b"sva.probe", b"{}"])
        if zmq.select([child.stdout], [], [], 0.01)[0]:
            assert child.stdout.readline().strip() == "ready"
            break
    payload = _payload()
    ev = _stamp_slot(payload)
    topic = _topic()
    t0 = time.monotonic()
    start_ns = time.monotonic_ns()
    for i in range(count):
        _paced(i, t0, rate)
        if latency:
            ev["t_pub_ns"] = time.monotonic_ns()
        pub.send_multipart([topic, json.dumps(payload).encode()])
    r = _result(child)
    pub.close(0)
    ctx.term()
    r["start_ns"] = start_ns
    return r


def bus(count: int, tmp: Path, rate: float = 0.0, latency: bool = False, batch: int = 0) -> dict[str, Any]:
    """`batch` > 0: publish_many() in batches of that many events; else one publish() per event."""
    journal = tempfile.mkdtemp(prefix="journal-", dir=tmp)
    cfg = BusConfig(endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", journal=Path(journal),
                    keys_dir=tmp / "keys", heartbeat_s=0.5, sndhwm=max(count + 1000, 100_000))
    with BusPublisher(cfg) as b:
        since = b.latest_seq
        child = _child("bus-sub", "--endpoint", b.endpoint, "--replay-endpoint", b.replay_endpoint, "--keys-dir",
                       str(tmp / "keys"), "--count", str(count), "--since", str(since),
                       *(["--latency"] if latency else []))
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        payload = _payload()
        ev = _stamp_slot(payload)
        event_type = "alert" if KIND == "alert" else "health"
        t0 = time.monotonic()
        start_ns = time.monotonic_ns()
        if batch > 0:
            items = [(event_type, payload)] * batch
            for i in range(0, count, batch):
                b.publish_many(items[: min(batch, count - i)])
        else:
            for i in range(count):
                _paced(i, t0, rate)
                if latency:
                    ev["t_pub_ns"] = time.monotonic_ns()
                b.publish(event_type, payload)
        publish_s = (time.monotonic_ns() - start_ns) / 1e9
        r = _result(child)
    r["start_ns"] = start_ns
    r["publish_only_per_s"] = count / publish_s
    return r


def _rate(r: dict[str, Any]) -> float:
    return r["n"] / ((r["last_ns"] - r["start_ns"]) / 1e9)


def _pct(values: list[int], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100_000, help="events for the throughput runs")
    ap.add_argument("--rate", type=float, default=2000.0, help="events/s for the latency runs")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each latency run")
    ap.add_argument("--payload", choices=("alert", "small", "both"), default="both",
                    help="alert: a realistic OCSF alert; small: a ~80-byte health event; both (default)")
    ap.add_argument("--batch", type=int, default=100, help="events per publish_many() call in the batched run")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--replay-endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--keys-dir", help=argparse.SUPPRESS)
    ap.add_argument("--since", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--latency", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global KIND
    KIND = args.payload
    if args.role == "bare-sub":
        role_bare_sub(args)
        return 0
    if args.role == "bus-sub":
        role_bus_sub(args)
        return 0

    kinds = ("alert", "small") if args.payload == "both" else (args.payload,)
    with tempfile.TemporaryDirectory(prefix="sva-bench-bus-") as d:
        tmp = Path(d)
        generate(tmp / "keys")
        print(f"{args.count} events per throughput run, publish_many() batches of {args.batch}; "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        for kind in kinds:
            KIND = kind
            size = len(json.dumps(_payload()))
            what = "OCSF alert" if KIND == "alert" else "small health event"
            print(f"\n== payload: {what}, {size} bytes of JSON")
            b = bare(args.count)
            s1 = bus(args.count, tmp)
            sb = bus(args.count, tmp, batch=args.batch)
            bare_rate = _rate(b)
            print(f"throughput  bare pyzmq PUB/SUB + json          : {bare_rate:10,.0f} msg/s")
            for name, r in (("publish()", s1), (f"publish_many({args.batch})", sb)):
                rate = _rate(r)
                print(f"throughput  sva bus {name:<19}: {rate:10,.0f} events/s  {rate / bare_rate:.2f}x bare  "
                      f"(publisher alone {r['publish_only_per_s']:,.0f}/s; {r['live']} live, {r['replayed']} by replay)")
            print("            (goals: >= 50,000/s and >= 0.4x bare)")
            n_lat = int(args.rate * args.seconds)
            lb = bare(n_lat, rate=args.rate, latency=True)
            ls = bus(n_lat, tmp, rate=args.rate, latency=True)
            for name, r in (("bare", lb), ("sva bus", ls)):
                lat = r["lat_ns"]
                print(f"latency     {name:<8} at {args.rate:,.0f}/s ({len(lat)} events): p50 {_pct(lat, 50):.3f} ms  "
                      f"p99 {_pct(lat, 99):.3f} ms  max {max(lat) / 1e6:.3f} ms  "
                      f"mean {statistics.mean(lat) / 1e6:.3f} ms")
            print("            (goal: sva bus p99 <= 2 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
