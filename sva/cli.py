"""The `sva` command line.

Each command group lives in its own module with a `register(subparsers)` function that
adds its parsers and sets `func(args) -> int` on them. Errors derived from SvaError
become one line on stderr and exit status 2; a traceback is a bug.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from sva import __version__
from sva.errors import SvaError

# Ordered: the order of commands in `sva --help`.
COMMAND_MODULES = ("sva.vmi.cli", "sva.symbols.cli", "sva.guest.cli", "sva.lab.cli", "sva.bus.cli", "sva.engine.cli", "sva.engine.scan_cli", "sva.sigs.cli", "sva.net.cli", "sva.qmpproxy.cli", "sva.daemon.cli")


def print_json(obj: Any) -> None:
    """Machine output: one JSON document on stdout."""
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sva", description="VM-introspection security appliance")
    parser.add_argument("--version", action="version", version=f"sva {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SvaError as e:
        print(f"sva {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sva {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
