"""`sva net SOURCE`: the network detectors over a mirror, an interface, a lab guest or a pcap.

    sva net iface:mon0 --inventory vms.toml           a mirror port (AF_PACKET ring)
    sva net qemu-mirror:/run/vm1/mirror.sock           a QEMU filter-mirror chardev
    sva net lab:demo                                   a lab guest: its mirror + its inventory
    sva net capture.pcap --json                        a file: runs to its end

Findings are printed as they happen (`--json`: one alert per line, the alert JSON of
`sva scan --json`); capture statistics (packets, drops, rate, malformed) go to stderr at
exit and on SIGUSR1. Stops at the end of a pcap, after --duration, or on SIGINT/SIGTERM.
Exit status: 0 nothing found, 1 findings, 2 error (as `sva scan`).
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sva.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("net", help="watch mirrored VM traffic: spoofing, scans, IOCs, network YARA, inter-VM policy")
    p.add_argument("source", help="iface:NAME[,NAME…], qemu-mirror:PATH, lab:NAME, or a .pcap/.pcapng path")
    p.add_argument("--json", action="store_true", help="one alert per line as JSON (statistics as JSON on stderr)")
    p.add_argument("--inventory", action="append", default=[], metavar="INV",
                   help="VM inventory: a TOML file, qmp:SOCKET (a QEMU's NIC MACs) or lab:NAME; repeatable")  # fmt: skip
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--stats-interval", type=float, help="also print statistics every S seconds")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between detection cycles (default 1)")
    p.add_argument("--horizon", type=float, default=30.0, help="seconds observations stay in the window (default 30)")
    p.add_argument("--detectors", help="comma-separated network detectors (default: all of them)")
    p.add_argument("--rules", action="append", help="rules file or directory (default: rules/ and rules/network/)")
    p.add_argument("--signatures", help="directory with ioc/ and network/ (default: the active bundle of "
                   "`sva sigs` ($SVA_SIGS_DIR), else the built-in signatures/)")  # fmt: skip
    p.add_argument("--bpf", help="a tcpdump filter for iface sources")
    p.add_argument("--jsonl", help="also append every published event to this JSON-lines file")
    p.set_defaults(func=cmd_net)


def _inventory(specs: list[str], lab_name: str | None) -> Any:
    from sva.net.inventory import Inventory, from_lab, from_qmp, load_inventory

    inv = from_lab(lab_name) if lab_name else Inventory()
    for spec in specs:
        if spec.startswith("qmp:"):
            inv = inv.merged(from_qmp(spec[4:]))
        elif spec.startswith("lab:"):
            if spec[4:] != lab_name:
                inv = inv.merged(from_lab(spec[4:]))
        else:
            inv = inv.merged(load_inventory(spec))
    return inv


def _open(source: str, bpf: str | None) -> tuple[Any, str | None]:
    """The capture source, and the lab guest's name for `lab:NAME`."""
    from sva.net.capture import open_source

    if source.startswith("lab:"):
        from sva import lab

        name = source[4:]
        guest = lab.get(name)
        return open_source(f"qemu-mirror:{guest.mirror_path}"), name
    if Path(source).suffix in (".pcap", ".pcapng", ".cap") and not source.startswith(("iface:", "qemu-mirror:")):
        return open_source(source if source.startswith("pcap:") else f"pcap:{source}"), None
    return open_source(source, bpf=bpf), None


def _active_signatures() -> Path | None:
    """The installed, verified bundle `sva sigs` activated (its files have the layout of the
    built-in signatures/: ioc/, network/), or None: the built-in signatures are used."""
    try:
        from sva.sigs.store import SignatureStore

        target = SignatureStore().link_target("active")
    except Exception:  # noqa: BLE001 - no usable store is the ordinary case: use the built-in set
        return None
    files = target / "files" if target is not None else None
    return files if files is not None and files.is_dir() else None


def _stats_text(c: Any) -> str:
    j = c.to_json()
    reasons = ", ".join(f"{k} {v}" for k, v in j["malformed_reasons"].items())
    return (
        f"stats {j['source']}: {j['packets']} packets, {j['bytes']} bytes in {j['elapsed']:.1f} s "
        f"({j['packets_per_second']:.0f} packets/s); drops: kernel {j['kernel_drops']}, ring {j['ring_drops']}; "
        f"truncated {j['truncated']}, malformed {j['malformed']}" + (f" ({reasons})" if reasons else "")
        + f"; fragments {j['fragments']}, VLAN-tagged {j['vlan_tagged']}, non-IP {j['non_ip']}; "
        f"flows evicted {j['flows_evicted']}, deep-decode errors {j['deep_errors']}, "
        f"observations dropped {j['records_dropped']}, windows truncated {j['windows_truncated']}"
    )


def cmd_net(args: argparse.Namespace) -> int:
    from sva.engine.registry import load_detectors
    from sva.engine.report import render_alert
    from sva.net.ioc import load_iocs
    from sva.net.monitor import Limits, NetMonitor, load_network_rules
    from sva.scan.rules import CompiledRuleSet, signatures_dir

    for flag in ("duration", "stats_interval", "interval", "horizon"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive")
    rules = load_network_rules(args.rules)
    detectors = None
    if args.detectors:
        names = [n.strip() for n in args.detectors.split(",") if n.strip()]
        if not names:
            raise ConfigError("--detectors: no detector named")
        detectors = load_detectors(names)
    sig_dir = Path(args.signatures) if args.signatures else _active_signatures() or signatures_dir()
    iocs = load_iocs(sig_dir / "ioc") if (sig_dir / "ioc").is_dir() else None
    yara_dir = sig_dir / "network"
    payload_rules = CompiledRuleSet.load(yara_dir) if yara_dir.is_dir() else None
    sinks: list[Any] = []
    if args.jsonl:
        from sva.engine.sinks import jsonl_sink

        sinks.append(jsonl_sink(args.jsonl))

    source, lab_name = _open(args.source, args.bpf)
    try:
        monitor = NetMonitor(
            source, inventory=_inventory(args.inventory, lab_name), rules=rules, detectors=detectors, iocs=iocs,
            payload_rules=payload_rules, sinks=sinks, limits=Limits(interval=args.interval, horizon=args.horizon),
            name=f"net:{args.source}",
        )  # fmt: skip
    except BaseException:
        source.close()  # a mirror socket left open would stall the guest's NIC
        raise

    stop = threading.Event()
    want_stats = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: want_stats.set())

    def print_stats() -> None:
        c = monitor.counters()
        text = json.dumps({"stats": c.to_json()}) if args.json else _stats_text(c)
        print(text, file=sys.stderr, flush=True)

    last_stats = [monitor.started]

    def on_idle() -> None:
        if want_stats.is_set():
            want_stats.clear()
            print_stats()
        if args.stats_interval and time.monotonic() - last_stats[0] >= args.stats_interval:
            last_stats[0] = time.monotonic()
            print_stats()

    def on_report(report: Any) -> None:
        for alert in (*report.new, *report.changed):
            if args.json:
                print(json.dumps(alert.to_json(), sort_keys=True), flush=True)
            else:
                print(render_alert(alert) + "\n", flush=True)
        for h in report.health:
            if h.details.get("reason") == "resolved":
                continue
            text = json.dumps({"health": h.to_payload()}) if args.json else f"health: {h.status.value} {h.component}: {h.message}"
            print(text, file=sys.stderr, flush=True)

    # Everything alive now (scapy's layers, compiled rules, the inventory) lives as long as
    # the process: keep it out of the cyclic GC's passes, which otherwise walk it again and
    # again while packets allocate (measured: ~25% more packets per CPU second).
    gc.collect()
    gc.freeze()
    try:
        summary = monitor.run(stop, duration=args.duration, on_report=on_report, on_idle=on_idle)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
    print_stats()
    if not args.json:
        print(f"sva net: {summary.cycles} cycles, {summary.alerts} alerts, stopped: {summary.stopped_by}",
              file=sys.stderr)  # fmt: skip
    return 1 if summary.alerts else 0
