"""`sva symbols`: get a volatility3 symbol table for a guest (or a kernel image)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sva.cli import print_json
from sva.errors import ConfigError
from sva.symbols.sources import SymbolTable, copy_table, symbols_for_backend, symbols_for_image


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "symbols",
        help="build (or find) a volatility3 symbol table for a Linux guest from its own BTF and kallsyms",
        description=(
            "Find a volatility3 ISF for the guest's kernel: an ISF in --isf-dir matching its banner, "
            "then sva's cache, then --kernel/--system-map if given, else the guest's RAM (kallsyms + "
            "BTF). Progress goes to stderr; the table's path and origin to stdout."
        ),
    )
    p.add_argument("target", nargs="?", help="qemu:SOCKET, lab:NAME, file:PATH (omit with --kernel alone)")
    p.add_argument("-o", "--output", metavar="FILE", help="also write the table here (.json, .json.xz or .json.gz)")
    p.add_argument("--kernel", metavar="VMLINUZ", help="the guest's kernel image (bzImage or vmlinux)")
    p.add_argument("--system-map", metavar="FILE", help="a real System.map of the guest's kernel")
    p.add_argument("--isf-dir", metavar="DIR", action="append", default=[], help="look for a matching ISF here first (repeatable)")
    p.add_argument("--cache-dir", metavar="DIR", help="symbol cache (default ${SVA_CACHE_DIR:-/var/cache/sva}/symbols)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_symbols)


def cmd_symbols(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        print(f"sva symbols: {message}", file=sys.stderr, flush=True)

    cache: Path | bool = False if args.no_cache else (Path(args.cache_dir) if args.cache_dir else True)
    if args.target is None:
        if args.kernel is None:
            raise ConfigError("symbols: give a TARGET, or --kernel VMLINUZ to build from an image alone")
        table = symbols_for_image(args.kernel, system_map=args.system_map, cache_dir=cache, progress=progress)
    else:
        from sva.vmi import open_target

        with open_target(args.target) as backend:
            table = symbols_for_backend(
                backend, isf_dirs=args.isf_dir, kernel=args.kernel, system_map=args.system_map,
                cache_dir=cache, progress=progress,
            )  # fmt: skip
    written = copy_table(table.path, args.output) if args.output else None
    if args.json:
        print_json({**table.to_json(), "output": str(written) if written else None})
    else:
        _print(table, written)
    return 0


def _print(table: SymbolTable, written: Path | None) -> None:
    print(f"symbols  {table.path}")
    print(f"source   {table.source}: {table.detail}")
    print(f"banner   {table.banner}")
    if table.btf_sha256:
        print(f"BTF      sha256 {table.btf_sha256}")
    if table.kaslr_slide is not None or table.phys_base is not None:
        slide = "unknown" if table.kaslr_slide is None else f"0x{table.kaslr_slide:x}"
        base = "unknown" if table.phys_base is None else f"0x{table.phys_base:x}"
        print(f"kernel   KASLR slide {slide}, phys_base {base}")
    where = ""
    if table.source == "cache":
        where = " (from the cache)"
    elif table.cached:
        where = " (built, now in the cache)"
    print(f"time     {table.seconds:.2f} s{where}")
    if written is not None:
        print(f"written  {written}")
