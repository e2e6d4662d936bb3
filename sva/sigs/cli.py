"""`sva sigs …`: publisher tools (keygen, pack, verify) and the appliance's updater
(update, install, status, rollback). See docs/signatures.md."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

from sva.cli import print_json
from sva.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sigs = sub.add_parser("sigs", help="signature bundles: keys, packing, verifying, updating, status")
    ssub = sigs.add_subparsers(dest="sigs_command", metavar="ACTION")
    ssub.required = True

    p = ssub.add_parser("keygen", help="a new Ed25519 publisher keypair: DIR/NAME.key (0600) and DIR/NAME.pub")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--name", default="publisher")
    p.add_argument("--force", action="store_true", help="replace an existing keypair")
    p.set_defaults(func=cmd_keygen)

    p = ssub.add_parser("pack", help="check a directory of rules and IOC lists and write a signed bundle")
    p.add_argument("dir", type=Path)
    p.add_argument("--key", type=Path, required=True, metavar="SECRET", help="publisher secret key file")
    p.add_argument("--name", help="bundle name (default: name in DIR/manifest.toml)")
    p.add_argument("--version", type=int, help="bundle version: an integer above every earlier one")
    p.add_argument("--min-sva-version", help="oldest sva that may use it (default: this one)")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="BUNDLE")
    p.add_argument("--index", action="store_true", help="also write index.json beside BUNDLE (a feed directory)")
    p.add_argument("--max-rule-ms-per-mib", type=float, default=10.0, help="slow-rule limit (default 10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pack)

    p = ssub.add_parser("verify", help="check a bundle's signature and file hashes (and, with --check, its content)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--trusted-key", action="append", type=Path, metavar="PUB", help="trusted public key or directory")
    p.add_argument("--config", help="config file with [signatures] trusted_keys (default: $SVA_CONFIG, /etc/sva/sva.toml)")
    p.add_argument("--check", action="store_true", help="also compile, time and canary-test the rules")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = ssub.add_parser("update", help="poll the configured feeds and install a newer bundle")
    _store_args(p)
    p.add_argument("--source", action="append", help="feed (https:// URL or local directory) instead of the config's")
    p.add_argument("--ca-file", type=Path, help="PEM CA certificates to trust instead of the system's")
    p.add_argument("--now", action="store_true", help="ignore the poll interval and any backoff")
    p.set_defaults(func=cmd_update)

    p = ssub.add_parser("install", help="run one bundle file through the update pipeline")
    p.add_argument("bundle", type=Path)
    _store_args(p)
    p.set_defaults(func=cmd_install)

    p = ssub.add_parser("status", help="active bundle, last check, last error, rule counts")
    p.add_argument("--state-dir", type=Path, help="signature store (default: $SVA_SIGS_DIR or /var/lib/sva/sigs)")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = ssub.add_parser("rollback", help="make the previous (last known good) bundle active again")
    _store_args(p)
    p.set_defaults(func=cmd_rollback)


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config file with a [signatures] section (default: $SVA_CONFIG, /etc/sva/sva.toml)")
    p.add_argument("--state-dir", type=Path, help="signature store (default: $SVA_SIGS_DIR or /var/lib/sva/sigs)")
    p.add_argument("--trusted-key", action="append", type=Path, metavar="PUB", help="trusted public key or directory")
    p.add_argument("--jsonl", help="append the sigs events (updated/rejected) to this JSON-lines file")
    p.add_argument("--json", action="store_true")


def _config(args: argparse.Namespace) -> Any:
    from sva.sigs.config import check_source, load_config

    cfg = load_config(getattr(args, "config", None))
    changes: dict[str, Any] = {}
    if getattr(args, "state_dir", None):
        changes["state_dir"] = args.state_dir
    if getattr(args, "trusted_key", None):
        changes["trusted_keys"] = tuple(args.trusted_key)
    if getattr(args, "source", None):
        changes["sources"] = tuple(check_source(s, "--source") for s in args.source)
    if getattr(args, "ca_file", None):
        changes["ca_file"] = args.ca_file
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _refresher(args: argparse.Namespace) -> Any:
    from sva.sigs.pipeline import Refresher

    # every outcome is printed below; the pipeline's log warnings would say it twice
    logging.getLogger("sva.sigs").setLevel(logging.ERROR)

    sink = None
    if getattr(args, "jsonl", None):
        from sva.bus.sink import JsonLinesSink

        sink = JsonLinesSink(args.jsonl)
    return Refresher(_config(args), sink=sink)


def cmd_keygen(args: argparse.Namespace) -> int:
    from sva.sigs.keys import generate, load_public

    secret, public = generate(args.out, args.name, force=args.force)
    print(f"secret key: {secret} (mode 0600: keep it off the appliances)")
    print(f"public key: {public} (key id {load_public(public).id}; give it to appliances as a trusted key)")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from sva.scan.cost import SlowRulePolicy
    from sva.sigs.fetch import write_index
    from sva.sigs.keys import load_secret
    from sva.sigs.pack import pack

    key = load_secret(args.key)
    res = pack(args.dir, key, args.out, name=args.name, version=args.version, min_sva_version=args.min_sva_version,
               policy=SlowRulePolicy(max_rule_ms_per_mib=args.max_rule_ms_per_mib))
    index = write_index(args.out.parent, res.manifest.name, args.out, res.manifest.version) if args.index else None
    if args.json:
        print_json({"bundle": str(res.path), "name": res.manifest.name, "version": res.manifest.version,
                    "key_id": key.public.id, "counts": dict(res.report.counts), "skipped": list(res.skipped),
                    "index": str(index) if index else None})
    else:
        c = res.report.counts
        print(f"{res.path}: {res.manifest.name} version {res.manifest.version}, signed by {key.public.id}: "
              f"{c.get('memory_rules', 0)} memory rules, {c.get('network_rules', 0)} network rules, "
              f"{c.get('ioc_ip', 0)} IPs, {c.get('ioc_domain', 0)} domains, {c.get('ioc_hash', 0)} hashes")
        for s in res.skipped:
            print(f"  not in the bundle: {s}")
        if index:
            print(f"feed index: {index}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from sva.sigs.bundle import read_bundle
    from sva.sigs.config import load_config
    from sva.sigs.keys import load_trusted

    cfg = load_config(args.config)
    trusted = load_trusted(args.trusted_key or cfg.trusted_keys)
    if not trusted:
        raise ConfigError("no trusted keys: give --trusted-key PUB (or [signatures] trusted_keys)")
    try:
        data = args.bundle.read_bytes()
    except OSError as e:
        raise ConfigError(f"{args.bundle}: cannot read: {e.strerror or e}") from None
    b = read_bundle(data, trusted, cfg.limits, str(args.bundle))
    counts: dict[str, int] = {}
    if args.check:
        from sva.scan.cost import SlowRulePolicy
        from sva.sigs.pack import validate

        policy = SlowRulePolicy(max_rule_ms_per_mib=cfg.max_rule_ms_per_mib, sample_size=cfg.sample_size)
        counts = dict(validate(b, policy, None, str(args.bundle)).counts)
    out = {"bundle": str(args.bundle), "name": b.manifest.name, "version": b.version, "key_id": b.key_id,
           "created": b.manifest.created, "files": len(b.manifest.files), "sha256": b.sha256, "counts": counts}
    if args.json:
        print_json(out)
    else:
        print(f"{args.bundle}: OK: {b.manifest.name} version {b.version}, created {b.manifest.created}, "
              f"signed by trusted key {b.key_id}, {len(b.manifest.files)} files, hashes match"
              + (f"; {counts.get('memory_rules', 0)} memory rules pass compile, timing and canary" if args.check else ""))
    return 0


def _report(results: list[Any], as_json: bool) -> int:
    from sva.sigs.pipeline import Outcome

    if as_json:
        print_json([r.to_json() for r in results])
    else:
        for r in results:
            print(r, file=sys.stderr if r.outcome is Outcome.REJECTED else sys.stdout)
    return 2 if any(r.outcome is Outcome.REJECTED for r in results) else 0


def cmd_update(args: argparse.Namespace) -> int:
    ref = _refresher(args)
    if not ref.config.sources:
        raise ConfigError("no feeds: give --source URL|DIR (or [signatures] sources)")
    return _report(ref.check(force=args.now), args.json)


def cmd_install(args: argparse.Namespace) -> int:
    try:
        data = args.bundle.read_bytes()
    except OSError as e:
        raise ConfigError(f"{args.bundle}: cannot read: {e.strerror or e}") from None
    return _report([_refresher(args).install_bytes(data, str(args.bundle))], args.json)


def cmd_rollback(args: argparse.Namespace) -> int:
    active, previous = _refresher(args).rollback()
    if args.json:
        print_json({"active": active.to_json(), "previous": previous.to_json()})
    else:
        print(f"active: {active.name} version {active.version} (rolled back from version {previous.version})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sva.sigs.pipeline import status
    from sva.sigs.store import SignatureStore

    st = status(SignatureStore(args.state_dir or _config(args).state_dir))
    if args.json:
        print_json(st)
        return 0
    a = st["active"]
    counts = ", ".join(f"{k} {v}" for k, v in sorted((a.get("counts") or {}).items()))
    if a.get("version") is None:
        print(f"active: built-in bundle ({a['source']}); {counts}")
    else:
        print(f"active: {a['name']} version {a['version']} from {a['source']}, "
              f"activated {_when(a['activated'])}, key {a['key_id']}; {counts}")
    p = st["previous"]
    print(f"previous: {p['name']} version {p['version']}" if p else "previous: none")
    print(f"last check: {_when(st['last_check'])} ({st['last_result'] or 'never'})")
    err = st["last_error"]
    print(f"last error: {_when(err['time'])}: [{err['reason']}] {err['message']}" if err else "last error: none")
    c = st["counts"]
    print("counts: " + (", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"))
    for src, s in sorted(st["sources"].items()):
        extra = f", {s['failures']} failures, next try {_when(s['next_try'])}" if s.get("failures") else ""
        print(f"source {src}: last check {_when(s.get('last_check'))}{extra}")
    return 0


def _when(ts: float | None) -> str:
    if not ts:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
