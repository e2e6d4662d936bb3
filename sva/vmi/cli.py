"""`sva info` and `sva snapshot`: look at a VMI target and copy its memory."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sva.cli import print_json
from sva.errors import ConfigError
from sva.vmi import open_target
from sva.vmi.base import MappedBackend


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("info", help="memory layout, vCPUs and capabilities of a target")
    p.add_argument("target", help="qemu:SOCKET, lab:NAME, file:PATH (raw/ELF/LiME), raw:|elf:|lime:PATH")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("snapshot", help="copy a target's memory to a file (guest paused during the copy)")
    p.add_argument("target")
    p.add_argument("out", help="output file")
    p.add_argument("--format", choices=("raw", "elf", "lime"), default="raw")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_snapshot)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def describe(backend: MappedBackend) -> dict[str, Any]:
    """Everything `sva info` reports, as plain data."""
    vcpus: list[dict[str, int]] = []
    if backend.capabilities.registers:
        vcpus = [backend.regs(i).to_json() for i in range(backend.vcpu_count)]
    return {
        "target": backend.target,
        "backend": type(backend).__name__,
        "capabilities": backend.capabilities.to_json(),
        "memory_size": backend.memory_size,
        "memory_map": backend.memory_map.to_json(),
        "backing_file": backend.path,
        "vcpu_count": backend.vcpu_count,
        "vcpus": vcpus,
    }


def cmd_info(args: argparse.Namespace) -> int:
    with open_target(args.target) as backend:
        info = describe(backend)
    if args.json:
        print_json(info)
        return 0
    caps = [k for k, v in info["capabilities"].items() if v and k != "write"]
    print(f"target       {info['target']}")
    print(f"backend      {info['backend']} ({', '.join(caps) or 'read only'}; never writes guest memory)")
    print(f"backing file {info['backing_file']}")
    print(f"memory       {_size(info['memory_size'])} in {len(info['memory_map'])} region(s)")
    for r in info["memory_map"]:
        end = r["gpa"] + r["size"] - 1
        print(f"  GPA 0x{r['gpa']:012x}-0x{end:012x}  {_size(r['size']):>10}  at file offset 0x{r['offset']:x}")
    print(f"vCPUs        {info['vcpu_count']}")
    for v in info["vcpus"]:
        print(
            f"  vCPU {v['vcpu']}: RIP 0x{v['rip']:016x} RSP 0x{v['rsp']:016x} CR3 0x{v['cr3']:x} "
            f"CR0 0x{v['cr0']:x} CR4 0x{v['cr4']:x} EFER 0x{v['efer']:x} "
            f"IDT 0x{v['idtr_base']:x}/{v['idtr_limit']:#x} GDT 0x{v['gdtr_base']:x}/{v['gdtr_limit']:#x}"
        )
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from sva.vmi import snapshot as formats

    writers = {"raw": formats.write_raw, "elf": formats.write_elf, "lime": formats.write_lime}
    if args.out == "-":
        raise ConfigError("snapshot: OUT must be a file path, not stdout")
    with open_target(args.target) as backend:
        with backend.frozen() as pause:
            regs = None
            if backend.capabilities.registers:
                regs = [backend.regs(i) for i in range(backend.vcpu_count)]
            if args.format == "elf":
                formats.write_elf(backend, args.out, regs)
            else:
                writers[args.format](backend, args.out)
        size = backend.memory_size
    result = {
        "target": args.target,
        "out": args.out,
        "format": args.format,
        "memory_size": size,
        "paused_seconds": pause.seconds,
    }
    if args.json:
        print_json(result)
    else:
        print(
            f"{args.target}: wrote {_size(size)} of guest memory to {args.out} ({args.format}); "
            f"guest paused {pause.seconds * 1000:.1f} ms"
        )
    return 0
