"""A small, strict client for the QEMU Machine Protocol over a unix socket.

QMP is line-delimited JSON: a greeting, then `qmp_capabilities`, then commands whose
replies are `{"return": …}` or `{"error": …}`, with asynchronous `{"event": …}` lines
interleaved. Every wait here is bounded; a QEMU that dies or a socket that is not QMP
gives a `QmpError` naming the socket.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections import deque
from typing import Any

from sva.errors import QmpError

MAX_LINE = 64 * 1024 * 1024  # `info mtree` on a big machine is long, but not this long
MAX_EVENTS = 1000  # events we keep for callers; older ones are dropped


class QmpClient:
    """One QMP connection. Not thread-safe: one caller at a time."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        # Events that arrived while waiting for the most recent reply. QEMU sends an
        # event raised by a command (e.g. STOP from `stop`) before that command's reply.
        self.last_events: list[dict[str, Any]] = []
        self._buf = b""
        self._sock: socket.socket | None = None
        self.version: dict[str, Any] = {}
        self._connect()

    # -- connection -------------------------------------------------------------
    def _fail(self, message: str) -> QmpError:
        return QmpError(f"qemu:{self.path}", message)

    def _connect(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise self._fail("no such QMP socket (is the VM running?)") from None
        except OSError as e:
            raise self._fail(f"cannot stat QMP socket: {e.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise self._fail("not a unix socket, so not a QMP monitor")
        # A unix socket whose listen backlog is momentarily full (QEMU is still busy with a
        # previous client) refuses with EAGAIN: retry that, within the timeout.
        deadline = time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
                break
            except BlockingIOError:
                sock.close()
                if time.monotonic() >= deadline:
                    raise self._fail("cannot connect: the monitor's backlog stayed full") from None
                time.sleep(0.01)
            except OSError as e:
                sock.close()
                raise self._fail(f"cannot connect: {e.strerror or e}") from None
        self._sock = sock
        try:
            greeting = self._read_message(
                "no QMP greeting (another client may hold the monitor, or this is not QMP)"
            )
            if "QMP" not in greeting:
                raise self._fail("the socket answered, but not with a QMP greeting")
            self.version = greeting["QMP"].get("version", {})
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- wire -------------------------------------------------------------------
    def _read_message(self, timeout_message: str = "QEMU did not answer in time") -> dict[str, Any]:
        if self._sock is None:
            raise self._fail("connection is closed")
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(timeout_message)
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(1 << 16)
            except socket.timeout:
                raise self._fail(timeout_message) from None
            except OSError as e:
                self.close()
                raise self._fail(f"connection lost ({e.strerror or e}); did QEMU exit?") from None
            if not chunk:
                self.close()
                raise self._fail("QEMU closed the monitor connection (did QEMU exit?)")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                self.close()
                raise self._fail("reply larger than the limit; not a sane QMP peer")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            self.close()
            raise self._fail("the socket sent something that is not JSON, so not QMP") from None
        if not isinstance(msg, dict):
            self.close()
            raise self._fail("the socket sent JSON that is not a QMP message")
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its `return` value, or raise QmpError."""
        if self._sock is None:
            raise self._fail("connection is closed")
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as e:
            self.close()
            raise self._fail(f"cannot send {command!r} ({e.strerror or e}); did QEMU exit?") from None
        self.last_events = []
        while True:
            msg = self._read_message(f"no reply to {command!r} within {self.timeout:g} s")
            if "event" in msg:
                self.events.append(msg)
                self.last_events.append(msg)
                continue
            if "error" in msg:
                err = msg["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise self._fail(f"{command} failed: {desc}")
            if "return" in msg:
                return msg["return"]
            # Anything else (a stray greeting) is skipped.

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command and return its text output."""
        out = self.execute("human-monitor-command", {"command-line": command_line})
        if not isinstance(out, str):
            raise self._fail(f"human-monitor-command {command_line!r} returned no text")
        return out
