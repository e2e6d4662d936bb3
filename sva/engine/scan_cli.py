"""`sva scan` (one full cycle) and `sva watch` (the loop) on one target.

Wiring only: a backend from the target string, volatility3 facts from a `GuestSession`,
the backend's own facts, the rules, the detectors, a stdout/JSON-lines sink.
Exit status of `sva scan`: 0 clean, 1 findings, 2 error (as yara and clamscan do).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from sva.cli import print_json
from sva.errors import ConfigError, SvaError

def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("target", help="lab:NAME, qemu:SOCKET, file:PATH, libvmi+file:PATH, …")
        p.add_argument("--detectors", help="comma-separated detector names (default: the built-in list)")
        p.add_argument("--rules", action="append", help="rules file or directory (default: rules/)")
        p.add_argument("--isf-dir", action="append", default=[], help="directory of ready ISF files")
        p.add_argument("--jsonl", help="also append every published event to this JSON-lines file")
        p.add_argument("--signatures", metavar="PATH",
                       help="memory YARA rules: a rule directory or a signed bundle file (default: the signature "
                            "store's active bundle, else the built-in signatures/)")

    p = sub.add_parser("scan", help="one full detection cycle on a target; exit 1 when something is found")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("watch", help="scan a target continuously, printing alerts as they happen")
    common(p)
    p.add_argument("--interval", type=float, default=5.0, help="seconds between cycle starts")
    p.add_argument("--cycles", type=int, help="stop after this many cycles")
    p.add_argument("--sweep-every", type=int, default=1, metavar="N",
                   help="spread the sweep of all RAM for task structs and the module area carve over N cycles, "
                        "1/N each (default 1: all every cycle); a hidden task or module at a new address is "
                        "found within N cycles (rules/README.md, 'Pause time')")
    p.set_defaults(func=cmd_watch)


def build_engine(args: argparse.Namespace, backend: Any, sinks: list[Any], **engine_options: Any) -> Any:
    """The engine `sva scan`/`sva watch` run; `engine_options` go to Engine (benchmarks)."""
    names = None
    if args.detectors:
        names = [n.strip() for n in args.detectors.split(",") if n.strip()]
        if not names:
            raise ConfigError("--detectors: no detector named")
    sweep = getattr(args, "sweep_every", 1)
    if sweep < 1:
        raise ConfigError(f"--sweep-every must be at least 1, not {sweep}")
    engine, _session = assemble_engine(
        args.target, backend, sinks, vm_name=args.target.split(":", 1)[-1].rsplit("/", 1)[-1],
        rules=args.rules or (), detectors=names, isf_dirs=args.isf_dir, signature_scan=_signature_scan(args),
        sweep_every=sweep, **engine_options,
    )  # fmt: skip
    return engine


def assemble_engine(
    target: str,
    backend: Any,
    sinks: list[Any],
    *,
    vm_name: str,
    rules: Any = (),
    detectors: list[str] | None = None,
    isf_dirs: list[str] | tuple[str, ...] = (),
    signature_scan: Any = None,
    sweep_every: int = 1,
    **engine_options: Any,
) -> tuple[Any, Any]:
    """An Engine over `backend` with the guest-semantics facts, and its GuestSession.

    The reusable core of `build_engine` (the daemon's workers call it per VM): `rules` are
    rule files/directories (empty: rules/), `detectors` names (None: the built-in list),
    `signature_scan` a YaraMemoryScan (None: the active bundle). The session is returned
    so a caller can tell whether the guest's symbols were found (`attached`)."""
    from sva.engine.engine import Engine
    from sva.engine.facts import FactRegistry, backend_fact_providers
    from sva.engine.model import VmIdentity
    from sva.engine.registry import default_detectors, load_detectors
    from sva.engine.ruleload import load_rules
    from sva.engine.rules import default_rules_dir
    from sva.guest.facts import GuestSession
    from sva.guest.integrity import integrity_providers
    from sva.guest.memscan import memory_providers
    from sva.guest.views import view_providers

    ruleset = load_rules(*(rules or [default_rules_dir()]))
    dets = load_detectors(detectors) if detectors else default_detectors()
    session = GuestSession(isf_dirs=list(isf_dirs))
    try:
        session.attach(backend)
    except SvaError:
        pass  # facts that need it become Unavailable (with the reason) in the cycle
    scan = signature_scan if signature_scan is not None else _signature_scan(argparse.Namespace(signatures=None))
    facts = FactRegistry([
        *backend_fact_providers(), *session.providers(), *memory_providers(session, scan),
        *view_providers(session, sweep_every), *integrity_providers(session, sweep_every),
    ])  # fmt: skip
    vm = VmIdentity(name=vm_name, target=target)
    engine = Engine(vm, rules=ruleset, detectors=dets, facts=facts, backend=backend, sinks=sinks, **engine_options)
    return engine, session


def _signature_scan(args: argparse.Namespace) -> Any:
    from sva.sigs.active import scan_state

    return scan_state(getattr(args, "signatures", None))


def _sinks(args: argparse.Namespace) -> list[Any]:
    from sva.engine.sinks import jsonl_sink

    return [jsonl_sink(args.jsonl)] if args.jsonl else []


def cmd_scan(args: argparse.Namespace) -> int:
    from sva.engine.report import render_text, report_json
    from sva.vmi import open_target

    with open_target(args.target) as backend:
        engine = build_engine(args, backend, _sinks(args))
        try:
            report = engine.run_cycle()
        finally:
            engine.close()
    if args.json:
        print_json(report_json(report))
    else:
        print(render_text(report))
    if report.error:
        return 2
    return 1 if (report.new or report.changed or report.still_present) else 0


def cmd_watch(args: argparse.Namespace) -> int:
    from sva.engine.report import render_alert
    from sva.vmi import open_target

    if args.interval <= 0:
        raise ConfigError("--interval must be positive")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def on_cycle(report: Any) -> None:
        for alert in (*report.new, *report.changed, *report.resolved):
            print(render_alert(alert), flush=True)
        for h in report.health:
            print(f"health: {h}", file=sys.stderr, flush=True)

    with open_target(args.target) as backend:
        engine = build_engine(args, backend, _sinks(args))
        try:
            engine.run(args.interval, stop, on_cycle=on_cycle, max_cycles=args.cycles)
        finally:
            engine.close()
    return 0
