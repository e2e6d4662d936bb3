"""`sva lab`: boot, list, use and stop lab guests."""

from __future__ import annotations

import argparse
import sys

from sva.cli import print_json
from sva.errors import LabError
from sva.lab import guest as lab
from sva.lab.paths import format_mem


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("lab", help="small QEMU lab guests for tests and demos")
    lsub = p.add_subparsers(dest="lab_command", metavar="LAB_COMMAND")
    lsub.required = True

    # Values are checked by the library, not by argparse `choices`, so a bad one gives
    # the same one-line error from the CLI and from Python.
    q = lsub.add_parser("up", help="boot a lab guest and wait for its shell")
    q.add_argument("name")
    q.add_argument("--scenario", default="clean", help="clean (default) or infected")
    q.add_argument("--mem", default="256M", help="guest RAM, e.g. 256M or 3G (minimum 128M)")
    q.add_argument(
        "--kernel",
        default="auto",
        help="'auto' (= debian:cloud), 'debian:generic' (Debian's linux-image-amd64) or a bzImage path",
    )
    q.add_argument("--initrd-extra", metavar="DIR", help="copy this directory tree into the initramfs")
    q.add_argument("--accel", default="auto", help="auto (KVM only if it really works), tcg or kvm")
    q.add_argument("--timeout", type=float, default=lab.BOOT_TIMEOUT, help="seconds to wait for the shell")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_up)

    q = lsub.add_parser("list", help="lab guests and whether they run")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_list)

    q = lsub.add_parser("down", help="stop a lab guest and remove its runtime files")
    q.add_argument("name")
    q.set_defaults(func=cmd_down)

    q = lsub.add_parser("exec", help="run a shell command in a lab guest (exit status is the command's)")
    q.add_argument("name")
    q.add_argument("--timeout", type=float, default=30.0, help="seconds before the command is interrupted")
    # REMAINDER keeps the guest command's own options away from argparse; it also takes
    # a --timeout that follows NAME, which cmd_exec picks out again.
    q.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    q.set_defaults(func=cmd_exec)

    q = lsub.add_parser("ps", help="the guest's own process list (pid, ppid, comm)")
    q.add_argument("name")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_ps)


def cmd_up(args: argparse.Namespace) -> int:
    g = lab.up(
        args.name,
        scenario=args.scenario,
        mem=args.mem,
        kernel=args.kernel,
        initrd_extra=args.initrd_extra,
        accel=args.accel,
        timeout=args.timeout,
    )
    if args.json:
        print_json(g.to_dict())
        return 0
    print(f"lab {g.name}: up in {g.boot_seconds:.1f}s ({g.accel}, kernel {g.kernel_version}, scenario {g.scenario})")
    for label, value in (
        ("pid", g.pid),
        ("qmp", g.qmp_path),
        ("serial", g.serial_path),
        ("ram", f"{g.mem_path} ({format_mem(g.mem_size)})"),
        ("mirror", g.mirror_path),
        ("network", f"{'on' if g.network else 'off'}: {g.network_note}"),
    ):
        print(f"  {label:<8} {value}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    guests = lab.list_guests(include_stopped=True)
    rows = [(g, g.is_running()) for g in guests]
    if args.json:
        print_json([{**g.to_dict(), "running": running} for g, running in rows])
        return 0
    if not rows:
        print("no lab guests")
        return 0
    print(f"{'NAME':<16} {'STATE':<8} {'PID':>8} {'MEM':>6} {'ACCEL':<5} {'SCENARIO':<9} QMP")
    for g, running in rows:
        state = "running" if running else "dead"
        mem = format_mem(g.mem_size)
        print(f"{g.name:<16} {state:<8} {g.pid:>8} {mem:>6} {g.accel:<5} {g.scenario:<9} {g.qmp_path}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = lab.down(args.name)
    print(f"lab {args.name}: {'stopped' if stopped else 'cleaned up (its qemu was not running)'}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    timeout, cmd = _split_exec_args(args.name, args.timeout, list(args.cmd))
    if not cmd:
        raise LabError(f"lab {args.name}: no command given; use `sva lab exec {args.name} -- CMD...`")
    result = lab.exec_in(args.name, " ".join(cmd), timeout=timeout)
    sys.stdout.write(result.output)
    sys.stdout.flush()
    return result.status


def _split_exec_args(name: str, timeout: float, rest: list[str]) -> tuple[float, list[str]]:
    """Take `--timeout S` / `--timeout=S` before `--` off the command words."""
    while rest and rest[0].startswith("--timeout"):
        opt, eq, value = rest[0].partition("=")
        if opt != "--timeout":
            break
        if not eq:
            if len(rest) < 2:
                raise LabError(f"lab {name}: --timeout needs a number of seconds")
            value, rest = rest[1], rest[2:]
        else:
            rest = rest[1:]
        try:
            timeout = float(value)
        except ValueError:
            raise LabError(f"lab {name}: --timeout {value!r} is not a number of seconds") from None
    if rest and rest[0] == "--":
        rest = rest[1:]
    return timeout, rest


def cmd_ps(args: argparse.Namespace) -> int:
    procs = lab.ps(args.name)
    if args.json:
        print_json([{"pid": p.pid, "ppid": p.ppid, "comm": p.comm, "args": p.args} for p in procs])
        return 0
    print(f"{'PID':>6} {'PPID':>6} {'COMM':<16} ARGS")
    for p in procs:
        print(f"{p.pid:>6} {p.ppid:>6} {p.comm:<16} {p.args}")
    return 0
