"""Sample memory for timing rules: synthetic and deterministic, or taken from a guest.

A rule's cost depends on the bytes it runs over (atoms that hit often, regexes that
backtrack on hex text), so the slow-rule check times rules on data that looks like guest
RAM rather than on random bytes only.
"""

from __future__ import annotations

import random
import struct

from sva.vmi.base import PAGE_SIZE, Backend

MiB = 1 << 20

_WORDS = (
    "the of and to in is for on that with as by this from kernel process memory file user "
    "system error warning device driver module network socket buffer page cache thread task "
    "GET POST HTTP/1.1 Host: Content-Type: application/json text/html /usr/lib /usr/bin /etc "
    "/proc/self /dev/null /tmp libc.so.6 ld-linux-x86-64.so.2 malloc free printf open read "
    "write close mmap PATH=/usr/local/bin:/usr/bin HOME=/root TERM=linux LANG=C.UTF-8 "
    "systemd sshd cron bash sh python3 {\"id\": 42, \"name\": \"value\"} <div class=\"x\"> "
    "0123456789 2024-01-01T00:00:00Z 127.0.0.1 ::1 192.168.0.1 localhost example.com "
    "https://www.example.com/index.html?q=1 Mozilla/5.0 (X11; Linux x86_64)"
).split(" ")


def synthetic_memory(size: int = 2 * MiB, seed: int = 0) -> bytes:
    """`size` bytes (rounded up to whole pages) of memory-like pages, the same for a seed.

    Page kinds, by share: 45 % zero, 25 % random, 18 % text (ASCII and UTF-16, with hex
    and base64-looking tokens), 10 % pointer tables (kernel/user canonical addresses), 2 %
    ELF-headed pages.
    """
    rng = random.Random(seed)
    pages = max(1, -(-size // PAGE_SIZE))
    out = bytearray()
    for _ in range(pages):
        roll = rng.random()
        if roll < 0.45:
            out += bytes(PAGE_SIZE)
        elif roll < 0.70:
            out += rng.randbytes(PAGE_SIZE)
        elif roll < 0.88:
            out += _text_page(rng)
        elif roll < 0.98:
            out += _pointer_page(rng)
        else:
            out += _elf_page(rng)
    return bytes(out)


def _text_page(rng: random.Random) -> bytes:
    words: list[str] = []
    length = 0
    while length < PAGE_SIZE:
        r = rng.random()
        if r < 0.08:
            w = rng.randbytes(rng.choice((4, 8, 16, 20, 32))).hex()
        elif r < 0.12:
            w = rng.randbytes(rng.randint(8, 48)).hex().upper()
        else:
            w = rng.choice(_WORDS)
        words.append(w)
        length += len(w) + 1
    text = (" " if rng.random() < 0.7 else "\n").join(words)
    raw = text.encode("utf-16-le") if rng.random() < 0.25 else text.encode()
    return raw[:PAGE_SIZE].ljust(PAGE_SIZE, b"\0")


def _pointer_page(rng: random.Random) -> bytes:
    base = rng.choice((0xFFFF888000000000, 0xFFFFFFFF81000000, 0x00007F0000000000, 0x0000560000000000))
    vals = []
    for _ in range(PAGE_SIZE // 8):
        vals.append(0 if rng.random() < 0.2 else base + (rng.getrandbits(28) & ~7))
    return struct.pack(f"<{len(vals)}Q", *vals)


def _elf_page(rng: random.Random) -> bytes:
    head = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHI", 3, 0x3E, 1)
    return (head + rng.randbytes(PAGE_SIZE - len(head)))[:PAGE_SIZE]


def backend_sample(backend: Backend, size: int = 2 * MiB, piece: int = 64 << 10) -> bytes:
    """About `size` bytes of a guest's RAM, as `piece`-sized runs spread evenly over it."""
    regions = list(backend.memory_map)
    total = sum(r.size for r in regions)
    if total == 0:
        return b""
    count = max(1, min(size // piece, total // piece))
    stride = total / count
    out = bytearray()
    for i in range(count):
        # the i-th piece's offset in "RAM laid end to end", mapped back to a region
        logical = int(i * stride)
        for r in regions:
            if logical < r.size:
                n = min(piece, r.size - logical)
                out += backend.read(r.gpa + logical, n)
                break
            logical -= r.size
    return bytes(out)
