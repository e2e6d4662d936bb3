"""LiME snapshots (the Linux Memory Extractor's "lime" format).

The file is a sequence of ranges. Each starts with a 32-byte little-endian header —
u32 magic 0x4C694D45 ("EMiL" on disk), u32 version (1), u64 start GPA, u64 end GPA
*inclusive*, 8 reserved bytes — followed by end - start + 1 bytes of memory. Nothing
else: no count, no index, so a reader walks header to header until the end of file.
"""

from __future__ import annotations

import os
import struct

from sva.vmi.base import Backend, MemoryRegion
from sva.vmi.formats.common import (
    MAX_SEGMENTS,
    SnapshotBackend,
    SnapshotFile,
    atomic_output,
    build_memory_map,
    check_gpa_range,
    copy_region,
    pwrite_all,
    regions_to_write,
)

LIME_MAGIC = 0x4C694D45
LIME_VERSION = 1
LIME_HEADER = struct.Struct("<IIQQ8x")
LIME_MAGIC_BYTES = struct.pack("<I", LIME_MAGIC)


def parse_lime_ranges(f: SnapshotFile) -> list[MemoryRegion]:
    """Walk the range headers; every range must be whole and inside the file."""
    regions: list[MemoryRegion] = []
    offset = 0
    while offset < f.size:
        i = len(regions)
        if i >= MAX_SEGMENTS:
            raise f.error(f"more than {MAX_SEGMENTS} LiME ranges; refusing a file this fragmented", offset)
        if f.size - offset < LIME_HEADER.size:
            raise f.error(
                f"{f.size - offset} trailing bytes after range {i - 1}: too short for a LiME range header",
                offset,
            )
        header = f.read_exact(offset, LIME_HEADER.size, f"LiME range {i} header")
        magic, version, start, end = LIME_HEADER.unpack(header)
        if magic != LIME_MAGIC:
            raise f.error(f"LiME range {i}: bad magic 0x{magic:08x} (expected 0x{LIME_MAGIC:08x})", offset)
        if version != LIME_VERSION:
            raise f.error(f"LiME range {i}: unsupported version {version} (expected {LIME_VERSION})", offset)
        if end < start:
            raise f.error(f"LiME range {i}: end 0x{end:x} is below start 0x{start:x}", offset)
        size = end - start + 1
        check_gpa_range(f, f"LiME range {i}", start, size, offset)
        data = offset + LIME_HEADER.size
        if data + size > f.size:
            raise f.error(
                f"LiME range {i} (GPA 0x{start:x}-0x{end:x}) is truncated: its data ends at "
                f"0x{data + size:x} but the file ends at 0x{f.size:x} ({data + size - f.size} bytes missing)",
                offset,
            )
        regions.append(MemoryRegion(gpa=start, size=size, offset=data, name=f"range[{i}]"))
        offset = data + size
    if not regions:
        raise f.error("empty file")
    return regions


class LimeSnapshot(SnapshotBackend):
    """A LiME image: one region per range."""

    def __init__(self, path: str, target: str | None = None) -> None:
        target = target or f"lime:{path}"
        with SnapshotFile(path, target) as f:
            regions = parse_lime_ranges(f)
        super().__init__(target, path, build_memory_map(path, regions))


def write_lime(backend: Backend, out_path: str) -> None:
    """Save `backend`'s RAM as a LiME image, one range per memory region, in GPA order."""
    regions = regions_to_write(backend, out_path)
    with atomic_output(out_path) as fd:
        offset = 0
        for region in regions:
            pwrite_all(fd, LIME_HEADER.pack(LIME_MAGIC, LIME_VERSION, region.gpa, region.end - 1), offset)
            offset += LIME_HEADER.size
            copy_region(backend, region, fd, offset)
            offset += region.size
        os.ftruncate(fd, offset)
