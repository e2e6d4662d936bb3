"""Test factories for the bus: real alerts, keys and publishers, no mocks.

Also runnable, to drive a publisher in a child process (tests kill it with SIGKILL):

    python -m sva.bus.testing --journal DIR --endpoint EP --replay-endpoint EP2 \
        [--keys-dir DIR | --plaintext] [--count N] [--rate R] [--run-tag TAG] [--sndhwm N]

It prints `ready <pub endpoint> <replay endpoint> <next seq>` once bound, publishes
`--count` alerts (0 = none) as fast as it can (or at `--rate` per second), prints
`done <last seq>` and then keeps serving replay and heartbeats until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sva.bus.config import BusConfig
from sva.bus.event import Severity
from sva.bus.ocsf import alert_payload
from sva.bus.publisher import BusPublisher
from sva.bus.replay import ClientSecurity
from sva.bus.subscriber import security_from_keys_dir

_DETECTORS = ("hidden_process", "syscall_hook", "kernel_module", "net_flow", "yara_memory")


def sample_alert(i: int = 0, *, detector: str | None = None, severity: Severity | str | None = None,
                 vm: str = "web01", tag: str = "") -> dict[str, Any]:
    """An alert mapping as the engine produces it; varied by `i` (process or flow evidence)."""
    det = detector or _DETECTORS[i % len(_DETECTORS)]
    sev = Severity.parse(severity) if severity is not None else list(Severity)[i % len(Severity)]
    alert: dict[str, Any] = {
        "vm": {"name": vm, "uuid": "6f1c1d4e-2b7a-4c1e-9a51-0d3f5e8b7c21", "target": f"lab:{vm}"},
        "detector": det,
        "rule": {"id": f"SVA-{det.upper()}-001", "name": det.replace("_", " "), "version": "1"},
        "severity": sev.label,
        "title": f"{det.replace('_', ' ')} #{i} in {vm}",
        "description": "synthetic alert from sva.bus.testing",
        "mitre": ["T1014", {"id": "T1055.001", "tactic": "TA0005", "tactic_name": "Defense Evasion"}],
        "evidence": {"index": i, "tag": tag, "address": f"0xffffffff8{i:07x}", "note": "x" * 64},
        "signature_bundle": "2025.11.0",
        "cycle": i // 10,
    }
    if det == "net_flow":
        alert["flow"] = {"proto": "tcp", "src_ip": "10.0.0.5", "src_port": 40000 + i % 20000,
                         "dst_ip": "192.0.2.7", "dst_port": 4444}
    else:
        alert["process"] = {"pid": 1000 + i % 30000, "comm": "evil", "ppid": 1, "uid": 0,
                            "cmdline": "/tmp/.x/evil -d", "path": "/tmp/.x/evil"}
    return alert


def make_keys(keys_dir: Path) -> ClientSecurity:
    """`sva keys gen` into keys_dir; returns the authorized client's security settings."""
    from sva.bus.keys import generate

    generate(keys_dir)
    return security_from_keys_dir(keys_dir)


def local_config(tmp: Path, *, ipc: bool = False, **kw: Any) -> BusConfig:
    """A config on loopback (random ports) or ipc in `tmp`, journal and keys in `tmp`."""
    if ipc:
        kw.setdefault("endpoint", f"ipc://{tmp}/bus.pub")
        kw.setdefault("replay_endpoint", f"ipc://{tmp}/bus.replay")
    else:
        kw.setdefault("endpoint", "tcp://127.0.0.1:*")
        kw.setdefault("replay_endpoint", "tcp://127.0.0.1:*")
    kw.setdefault("journal", tmp / "journal")
    kw.setdefault("keys_dir", tmp / "keys")
    kw.setdefault("heartbeat_s", 0.2)
    return BusConfig(**kw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sva.bus.testing")
    ap.add_argument("--journal", required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--replay-endpoint", required=True)
    ap.add_argument("--keys-dir")
    ap.add_argument("--plaintext", action="store_true")
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.0, help="events/s; 0 = as fast as possible")
    ap.add_argument("--run-tag", default="")
    ap.add_argument("--heartbeat", type=float, default=0.2)
    ap.add_argument("--fsync", default="interval")
    ap.add_argument("--sndhwm", type=int, default=100_000)
    args = ap.parse_args(argv)
    cfg = BusConfig(endpoint=args.endpoint, replay_endpoint=args.replay_endpoint, journal=Path(args.journal),
                    keys_dir=Path(args.keys_dir or "."), plaintext=args.plaintext, heartbeat_s=args.heartbeat,
                    fsync=args.fsync, sndhwm=args.sndhwm)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with BusPublisher(cfg) as bus:
        print("ready", bus.endpoint, bus.replay_endpoint, bus.latest_seq + 1, flush=True)
        payloads = [alert_payload(sample_alert(i, tag=args.run_tag)) for i in range(50)]
        t0 = time.monotonic()
        for i in range(args.count):
            if stop.is_set():
                break
            if args.rate > 0:
                delay = t0 + i / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            bus.publish("alert", payloads[i % len(payloads)])
        print("done", bus.latest_seq, flush=True)
        while not stop.wait(0.1):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
