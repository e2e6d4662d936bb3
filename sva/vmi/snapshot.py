"""Memory snapshots: open a file as a read-only backend, or save any backend to a file.

Three formats (details in `sva.vmi.formats`):
  raw   guest-physical memory from GPA 0, holes as zeros; no header, so no memory map
  elf   an x86 ELF64 core as QEMU's dump-guest-memory writes it, with vCPU registers
  lime  LiME ranges: a 32-byte header with start/end GPA before each run of memory

`open_snapshot` detects the format from the first bytes. A file that is neither ELF nor
LiME is taken as raw only if its size is a non-zero multiple of the page size: a random
or truncated file should be refused, not silently scanned as memory.

The writers stream a few MiB at a time through `backend.readinto`, so they can save a
live guest's RAM without holding it in memory, and write to a temp file that replaces
`out_path` only once complete.
"""

from __future__ import annotations

from sva.errors import TargetError
from sva.vmi.base import PAGE_SIZE
from sva.vmi.formats.common import SnapshotBackend, SnapshotFile
from sva.vmi.formats.elfcore import ELF_MAGIC, ElfCoreSnapshot, write_elf
from sva.vmi.formats.lime import LIME_MAGIC_BYTES, LimeSnapshot, write_lime
from sva.vmi.formats.raw import RawSnapshot, write_raw

FORMATS = ("auto", "raw", "elf", "lime")

__all__ = [
    "FORMATS",
    "ElfCoreSnapshot",
    "LimeSnapshot",
    "RawSnapshot",
    "SnapshotBackend",
    "detect_format",
    "open_snapshot",
    "write_elf",
    "write_lime",
    "write_raw",
]


def detect_format(path: str, target: str | None = None) -> str:
    """"elf", "lime" or "raw" from the file's magic; refuses what cannot be a raw image."""
    with SnapshotFile(path, target or f"file:{path}") as f:
        head = f.read_exact(0, min(f.size, 4), "file magic")
        if head == ELF_MAGIC:
            return "elf"
        if head == LIME_MAGIC_BYTES:
            return "lime"
        if f.size == 0:
            raise f.error("empty file")
        if f.size % PAGE_SIZE:
            raise f.error(
                f"not ELF, not LiME, and not a page-multiple raw image ({f.size} bytes is not a "
                f"multiple of {PAGE_SIZE}); use raw: to force raw"
            )
        return "raw"


def open_snapshot(path: str, target: str | None = None, format: str = "auto") -> SnapshotBackend:  # noqa: A002
    """Open a snapshot file read-only; `format` is "auto" or forces "raw", "elf", "lime"."""
    target = target or f"{'file' if format == 'auto' else format}:{path}"
    if format not in FORMATS:
        raise TargetError(target, f"unknown snapshot format {format!r}; use one of {', '.join(FORMATS)}")
    if format == "auto":
        format = detect_format(path, target)
    if format == "elf":
        return ElfCoreSnapshot(path, target)
    if format == "lime":
        return LimeSnapshot(path, target)
    return RawSnapshot(path, target)
