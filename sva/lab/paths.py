"""Where lab guests keep their state and their cached kernels, and what a valid lab looks like.

The runtime dir holds live things (sockets, the guest's RAM file, pids) and may vanish at
reboot; the cache dir holds things that are slow to make (kernels, initramfs images) and
is shared by every lab and every test run on the machine.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sva.errors import LabError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
MIN_MEM = 128 << 20
# Guest RAM is a sparse file, but a typo like "300G" should fail here, not in QEMU.
MAX_MEM = 64 << 30
_MEM_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.I)
_MEM_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# sun_path in struct sockaddr_un is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def runtime_root() -> Path:
    """The sva runtime dir: $SVA_RUNTIME_DIR, /run/sva for root, else a per-user dir."""
    env = os.environ.get("SVA_RUNTIME_DIR")
    if env:
        # Absolute: QEMU daemonizes into / and must still find its sockets and RAM file.
        return Path(env).absolute()
    if os.geteuid() == 0:
        return Path("/run/sva")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "sva" if xdg else Path(f"/tmp/sva-{os.getuid()}")


def cache_root() -> Path:
    """The sva cache dir: $SVA_CACHE_DIR, /var/cache/sva for root, else ~/.cache/sva."""
    env = os.environ.get("SVA_CACHE_DIR")
    if env:
        return Path(env).absolute()
    if os.geteuid() == 0:
        return Path("/var/cache/sva")
    return Path.home() / ".cache" / "sva"


def labs_dir() -> Path:
    return runtime_root() / "lab"


def lab_dir(name: str) -> Path:
    return labs_dir() / check_name(name)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise LabError(
            f"lab guest name {name!r} is not valid: use 1-32 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def parse_mem(text: str | int) -> int:
    """Guest RAM size in bytes from '256M', '3G', '512' (MiB, as QEMU's -m reads it)."""
    if isinstance(text, int):
        size = text
    else:
        m = _MEM_RE.match(str(text))
        if not m:
            raise LabError(f"lab guest memory size {text!r} is not valid: use e.g. 256M or 3G")
        size = int(m[1]) * _MEM_UNITS[m[2].lower()]
    if size % (1 << 20):
        raise LabError(f"lab guest memory size {text!r} is not a whole number of MiB")
    if size < MIN_MEM:
        raise LabError(f"lab guest memory size {text!r} is too small: the minimum is 128M")
    if size > MAX_MEM:
        raise LabError(f"lab guest memory size {text!r} is too large: the maximum is 64G")
    return size


def format_mem(size: int) -> str:
    return f"{size >> 30}G" if size % (1 << 30) == 0 else f"{size >> 20}M"


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise LabError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; set SVA_RUNTIME_DIR to a shorter directory"
        )


@contextmanager
def file_lock(path: Path, timeout: float, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `path`, waiting at most `timeout` seconds for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LabError(
                        f"{what}: still locked by another sva process after {timeout:.0f}s ({path})"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
