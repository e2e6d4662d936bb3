"""`sva qmp-proxy`: run the QMP allow-list proxy on the hypervisor host.

    sva qmp-proxy --upstream /run/sva/vm1/qmp.sock --listen /run/sva-proxy/vm1.sock
    sva qmp-proxy --upstream-glob '/run/sva/*/qmp.sock' --listen-dir /run/sva-proxy
    sva qmp-proxy --upstream /run/sva/vm1/qmp.sock --stdio      (one session on stdin/stdout)

Runs until SIGTERM/SIGINT; logs one line per connection, refusal and upstream loss on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.handlers
import os
import signal
import sys

from sva.errors import ConfigError
from sva.qmpproxy.policy import DEFAULT_HMP_LINES, AllowList
from sva.qmpproxy.server import DirectoryProxy, Limits, SocketMode, UnixProxy, serve_stdio


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("qmp-proxy", help="host side: forward only the QMP commands sva needs to a guest's monitor")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--upstream", metavar="SOCK", help="the guest's QMP unix socket")
    src.add_argument("--upstream-glob", metavar="GLOB",
                     help="proxy every QMP socket matching this absolute glob, e.g. '/run/sva/*/qmp.sock'")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--listen", metavar="SOCK", help="the unix socket the appliance connects to")
    dst.add_argument("--listen-dir", metavar="DIR", help="with --upstream-glob: sockets at DIR/NAME/qmp.sock")
    dst.add_argument("--stdio", action="store_true", help="serve one session on stdin/stdout (guestfwd cmd:)")
    p.add_argument("--allow-extra", action="append", default=[], metavar="CMD",
                   help="also forward this QMP command, any arguments (e.g. dump-guest-memory); repeatable")
    p.add_argument("--allow-hmp", action="append", default=[], metavar="LINE",
                   help=f"also forward this exact 'info …' HMP line (built in: {', '.join(sorted(DEFAULT_HMP_LINES))})")
    p.add_argument("--mode", default="0600", help="permissions of the listening socket(s), octal (default 0600)")
    p.add_argument("--owner", metavar="USER", help="owner of the listening socket(s)")
    p.add_argument("--group", metavar="GROUP", help="group of the listening socket(s)")
    p.add_argument("--reply-timeout", type=float, default=Limits.reply_timeout,
                   help="seconds QEMU has to answer a forwarded command (default %(default)s)")
    p.add_argument("--max-waiting", type=int, default=Limits.max_waiting,
                   help="clients that may wait behind the active one per VM (default %(default)s)")
    p.add_argument("--log", metavar="FILE", help="log here instead of stderr (with --stdio under guestfwd: syslog)")
    p.add_argument("-v", "--verbose", action="store_true", help="also log each connection (refusals and upstream loss always)")
    p.set_defaults(func=cmd_qmp_proxy)


def _options(args: argparse.Namespace) -> tuple[AllowList, Limits, SocketMode]:
    try:
        mode = int(args.mode, 8)
    except ValueError:
        raise ConfigError(f"--mode {args.mode!r}: an octal permission like 0660") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"--mode {args.mode!r}: permission bits only (at most 0777)")
    if args.reply_timeout <= 0 or args.max_waiting < 0:
        raise ConfigError("--reply-timeout must be > 0 and --max-waiting >= 0")
    if args.stdio and args.upstream_glob:
        raise ConfigError("--stdio serves one VM: use --upstream")
    if args.upstream_glob and not args.listen_dir:
        raise ConfigError("--upstream-glob goes with --listen-dir")
    if args.listen_dir and not args.upstream_glob:
        raise ConfigError("--listen-dir goes with --upstream-glob")
    policy = AllowList.build(args.allow_extra, args.allow_hmp)
    limits = Limits(reply_timeout=args.reply_timeout, max_waiting=args.max_waiting)
    return policy, limits, SocketMode(mode, args.owner, args.group)


async def _serve(args: argparse.Namespace, policy: AllowList, limits: Limits, sock_mode: SocketMode) -> None:
    if args.stdio:
        await serve_stdio(args.upstream, policy, limits)
        return
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.upstream_glob:
        task = asyncio.create_task(DirectoryProxy(args.upstream_glob, args.listen_dir, policy, limits, sock_mode)
                                   .run_forever())  # fmt: skip
        stop_task = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        for t in (task, stop_task):
            t.cancel()
        await asyncio.gather(task, stop_task, return_exceptions=True)
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        return
    proxy = UnixProxy(args.upstream, args.listen, policy, limits, sock_mode)
    await proxy.start()
    try:
        await stop.wait()
    finally:
        await proxy.stop()


def _same_file(fd1: int, fd2: int) -> bool:
    try:
        a, b = os.fstat(fd1), os.fstat(fd2)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _setup_logging(args: argparse.Namespace) -> None:
    """Log lines go to --log, else stderr; never into the QMP stream. QEMU's guestfwd `cmd:`
    hands the program one socket as stdin, stdout *and* stderr: then log to syslog."""
    fmt = "sva qmp-proxy: %(message)s"
    handler: logging.Handler
    if args.log:
        handler = logging.FileHandler(args.log)
    elif args.stdio and _same_file(1, 2):
        handler = (logging.handlers.SysLogHandler(address="/dev/log") if os.path.exists("/dev/log")
                   else logging.NullHandler())  # fmt: skip
        fmt = "sva-qmp-proxy[%(process)d]: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    logger = logging.getLogger("sva.qmpproxy")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO if args.verbose else logging.WARNING)


def cmd_qmp_proxy(args: argparse.Namespace) -> int:
    policy, limits, sock_mode = _options(args)
    _setup_logging(args)
    try:
        asyncio.run(_serve(args, policy, limits, sock_mode))
    except OSError as e:
        where = args.listen or args.listen_dir or args.upstream
        raise ConfigError(f"qmp-proxy {where}: {e.strerror or e}") from None
    return 0
