"""What every snapshot format shares: limits, bounded header reads, the read-only backend
base class, and atomic streaming output.

A snapshot file is hostile input: its header reads go through `SnapshotFile.read_exact`,
which refuses any range outside the file before touching it, so a lying length becomes
a `SnapshotFormatError` naming the file and offset, never a huge allocation.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence

from sva.errors import SnapshotFormatError, SvaError, TargetError
from sva.vmi.base import (
    PAGE_SIZE,
    Backend,
    Capabilities,
    MappedBackend,
    MemoryMap,
    MemoryRegion,
    Registers,
)

# x86-64 physical addresses have at most 52 bits (MAXPHYADDR); anything above is corrupt.
MAX_GPA = 1 << 52
# Bounds on header-driven loops. Real files are far below these: QEMU writes one PT_LOAD
# per RAM block (a handful) and LiME one range per System RAM entry (tens).
MAX_SEGMENTS = 65536
MAX_VCPUS = 8192
MAX_NOTE_BYTES = 16 << 20  # ~1 KiB of notes per vCPU in QEMU's dumps
MAX_NOTES = 65536

COPY_CHUNK = 4 << 20  # writers stream RAM in pieces this size
_ZERO_CHUNK = bytes(COPY_CHUNK)


def page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


class SnapshotFile:
    """A read-only descriptor on a snapshot file, for parsing its headers."""

    def __init__(self, path: str, target: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise TargetError(target, f"cannot open {path}: {e.strerror}") from None
        try:
            st = os.fstat(self._fd)
            # A directory opens fine on Linux and a pipe has no size: neither is a snapshot.
            if not stat.S_ISREG(st.st_mode):
                raise TargetError(target, f"{path} is not a regular file")
        except BaseException:
            os.close(self._fd)
            raise
        self.size = st.st_size

    def error(self, message: str, offset: int | None = None) -> SnapshotFormatError:
        return SnapshotFormatError(self.path, message, offset)

    def read_exact(self, offset: int, size: int, what: str) -> bytes:
        """Exactly `size` bytes at `offset`, or an error saying how many are missing."""
        if offset < 0 or size < 0:
            raise self.error(f"{what}: negative offset or size")
        if offset + size > self.size:
            raise self.error(
                f"{what} is truncated: needs 0x{size:x} bytes up to offset 0x{offset + size:x}, "
                f"but the file ends at 0x{self.size:x} ({offset + size - self.size} bytes missing)",
                offset,
            )
        parts: list[bytes] = []
        got = 0
        while got < size:
            try:
                chunk = os.pread(self._fd, size - got, offset + got)
            except OSError as e:
                raise self.error(f"{what}: read failed: {e.strerror}", offset + got) from None
            if not chunk:  # the file shrank since fstat
                raise self.error(f"{what}: file ended early (is it being written?)", offset + got)
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> SnapshotFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_memory_map(path: str, regions: Sequence[MemoryRegion], hint: str = "") -> MemoryMap:
    """A MemoryMap from parsed regions; overlaps become a format error about this file."""
    try:
        return MemoryMap(list(regions))
    except SvaError as e:
        raise SnapshotFormatError(path, f"{e}{hint}") from None


def check_gpa_range(f: SnapshotFile, what: str, gpa: int, size: int, offset: int) -> None:
    if gpa + size > MAX_GPA:
        raise f.error(
            f"{what}: guest-physical range 0x{gpa:x}+0x{size:x} lies beyond the 52-bit "
            "physical address space; the file is corrupt",
            offset,
        )


class SnapshotBackend(MappedBackend):
    """A snapshot file as a backend: never live or pausable; registers only if stored."""

    capabilities = Capabilities(live=False, pause=False, registers=False)

    def __init__(
        self, target: str, path: str, memory_map: MemoryMap, registers: Sequence[Registers] = ()
    ) -> None:
        super().__init__(target, path, memory_map)
        self._registers = tuple(registers)
        self.capabilities = Capabilities(live=False, pause=False, registers=bool(self._registers))

    @property
    def vcpu_count(self) -> int:
        return len(self._registers)

    def regs(self, vcpu: int = 0) -> Registers:
        n = len(self._registers)
        if n == 0:
            raise TargetError(self.target, f"{self.path} holds no vCPU registers")
        if isinstance(vcpu, bool) or not isinstance(vcpu, int) or not 0 <= vcpu < n:
            raise TargetError(
                self.target,
                f"no vCPU {vcpu!r}: this snapshot holds {n} vCPU(s), numbered 0..{n - 1}",
            )
        return self._registers[vcpu]


# -- writing ---------------------------------------------------------------------


def _write_error(out_path: str, e: OSError) -> TargetError:
    return TargetError(out_path, f"cannot write snapshot: {e.strerror or e}")


@contextlib.contextmanager
def atomic_output(out_path: str) -> Iterator[int]:
    """A descriptor on a temp file next to `out_path`, renamed over it only on success.

    The temp file is mode 0600 (mkstemp's default): a memory dump holds the guest's secrets.
    On any error the temp file is removed, so no half-written snapshot is ever left behind.
    """
    out_path = os.fspath(out_path)
    directory = os.path.dirname(os.path.abspath(out_path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out_path)}.", suffix=".part", dir=directory)
    except OSError as e:
        raise _write_error(out_path, e) from None
    try:
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out_path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _write_error(out_path, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def copy_region(backend: Backend, region: MemoryRegion, fd: int, file_offset: int) -> None:
    """Stream one region from the backend into `fd` at `file_offset`, chunk by chunk.

    All-zero chunks are skipped: the writer truncates the file to its final size at the
    end, so they read back as zeros and a mostly idle guest makes a mostly sparse file.
    """
    gpa, left, off = region.gpa, region.size, file_offset
    buf = bytearray(min(left, COPY_CHUNK))
    while left > 0:
        n = min(left, COPY_CHUNK)
        if n < len(buf):
            # A fresh bytearray, not a memoryview slice: bytearray == bytes is a memcmp,
            # memoryview == bytes compares item by item, 100 times slower.
            buf = bytearray(n)
        backend.readinto(gpa, buf)
        if buf != (_ZERO_CHUNK if n == COPY_CHUNK else bytes(n)):
            pwrite_all(fd, buf, off)
        gpa += n
        off += n
        left -= n


def regions_to_write(backend: Backend, out_path: str) -> list[MemoryRegion]:
    regions = list(backend.memory_map)
    if not regions:
        raise TargetError(out_path, "the source has no memory regions to write")
    if len(regions) > MAX_SEGMENTS - 1:
        raise TargetError(
            out_path, f"{len(regions)} memory regions; at most {MAX_SEGMENTS - 1} are supported"
        )
    return regions
