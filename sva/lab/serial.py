"""Run shell commands in a lab guest through its serial console.

The guest's console shell reads commands from the tty with echo off (see initscript).
A command travels base64-encoded, runs in its own `sh -c` with stdin from /dev/null, and
its output is framed by begin/end lines that carry a fresh nonce and, at the end, the exit
status. The markers are printed with octal escapes, so the literal marker never appears
in what we send, even if the tty were echoing. One client at a time: QEMU's serial socket
takes one connection, and a lock file serializes callers across processes.
"""

from __future__ import annotations

import base64
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from sva.errors import LabError
from sva.lab import initscript
from sva.lab.paths import file_lock

CHUNK = 512  # base64 characters per line; a tty line in canonical mode holds 4095
MAX_OUTPUT = 64 << 20
_CTRL_U = b"\x15"  # discards a half-typed line left behind by an interrupted exec
_CTRL_C = b"\x03"


@dataclass(frozen=True)
class ExecResult:
    status: int
    output: str


def wrap(command: str, nonce: str) -> bytes:
    """The lines typed into the guest's console shell for `command`."""
    b64 = base64.b64encode(command.encode()).decode()
    chunks = [b64[i : i + CHUNK] for i in range(0, len(b64), CHUNK)] or [""]
    lines = [f"__sva_c={chunks[0]}"] + [f"__sva_c=${{__sva_c}}{c}" for c in chunks[1:]]
    lines.append(
        f"printf '\\137_SVA_B_%s\\n' {nonce}; "
        f'sh -c "$(printf %s "$__sva_c" | base64 -d)" </dev/null 2>&1; '
        f"printf '\\n\\137_SVA_E_%s_%d_\\n' {nonce} $?"
    )
    return _CTRL_U + "".join(line + "\n" for line in lines).encode()


def _connect(path: Path, lab: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(max(0.1, min(timeout, 5.0)))
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise LabError(f"lab {lab}: no serial console socket {path} (is the guest running?)") from None
    except OSError as e:
        sock.close()
        raise LabError(f"lab {lab}: cannot connect to serial console {path}: {e.strerror or e}") from None
    return sock


def execute(serial: Path, lock: Path, lab: str, command: str, timeout: float = 30.0) -> ExecResult:
    """Run `command` with the guest's /bin/sh; its combined stdout+stderr and exit status."""
    if timeout <= 0:
        raise LabError(f"lab {lab}: exec timeout must be positive, got {timeout}")
    with file_lock(lock, timeout + 10.0, f"lab {lab}: serial console"):
        sock = _connect(serial, lab, timeout)
        try:
            _drain(sock)
            nonce = secrets.token_hex(8)
            sock.sendall(wrap(command, nonce))
            return _read_result(sock, lab, nonce, command, time.monotonic() + timeout, timeout)
        except OSError as e:
            raise LabError(f"lab {lab}: serial console I/O failed: {e.strerror or e}") from None
        finally:
            sock.close()


def _drain(sock: socket.socket) -> None:
    # Output of an earlier, abandoned command must not be taken for ours; the nonce already
    # guarantees that, this just keeps the buffer small.
    sock.settimeout(0.02)
    try:
        for _ in range(1000):
            if not sock.recv(65536):
                break
    except (TimeoutError, BlockingIOError):
        pass


def _read_result(
    sock: socket.socket, lab: str, nonce: str, command: str, deadline: float, timeout: float
) -> ExecResult:
    begin = f"__SVA_B_{nonce}\r\n".encode()
    end_re = re.compile(rb"\r?\n__SVA_E_" + nonce.encode() + rb"_(\d+)_\r?\n")
    buf = b""
    scanned = 0  # the end marker cannot lie wholly before this offset
    restarted = initscript.SHELL_RESTART_LINE.encode()
    interrupted = False
    while True:
        m = end_re.search(buf, scanned)
        scanned = max(0, len(buf) - 64)
        start = buf.find(begin)
        if m and start >= 0 and m.start() >= start and not interrupted:
            out = buf[start + len(begin) : m.start()].replace(b"\r", b"")
            return ExecResult(status=int(m[1]), output=out.decode("utf-8", "replace"))
        now = time.monotonic()
        if interrupted and (m or restarted in buf or now >= deadline):
            partial = buf[start + len(begin) :] if start >= 0 else b""
            partial = end_re.sub(b"", partial.split(restarted)[0]).replace(b"\r", b"")
            seen = " / ".join(partial.decode("utf-8", "replace").split("\n")).strip(" /")
            seen = seen if len(seen) <= 200 else "..." + seen[-197:]
            raise LabError(
                f"lab {lab}: command did not finish within {timeout:g}s and was interrupted with ^C: "
                f"{_short(command)}" + (f" (output so far: {seen})" if seen else "")
            )
        if now >= deadline:
            # ^C reaches the console shell's foreground process group; the shell dies with
            # its command and init starts a fresh one.
            sock.sendall(_CTRL_C)
            interrupted = True
            deadline = now + 3.0
            continue
        sock.settimeout(max(0.01, min(0.5, deadline - now)))
        try:
            data = sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            continue
        if not data:
            raise LabError(f"lab {lab}: serial console closed the connection (did the guest stop?)")
        buf += data
        if len(buf) > MAX_OUTPUT:
            raise LabError(f"lab {lab}: command output exceeds {MAX_OUTPUT >> 20} MiB: {_short(command)}")


def _short(command: str) -> str:
    one = " ".join(command.split())
    return one if len(one) <= 80 else one[:77] + "..."
