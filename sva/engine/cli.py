"""`sva rules`: check and list detection rules.

    sva rules check [PATH ...]    exit 0 when valid, 1 with `file:line: message` lines when not
    sva rules list [PATH ...]     the rules, their kind, maturity, severity and ATT&CK ids

PATH is a rules file or a directory of *.toml files (default: $SVA_RULES_DIR, the
repository's rules/, or /etc/sva/rules, with its network/ subdirectory). A missing path is a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sva.cli import print_json
from sva.engine.ruleload import check_rules
from sva.engine.rules import Maturity, default_rules_dir


def _default_paths() -> list[Path]:
    """The rules dir, and its network/ subdirectory (the rules `sva net` loads) if present."""
    d = default_rules_dir()
    return [d, *([d / "network"] if (d / "network").is_dir() else [])]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("rules", help="check and list detection rules")
    rsub = p.add_subparsers(dest="rules_command", metavar="RULES_COMMAND")
    rsub.required = True

    q = rsub.add_parser("check", help="validate rule files: `file:line: message` per problem, exit 1 if any")
    q.add_argument("paths", nargs="*", metavar="PATH", help="a rules file or directory (default: the rules dir)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_check)

    q = rsub.add_parser("list", help="the rules in force and what they are")
    q.add_argument("paths", nargs="*", metavar="PATH", help="a rules file or directory (default: the rules dir)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_list)


def _register_plugin_rule_kinds() -> None:
    # Detector modules may register rule kinds of their own; importing them makes those
    # kinds known. A broken detector must not stop a rules check.
    from sva.engine.registry import discover

    discover()


def cmd_check(args: argparse.Namespace) -> int:
    _register_plugin_rule_kinds()
    paths = args.paths or _default_paths()
    ruleset, errors = check_rules(paths, frozenset(Maturity))
    if args.json:
        print_json({
            "valid": not errors,
            "errors": [{"file": e.path, "line": e.line, "message": e.reason} for e in errors],
            "files": [f.path for f in ruleset.files],
            "rules": len(ruleset.rules),
            "suppressions": len(ruleset.suppressions),
        })  # fmt: skip
        return 1 if errors else 0
    for e in errors:
        print(str(e))
    if errors:
        print(f"sva rules check: {len(errors)} error(s)", file=sys.stderr)
        return 1
    print(f"ok: {len(ruleset.rules)} rules, {len(ruleset.suppressions)} suppressions in {len(ruleset.files)} file(s)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    _register_plugin_rule_kinds()
    paths = args.paths or _default_paths()
    ruleset, errors = check_rules(paths, frozenset(Maturity))
    for e in errors:
        print(str(e), file=sys.stderr)
    if args.json:
        print_json([
            {"id": r.id, "kind": r.KIND, "version": r.version, "maturity": r.maturity.value,
             "severity": r.severity.value, "mitre": list(r.mitre), "title": r.title, "source": r.source,
             "enabled": r.enabled}
            for r in ruleset.rules
        ])  # fmt: skip
    else:
        for r in ruleset.rules:
            off = "" if r.enabled else " (disabled)"
            print(f"{r.id:<28} {r.KIND:<13} v{r.version:<3} {r.maturity.value:<11} {r.severity.value:<8} "
                  f"{','.join(r.mitre):<18} {r.title}{off}")  # fmt: skip
        for s in ruleset.suppressions:
            print(f"{s.id:<28} {'suppression':<13} {s.reason}")
    return 1 if errors else 0
