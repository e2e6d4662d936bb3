"""`sva keys …` (CURVE keys for the bus) and `sva alerts …` (read the bus)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from sva.bus.config import DEFAULT_ENDPOINT, check_endpoint, default_replay_endpoint
from sva.bus.event import Event, Severity
from sva.bus.keys import authorize, authorized_keys, default_keys_dir, generate, load_certificate
from sva.bus.render import render, severity_of
from sva.bus.replay import ClientSecurity, ReplayClient
from sva.bus.subscriber import BusSubscriber, Lost, security_from_keys_dir
from sva.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = sub.add_parser("keys", help="CURVE keys of the alert bus")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    ksub.required = True
    p = ksub.add_parser("gen", help="create the server keypair (if missing) and a client keypair, authorized")
    _keys_dir_arg(p)
    p.add_argument("--client", default="client", help="name of the client keypair (default: client)")
    p.add_argument("--force", action="store_true", help="replace an existing server or client keypair")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys_gen)
    p = ksub.add_parser("authorize", help="allow a client public key (Z85 text or a .key file)")
    p.add_argument("pubkey")
    _keys_dir_arg(p)
    p.add_argument("--name", help="file name under authorized/ (default: from the key)")
    p.set_defaults(func=cmd_keys_authorize)
    p = ksub.add_parser("list", help="show the server public key and the authorized client keys")
    _keys_dir_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys_list)

    alerts = sub.add_parser("alerts", help="read alerts and other events from the bus")
    asub = alerts.add_subparsers(dest="alerts_command", metavar="ACTION")
    asub.required = True
    p = asub.add_parser("tail", help="follow the bus: every event once, in order, gaps filled")
    _conn_args(p)
    p.add_argument("--since", type=int, metavar="N", help="start after seq N (default: new events only)")
    _filter_args(p)
    p.add_argument("--count", type=int, metavar="N", help="exit after N events")
    p.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds")
    p.set_defaults(func=cmd_tail)
    p = asub.add_parser("replay", help="print the journaled events after seq N, then exit")
    _conn_args(p)
    p.add_argument("--since", type=int, metavar="N", required=True)
    p.add_argument("--until", type=int, metavar="M", help="stop at seq M (default: the latest)")
    _filter_args(p)
    p.set_defaults(func=cmd_replay)
    p = asub.add_parser("schema", help="print a bus JSON Schema (event, alert, health, sigs, heartbeat, replay)")
    p.add_argument("name", nargs="?", default="event")
    p.set_defaults(func=cmd_schema)


def _keys_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", dest="keys_dir", type=Path, default=None,
                   help="key directory (default: $SVA_KEYS_DIR or /etc/sva/keys)")


def _conn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default=os.environ.get("SVA_BUS_ENDPOINT", DEFAULT_ENDPOINT),
                   help=f"publisher PUB endpoint (default: $SVA_BUS_ENDPOINT or {DEFAULT_ENDPOINT})")
    p.add_argument("--replay-endpoint", help="replay endpoint (default: PUB port + 1)")
    _keys_dir_arg(p)
    p.add_argument("--client", default="client", help="client keypair name under KEYS_DIR/clients/")
    p.add_argument("--server-key", type=Path, help="server public key file (default: KEYS_DIR/server.key)")
    p.add_argument("--client-key", type=Path,
                   help="client secret key file (default: KEYS_DIR/clients/CLIENT.key_secret)")
    p.add_argument("--plaintext", action="store_true", help="no CURVE (only for a publisher configured plaintext)")


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topic", action="append", default=[], metavar="PREFIX",
                   help="only topics starting with PREFIX (repeatable), e.g. sva.alert.high.")
    p.add_argument("--min-severity", metavar="S", help="only alerts at least this severe (other events pass)")
    p.add_argument("--json", action="store_true", help="one event envelope per line")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")


# ---- keys ------------------------------------------------------------------------------


def cmd_keys_gen(args: argparse.Namespace) -> int:
    d = args.keys_dir or default_keys_dir()
    g = generate(d, client=args.client, force=args.force)
    info = {
        "keys_dir": str(d),
        "server_public_key": load_certificate(g.server_public).public,
        "server_created": g.server_created,
        "server_key": str(g.server_public),
        "client_public_key": load_certificate(g.client_public).public,
        "client_key": str(g.client_public),
        "client_secret_key": str(g.client_secret),
        "authorized": str(g.authorized),
    }
    if args.json:
        from sva.cli import print_json

        print_json(info)
        return 0
    print(f"server keypair  {d / 'server.key'}{'' if g.server_created else ' (kept: already there)'}")
    print(f"                public key {info['server_public_key']}")
    print(f"client keypair  {g.client_secret} (secret, 0600: give it to the integrator)")
    print(f"                public key {info['client_public_key']}, authorized in {g.authorized}")
    return 0


def cmd_keys_authorize(args: argparse.Namespace) -> int:
    d = args.keys_dir or default_keys_dir()
    path = authorize(d, args.pubkey, args.name)
    print(f"authorized {load_certificate(path).public} ({path}); applies to new connections at once")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    d = args.keys_dir or default_keys_dir()
    server = load_certificate(d / "server.key").public if (d / "server.key").exists() else None
    keys = {p.stem: k for p, k in authorized_keys(d / "authorized").items()}
    if args.json:
        from sva.cli import print_json

        print_json({"keys_dir": str(d), "server_public_key": server, "authorized": keys})
        return 0
    print(f"server     {server or '(none: run sva keys gen)'}")
    for name, key in keys.items():
        print(f"authorized {key}  {name}")
    if not keys:
        print("authorized (none: every client is refused)")
    return 0


# ---- alerts ----------------------------------------------------------------------------


def _security(args: argparse.Namespace) -> ClientSecurity:
    if args.plaintext:
        return ClientSecurity(None)
    return security_from_keys_dir(args.keys_dir, args.client, args.server_key, args.client_key)


def _endpoints(args: argparse.Namespace) -> tuple[str, str]:
    ep = check_endpoint(args.endpoint, "--endpoint")
    rep = args.replay_endpoint or default_replay_endpoint(ep)
    return ep, check_endpoint(rep, "--replay-endpoint")


class _Printer:
    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        self.out = out
        self.json = args.json
        self.color = args.color == "always" or (
            args.color == "auto" and out.isatty() and not os.environ.get("NO_COLOR")
        )
        self.min_sev = Severity.parse(args.min_severity) if args.min_severity else None
        self.topics = tuple(args.topic)
        self.first = True

    def wants(self, ev: Event) -> bool:
        if self.topics and not ev.topic.startswith(self.topics):
            return False
        if self.min_sev is not None:
            sev = severity_of(ev)
            if sev is not None and sev < self.min_sev:
                return False
        return True

    def show(self, ev: Event) -> bool:
        if not self.wants(ev):
            return False
        if self.json:
            self.out.write(json.dumps(ev.to_json(), separators=(",", ":")) + "\n")
        else:
            if not self.first and ev.type.value == "alert":
                self.out.write("\n")
            self.out.write(render(ev, self.color) + "\n")
            self.first = False
        self.out.flush()
        return True


def _warn(text: str) -> None:
    print(f"sva alerts: warning: {text}", file=sys.stderr, flush=True)


def cmd_tail(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise ConfigError("--count must be at least 1")
    if args.since is not None and args.since < 0:
        raise ConfigError("--since must be >= 0")
    ep, rep = _endpoints(args)
    printer = _Printer(args, sys.stdout)
    security = _security(args)
    shown = 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    warned: set[str] = set()

    def lost(gone: Lost) -> None:
        _warn(f"events {gone.first}..{gone.last} cannot be recovered ({gone.reason})")

    with BusSubscriber(ep, rep, security=security, since=args.since, on_lost=lost) as sub:
        started = time.monotonic()
        while deadline is None or time.monotonic() < deadline:
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            ev = sub.recv(timeout=wait)
            if ev is not None:
                if printer.show(ev):
                    shown += 1
                    if args.count is not None and shown >= args.count:
                        break
                continue
            _status_warnings(sub, started, warned)
    return 0


def _status_warnings(sub: BusSubscriber, started: float, warned: set[str]) -> None:
    err = sub.stats.last_handshake_error
    if err and err not in warned:
        warned.add(err)
        _warn(f"{sub.endpoint}: {err}")
    hb = sub.last_heartbeat
    if hb is not None and hb.payload.get("security") == "plaintext" and "plaintext" not in warned:
        warned.add("plaintext")
        _warn("the publisher runs WITHOUT CURVE (plaintext): anyone on the network can read these events")
    if hb is not None and hb.payload.get("journal", {}).get("ok") is False:
        text = f"publisher journal failing: {hb.payload['journal'].get('error')}"
        if text not in warned:
            warned.add(text)
            _warn(text)
    silent = time.monotonic() - (sub.last_heartbeat_at or started)
    interval = float(hb.payload.get("interval_s", 2.0)) if hb is not None else 2.0
    if silent > max(5.0, 3 * interval) and "silent" not in warned:
        warned.add("silent")
        _warn(f"no heartbeat from {sub.endpoint} for {silent:.0f}s (publisher down, wrong endpoint or keys?)")
    elif silent <= 3 * interval:
        warned.discard("silent")


def cmd_replay(args: argparse.Namespace) -> int:
    if args.since < 0:
        raise ConfigError("--since must be >= 0")
    _ep, rep = _endpoints(args)
    printer = _Printer(args, sys.stdout)
    import zmq

    ctx = zmq.Context()
    client = ReplayClient(ctx, rep, _security(args), timeout=5.0)
    since = args.since
    try:
        stop = args.until
        while True:
            raw, end = client.fetch(since, until=stop, max_events=2000, topics=args.topic)
            if stop is None:
                stop = end.latest  # a snapshot: what existed when we asked
            for topic, body in raw:
                printer.show(Event.decode(body, topic))
            for first, last, reason in end.missing:
                _warn(f"events {first}..{last} are not in the journal ({reason})")
            if end.through <= since and not raw:
                break
            since = end.through
            if since >= stop or not end.more:
                break
    finally:
        client.close()
        ctx.term()
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from sva.bus.schema import schema_text

    sys.stdout.write(schema_text(args.name))
    return 0
