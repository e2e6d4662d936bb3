"""`sva ps`, `sva modules`, `sva vol`: the guest as volatility3 sees it, with zero setup.

Symbols come from the guest's own BTF and kallsyms (or the cache, an ISF directory, a
kernel image), so any TARGET works: lab:, qemu:, file:, libvmi+file:.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sva.cli import print_json
from sva.errors import ConfigError, SvaError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("target", help="lab:NAME, qemu:SOCKET, file:PATH, libvmi+file:PATH, …")
        p.add_argument("--isf-dir", action="append", default=[], help="directory of ready ISF files to prefer")
        p.add_argument("--kernel", help="the guest's vmlinuz, if symbols should come from it")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    p = sub.add_parser("ps", help="the guest's processes, read from outside with volatility3")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("modules", help="the guest's loaded kernel modules")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_modules)

    p = sub.add_parser("vol", help="run any volatility3 plugin against a target, symbols built automatically")
    common(p)
    p.add_argument("plugin", help="e.g. linux.pslist, linux.lsmod, linux.check_syscall")
    p.add_argument("plugin_args", nargs=argparse.REMAINDER, help="the plugin's own options")
    p.add_argument("--renderer", choices=("quick", "pretty", "json", "jsonl", "csv"), default="quick")
    p.set_defaults(func=cmd_vol)


def _attach(args: argparse.Namespace) -> tuple[Any, Any]:
    from sva.guest.context import GuestContext
    from sva.vmi import open_target

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"sva: {msg}", file=sys.stderr)

    backend = open_target(args.target)
    try:
        options: dict[str, Any] = {"isf_dirs": args.isf_dir}
        if args.kernel:
            options["kernel"] = args.kernel
        gc = GuestContext.attach(backend, progress=progress, **options)
    except BaseException:
        backend.close()
        raise
    return backend, gc


def _read_frozen(args: argparse.Namespace, read: Any) -> Any:
    """Attach to the target, run `read(gc)` once with the guest frozen, detach."""
    backend, gc = _attach(args)
    try:
        with backend.frozen():
            gc.begin_cycle()
            return read(gc)
    finally:
        backend.close()


def cmd_ps(args: argparse.Namespace) -> int:
    from sva.guest.processes import list_processes

    procs = _read_frozen(args, list_processes)
    if args.json:
        print_json(
            [
                {
                    "pid": p.pid, "ppid": p.ppid, "uid": p.uid, "comm": p.comm, "argv": list(p.argv),
                    "exe": p.exe, "exe_deleted": p.exe_deleted, "start_time_ns": p.start_time,
                    "task_address": p.task_address,
                }
                for p in procs
            ]
        )
        return 0
    print(f"{'PID':>7} {'PPID':>7} {'UID':>5} {'COMM':<16} {'START(s)':>9} {'TASK':<18} ARGS / EXE")
    for p in procs:
        start = f"{p.start_time / 1e9:9.2f}" if p.start_time is not None else " " * 9
        uid = "" if p.uid is None else str(p.uid)
        where = " ".join(p.argv) if p.argv else (f"[{p.comm}]" if p.exe is None else "")
        exe = f"  ({p.exe}{' (deleted)' if p.exe_deleted else ''})" if p.exe else ""
        print(f"{p.pid:>7} {p.ppid:>7} {uid:>5} {p.comm:<16} {start} 0x{p.task_address or 0:016x} {where}{exe}")
    return 0


def cmd_modules(args: argparse.Namespace) -> int:
    from sva.guest.processes import list_modules

    mods = _read_frozen(args, list_modules)
    if args.json:
        print_json([{"name": m.name, "address": m.address, "size": m.size} for m in mods])
        return 0
    print(f"{'MODULE':<28} {'ADDRESS':<18} SIZE")
    for m in mods:
        print(f"{m.name:<28} 0x{m.address:016x} {m.size if m.size is not None else '?'}")
    return 0


def _find_plugin(name: str) -> Any:
    """A volatility3 plugin class by its CLI name (linux.pslist) or full name (linux.pslist.PsList)."""
    import volatility3.plugins
    from volatility3 import framework

    framework.import_files(volatility3.plugins, True)
    plugins = framework.list_plugins()
    low = name.lower()
    matches = [k for k in plugins if k.lower() == low or k.lower().rsplit(".", 1)[0] == low]
    if len(matches) == 1:
        return plugins[matches[0]]
    near = sorted(k.rsplit(".", 1)[0] for k in plugins if low in k.lower())[:5]
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise ConfigError(f"no volatility3 plugin named {name!r}{hint}")


def cmd_vol(args: argparse.Namespace) -> int:
    from volatility3.cli import CommandLine, text_renderer
    from volatility3.framework import exceptions, interfaces, plugins

    plugin = _find_plugin(args.plugin)
    parser = argparse.ArgumentParser(prog=f"sva vol TARGET {args.plugin}")
    CommandLine().populate_requirements_argparse(parser, plugin)
    plugin_args = parser.parse_args(args.plugin_args)

    backend, gc = _attach(args)
    ctx = gc.context
    base = "plugins"
    plugin_path = interfaces.configuration.path_join(base, plugin.__name__)
    # Every module requirement of the plugin is the guest kernel we built.
    for req in plugin.get_requirements():
        if req.__class__.__name__ == "ModuleRequirement":
            ctx.config[interfaces.configuration.path_join(plugin_path, req.name)] = gc.module.name
    CommandLine().populate_config(ctx, {plugin.__name__: plugin}, plugin_args, plugin_path)
    renderers = {
        "quick": text_renderer.QuickTextRenderer,
        "pretty": text_renderer.PrettyTextRenderer,
        "json": text_renderer.JsonRenderer,
        "jsonl": text_renderer.JsonLinesRenderer,
        "csv": text_renderer.CSVRenderer,
    }
    try:
        with backend.frozen():
            gc.begin_cycle()
            from volatility3.framework import automagic

            magics = automagic.choose_automagic(automagic.available(ctx), plugin)
            constructed = plugins.construct_plugin(ctx, magics, plugin, base, None, _no_files())
            grid = constructed.run()
            renderers[args.renderer]().render(grid)
    except exceptions.UnsatisfiedException as e:
        raise SvaError(f"{args.target}: {args.plugin}: unsatisfied requirements: {', '.join(e.unsatisfied)}") from None
    except exceptions.VolatilityException as e:
        raise SvaError(f"{args.target}: {args.plugin} failed: {e}") from None
    finally:
        backend.close()
    return 0


def _no_files() -> type:
    """A file handler that refuses: sva vol does not write plugin dumps to disk."""
    from volatility3.framework import interfaces

    class NoFiles(interfaces.plugins.FileHandlerInterface):
        def __init__(self, filename: str) -> None:
            raise SvaError(f"the plugin wanted to write {filename!r}; sva vol does not write plugin output files")

    return NoFiles
