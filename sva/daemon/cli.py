"""`sva run --config FILE`: the appliance daemon (docs/admin.md).

    sva run --config /etc/sva/sva.toml          run until SIGTERM/SIGINT; SIGHUP reloads
    sva run --config FILE --check               load and check the config, print a summary, exit

Exit status: 0 stopped cleanly (SIGTERM/SIGINT); 2 the config or a start-up step failed
(one line naming the key, file or endpoint); 3 stopped, but a worker did not finish its
cycle within the shutdown grace time (its guest may need a look).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

from sva.daemon.config import DEFAULT_CONFIG_PATH

EXIT_UNCLEAN = 3


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="the appliance daemon: all VMs, network sources, signatures, bus, metrics")
    p.add_argument("--config", default=os.environ.get("SVA_CONFIG") or str(DEFAULT_CONFIG_PATH),
                   help=f"the TOML config (default: $SVA_CONFIG, else {DEFAULT_CONFIG_PATH})")  # fmt: skip
    p.add_argument("--check", action="store_true", help="only load and check the config")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from sva.daemon import logs
    from sva.daemon.config import load
    from sva.daemon.supervisor import Daemon

    cfg = load(args.config)
    if args.check:
        print(f"{cfg.path}: ok: {len(cfg.targets)} target(s), {len(cfg.network)} network source(s), "
              f"discovery {'on' if cfg.discovery.enabled else 'off'}, bus {cfg.bus.endpoint}")  # fmt: skip
        return 0
    logs.setup(cfg.appliance.log_format, cfg.appliance.log_level)
    limit_malloc_arenas()
    stop = threading.Event()
    reload = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    daemon = Daemon(cfg)
    daemon.start()
    try:
        while not stop.is_set():
            stop.wait(0.5)
            if reload.is_set():
                reload.clear()
                daemon.reload()
                logs.setup(daemon.config.appliance.log_format, daemon.config.appliance.log_level)
    finally:
        clean = daemon.shutdown()
    return 0 if clean else EXIT_UNCLEAN


M_ARENA_MAX = -8  # glibc's mallopt parameter number
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas before the worker threads start. By default each thread
    that allocates gets a pool of its own (up to 8 per core) that keeps freed memory; with
    one worker thread per VM that was 25-30 MB per VM of memory held but unused (measured
    with bench/bench_appliance.py: 42-52 MB per extra VM, 18-20 MB with 2 arenas). The
    workers mostly hold the GIL, so they seldom contend for an arena. MALLOC_ARENA_MAX in
    the environment wins. False where this is not glibc."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
