"""Raw snapshots: the file *is* guest-physical memory, byte N of the file at GPA N.

There is no header, so nothing records where the RAM holes are: they are stored as zeros
(sparse on disk when written here) and read back as one region [0, file size). That
makes the format trivially interoperable (dd, LibVMI, volatility's raw layer) at the
cost of losing the memory map.
"""

from __future__ import annotations

import os

from sva.vmi.base import Backend, MemoryRegion
from sva.vmi.formats.common import (
    MAX_GPA,
    SnapshotBackend,
    SnapshotFile,
    atomic_output,
    build_memory_map,
    copy_region,
    regions_to_write,
)


class RawSnapshot(SnapshotBackend):
    """A raw guest-physical memory image, mapped from GPA 0."""

    def __init__(self, path: str, target: str | None = None) -> None:
        target = target or f"raw:{path}"
        with SnapshotFile(path, target) as f:
            if f.size == 0:
                raise f.error("empty file; a raw image holds at least one byte of guest memory")
            if f.size > MAX_GPA:
                raise f.error(f"{f.size} bytes is more than a 52-bit physical address space")
            size = f.size
        memory_map = build_memory_map(path, [MemoryRegion(gpa=0, size=size, offset=0, name="ram")])
        super().__init__(target, path, memory_map)


def write_raw(backend: Backend, out_path: str) -> None:
    """Save `backend`'s RAM as a raw image of memory_map.end bytes; holes stay sparse zeros."""
    regions = regions_to_write(backend, out_path)
    with atomic_output(out_path) as fd:
        for region in regions:
            copy_region(backend, region, fd, region.gpa)
        os.ftruncate(fd, backend.memory_map.end)
