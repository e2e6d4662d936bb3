"""The relay: one QMP session from a client to its guest's QMP socket, filtered.

Policy for hostile or odd peers (the client is the appliance VM, which we do not trust):
- Requests are handled one at a time: a forwarded request's reply is relayed before the
  next request is read, so refusals never overtake replies and a client cannot queue work.
- A client line is parsed strictly (no NaN, one JSON object), checked against the
  allow-list, and re-serialized before it reaches QEMU, so QEMU's more lenient parser
  never sees the client's own bytes. Malformed JSON gets a QMP error and the session goes
  on; a line over `Limits.client_line` gets an error and the client is disconnected.
- QEMU serves one monitor client at a time; so does the proxy, per upstream: a second
  client waits (no greeting yet, as with QEMU itself) and up to `Limits.max_waiting` may
  wait; more are closed at once, with a log line.
- Upstream gone (QEMU exited) → the client is disconnected, with a log line. Client gone
  → the upstream connection is closed, so QEMU can serve the next one.
- Events (STOP, RESUME, …) and the greeting pass through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sva.errors import ConfigError
from sva.qmpproxy.policy import AllowList
from sva.vmi.qmp import MAX_LINE

log = logging.getLogger("sva.qmpproxy")

_REQUEST_KEYS = frozenset({"execute", "arguments", "id"})


@dataclass(frozen=True)
class Limits:
    client_line: int = 64 * 1024  # sva's requests are tiny
    upstream_line: int = MAX_LINE  # `info mtree -f` of a big VM is long
    reply_timeout: float = 30.0  # QEMU must answer a forwarded command within this
    write_timeout: float = 10.0  # a client that stops reading is dropped after this
    max_waiting: int = 8  # clients queued behind the active one, per upstream


@dataclass(frozen=True)
class SocketMode:
    """Owner and permissions of a listening socket (who on the host may be the client)."""

    mode: int = 0o600
    user: str | None = None
    group: str | None = None

    def apply(self, path: Path) -> None:
        uid = gid = -1
        try:
            if self.user is not None:
                uid = pwd.getpwnam(self.user).pw_uid
            if self.group is not None:
                gid = grp.getgrnam(self.group).gr_gid
        except KeyError as e:
            raise ConfigError(f"{path}: no such user or group {e.args[0]!r}") from None
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
        os.chmod(path, self.mode)


def _error_line(desc: str, req_id: Any = None) -> bytes:
    reply: dict[str, Any] = {"error": {"class": "GenericError", "desc": desc}}
    if req_id is not None:
        reply["id"] = req_id
    return json.dumps(reply).encode() + b"\n"


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_request(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """A client line → (request, "") or (None, why it is malformed)."""
    try:
        msg = json.loads(line, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return None, f"malformed JSON: {str(e)[:100]}"
    if not isinstance(msg, dict):
        return None, "a request must be a JSON object"
    if "exec-oob" in msg:
        return None, "exec-oob is not allowed"
    if not isinstance(msg.get("execute"), str):
        return None, "a request needs 'execute' with a command name"
    unknown = set(msg) - _REQUEST_KEYS
    if unknown:
        return None, f"unknown request key '{sorted(unknown)[0]}'"
    if not isinstance(msg.get("arguments", {}), dict):
        return None, "'arguments' must be a JSON object"
    return msg, ""


class Session:
    """One client ↔ one upstream connection."""

    def __init__(self, name: str, upstream: str, policy: AllowList, limits: Limits,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:  # fmt: skip
        self.name = name
        self.upstream = upstream
        self.policy = policy
        self.limits = limits
        self.c_reader = reader
        self.c_writer = writer
        # Set by the upstream pump once it has relayed the reply to the forwarded request.
        self._replied: asyncio.Queue[None] = asyncio.Queue(maxsize=1)
        self._outstanding = False

    async def _to_client(self, data: bytes) -> None:
        self.c_writer.write(data)
        await asyncio.wait_for(self.c_writer.drain(), self.limits.write_timeout)

    async def run(self) -> None:
        try:
            u_reader, u_writer = await asyncio.open_unix_connection(self.upstream, limit=self.limits.upstream_line)
        except OSError as e:
            log.warning("%s: upstream %s unavailable (%s); client disconnected", self.name, self.upstream,
                        e.strerror or e)  # fmt: skip
            return
        log.info("%s: client connected, relaying to %s", self.name, self.upstream)
        up_task = asyncio.create_task(self._pump_upstream(u_reader))
        client_task = asyncio.create_task(self._pump_client(u_writer))
        try:
            done, _ = await asyncio.wait({up_task, client_task}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.cancelled():
                    reason = "cancelled"
                elif t.exception() is not None:
                    reason = repr(t.exception())  # e.g. a client that stopped reading
                else:
                    reason = t.result()
                log.info("%s: session ended: %s", self.name, reason)
        finally:
            # Hang up on the client first: whatever happens below, it must learn at once.
            self.c_writer.close()
            for t in (up_task, client_task):
                t.cancel()
            await asyncio.wait({up_task, client_task}, timeout=2.0)
            u_writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(u_writer.wait_closed(), 1.0)

    async def _pump_upstream(self, u_reader: asyncio.StreamReader) -> str:
        """QEMU → client: greeting and events straight through, replies to the waiting request."""
        while True:
            try:
                line = await u_reader.readline()
            except ValueError:
                log.warning("%s: upstream %s sent a line over %d bytes; closing", self.name, self.upstream,
                            self.limits.upstream_line)  # fmt: skip
                return "upstream line too long"
            except OSError as e:
                log.warning("%s: upstream %s lost (%s); client disconnected", self.name, self.upstream, e)
                return "upstream lost"
            if not line.endswith(b"\n"):
                log.warning("%s: upstream %s closed (QEMU gone?); client disconnected", self.name, self.upstream)
                return "upstream closed"
            try:
                msg = json.loads(line)
            except ValueError:
                msg = None
            if not isinstance(msg, dict):
                log.warning("%s: upstream %s sent something that is not QMP; closing", self.name, self.upstream)
                return "upstream not QMP"
            if ("return" in msg or "error" in msg) and "event" not in msg:
                if not self._outstanding:
                    log.warning("%s: upstream sent a reply nobody asked for; dropped", self.name)
                    continue
                # Relayed from here, not by the client task, so the client sees QEMU's own
                # order (sva relies on STOP arriving before the reply to `stop`).
                await self._to_client(line)
                self._outstanding = False
                self._replied.put_nowait(None)
                continue
            await self._to_client(line)  # greeting, events

    async def _pump_client(self, u_writer: asyncio.StreamWriter) -> str:
        """Client → QEMU: one request at a time, checked, re-serialized."""
        while True:
            try:
                line = await self.c_reader.readline()
            except ValueError:
                await self._to_client(_error_line(
                    f"sva qmp-proxy: request longer than {self.limits.client_line} bytes; disconnecting"))
                log.warning("%s: client sent a line over %d bytes; disconnected", self.name, self.limits.client_line)
                return "client line too long"
            except OSError:
                return "client lost"
            if not line.endswith(b"\n"):
                return "client closed"
            if not line.strip():
                continue
            req, why = parse_request(line)
            if req is None:
                log.info("%s: malformed request refused: %s", self.name, why)
                await self._to_client(_error_line(f"sva qmp-proxy: {why}"))
                continue
            command, args, req_id = req["execute"], req.get("arguments", {}), req.get("id")
            verdict = self.policy.check(command, args)
            if not verdict.allowed:
                log.warning("%s: refused: %s", self.name, verdict.desc.removeprefix("sva qmp-proxy: "))
                await self._to_client(_error_line(verdict.desc, req_id))
                continue
            out: dict[str, Any] = {"execute": command}
            if args:
                out["arguments"] = args
            if req_id is not None:
                out["id"] = req_id
            self._outstanding = True
            u_writer.write(json.dumps(out).encode() + b"\n")
            try:
                await asyncio.wait_for(u_writer.drain(), self.limits.write_timeout)
                await asyncio.wait_for(self._replied.get(), self.limits.reply_timeout)
            except (OSError, asyncio.TimeoutError):
                log.warning("%s: no reply from %s to %r in time; client disconnected", self.name, self.upstream,
                            command)  # fmt: skip
                return "upstream timeout"


class _Gate:
    """One active session per upstream, a bounded number waiting behind it."""

    def __init__(self, max_waiting: int) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0
        self.max_waiting = max_waiting


class UnixProxy:
    """Listen on `listen`, relay each client to `upstream` (a QEMU QMP socket)."""

    def __init__(self, upstream: str, listen: str, policy: AllowList, limits: Limits | None = None,
                 socket_mode: SocketMode | None = None, name: str | None = None) -> None:  # fmt: skip
        if len(os.fsencode(listen)) > 107:
            raise ConfigError(f"--listen {listen}: a unix socket path must be at most 107 bytes")
        self.upstream = upstream
        self.listen = Path(listen)
        self.policy = policy
        self.limits = limits or Limits()
        self.socket_mode = socket_mode or SocketMode()
        self.name = name or self.listen.name
        self._gate = _Gate(self.limits.max_waiting)
        self._server: asyncio.AbstractServer | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gate = self._gate
        try:
            if gate.lock.locked() and gate.waiting >= gate.max_waiting:
                log.warning("%s: %d clients already waiting; new client closed", self.name, gate.waiting)
                return
            gate.waiting += 1
            try:
                await gate.lock.acquire()
            finally:
                gate.waiting -= 1
            try:
                await Session(self.name, self.upstream, self.policy, self.limits, reader, writer).run()
            finally:
                gate.lock.release()
        except (OSError, asyncio.TimeoutError) as e:
            log.info("%s: client dropped: %r", self.name, e)
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def start(self) -> None:
        self.listen.parent.mkdir(parents=True, exist_ok=True)
        if self.listen.exists() or self.listen.is_symlink():
            if not stat.S_ISSOCK(self.listen.lstat().st_mode):
                raise ConfigError(f"--listen {self.listen}: exists and is not a socket; not replacing it")
            self.listen.unlink()  # a stale socket of an earlier run
        # Bind under a restrictive umask, then open up to the configured mode: no window in
        # which anyone else could connect.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.listen),
                                                           limit=self.limits.client_line)  # fmt: skip
        finally:
            os.umask(old)
        self.socket_mode.apply(self.listen)
        log.info("%s: listening on %s for %s", self.name, self.listen, self.upstream)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.listen.unlink()


def vm_name(sock: Path) -> str:
    """A VM's name from its QMP socket path: /run/sva/web01/qmp.sock → web01, /run/sva/web01.qmp → web01."""
    if sock.name in ("qmp.sock", "qmp", "monitor.sock"):
        return sock.parent.name
    return sock.stem


class DirectoryProxy:
    """One UnixProxy per QMP socket matching `pattern` (a glob), at LISTEN_DIR/NAME/qmp.sock;
    rescanned every `rescan` seconds so VMs that come and go are followed."""

    def __init__(self, pattern: str, listen_dir: str, policy: AllowList, limits: Limits | None = None,
                 socket_mode: SocketMode | None = None, rescan: float = 2.0) -> None:  # fmt: skip
        if not pattern.startswith("/"):
            raise ConfigError(f"--upstream-glob {pattern!r}: must be an absolute glob")
        self.pattern = pattern
        self.listen_dir = Path(listen_dir)
        self.policy = policy
        self.limits = limits or Limits()
        self.socket_mode = socket_mode or SocketMode()
        self.rescan = rescan
        self.proxies: dict[str, UnixProxy] = {}

    def _found(self) -> dict[str, str]:
        found: dict[str, str] = {}
        root = Path("/")
        for p in sorted(root.glob(self.pattern.lstrip("/")))[:1024]:
            try:
                if not stat.S_ISSOCK(p.stat().st_mode):
                    continue
            except OSError:
                continue
            name = vm_name(p)
            if name and not name.startswith(".") and name not in found:
                found[name] = str(p)
        return found

    async def sync(self) -> None:
        found = self._found()
        for name in [n for n, px in self.proxies.items() if found.get(n) != px.upstream]:
            log.info("%s: upstream gone or moved; no longer proxied", name)
            await self.proxies.pop(name).stop()
        for name, up in found.items():
            if name not in self.proxies:
                # The directory the socket sits in is readable by whoever may connect.
                d = self.listen_dir / name
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, 0o755)
                px = UnixProxy(up, str(d / "qmp.sock"), self.policy, self.limits, self.socket_mode, name=name)
                try:
                    await px.start()
                except (OSError, ConfigError) as e:
                    log.warning("%s: cannot listen on %s: %s", name, px.listen, e)
                    continue
                self.proxies[name] = px

    async def run_forever(self) -> None:
        try:
            while True:
                await self.sync()
                await asyncio.sleep(self.rescan)
        finally:
            for px in list(self.proxies.values()):
                await px.stop()
            self.proxies.clear()


async def serve_stdio(upstream: str, policy: AllowList, limits: Limits | None = None) -> None:
    """One session over stdin/stdout: for QEMU `guestfwd=…-cmd:sva qmp-proxy --stdio …`,
    which starts one proxy process per connection the appliance opens."""
    limits = limits or Limits()
    loop = asyncio.get_running_loop()
    st_in, st_out = os.fstat(0), os.fstat(1)
    if stat.S_ISSOCK(st_in.st_mode) and (st_in.st_dev, st_in.st_ino) == (st_out.st_dev, st_out.st_ino):
        # guestfwd passes one socket as stdin and stdout. asyncio's pipe transports would
        # watch it twice and take incoming data for the peer closing its read end: use it
        # as the one bidirectional socket it is.
        sock = socket.socket(fileno=os.dup(0))
        reader, writer = await asyncio.open_connection(sock=sock, limit=limits.client_line)
    else:
        reader = asyncio.StreamReader(limit=limits.client_line)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    try:
        await Session("stdio", upstream, policy, limits, reader, writer).run()
    finally:
        writer.close()
