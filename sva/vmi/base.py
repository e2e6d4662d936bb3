"""The VMI access layer's core types: memory map, registers, capabilities, Backend.

A backend knows how to read bytes and vCPU state from one guest. It knows nothing
about operating systems. Everything above it (volatility3 layers, scanners, the lab
tests) uses only the `Backend` protocol defined here.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import mmap
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from sva.errors import MemoryAccessError, SvaError, TargetError

if TYPE_CHECKING:
    from sva.vmi.pagesnap import PageSnapshot

PAGE_SIZE = 4096


@dataclass(frozen=True)
class MemoryRegion:
    """A run of guest-physical addresses stored contiguously in the backing."""

    gpa: int  # first guest-physical address
    size: int  # bytes
    offset: int  # offset of `gpa` inside the backing file/mapping
    name: str = "ram"

    @property
    def end(self) -> int:
        """One past the last guest-physical address."""
        return self.gpa + self.size


class MemoryMap:
    """Sorted, non-overlapping guest-physical regions and their backing offsets."""

    def __init__(self, regions: list[MemoryRegion] | tuple[MemoryRegion, ...]) -> None:
        ordered = sorted((r for r in regions if r.size > 0), key=lambda r: r.gpa)
        for a, b in zip(ordered, ordered[1:]):
            if b.gpa < a.end:
                raise SvaError(
                    f"memory map: region {b.name}@0x{b.gpa:x} overlaps {a.name}@0x{a.gpa:x}+0x{a.size:x}"
                )
        for r in ordered:
            if r.gpa < 0 or r.offset < 0:
                raise SvaError(f"memory map: negative address in region {r}")
        self.regions: tuple[MemoryRegion, ...] = tuple(ordered)
        self._starts = [r.gpa for r in self.regions]

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self.regions)

    def __len__(self) -> int:
        return len(self.regions)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MemoryMap) and self.regions == other.regions

    def __repr__(self) -> str:
        return f"MemoryMap({list(self.regions)!r})"

    @property
    def total_size(self) -> int:
        """Bytes of guest RAM covered by the map."""
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest guest-physical address covered."""
        return self.regions[-1].end if self.regions else 0

    def region_of(self, gpa: int) -> MemoryRegion | None:
        """The region holding `gpa`, or None when it falls in a hole."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self.regions[i].end:
            return self.regions[i]
        return None

    def translate(self, gpa: int, size: int) -> list[tuple[MemoryRegion, int, int]]:
        """Split [gpa, gpa+size) into (region, backing offset, length) pieces.

        Raises MemoryAccessError when any byte of the range is not guest RAM.
        """
        if size < 0 or gpa < 0:
            raise MemoryAccessError(gpa, max(size, 0), "negative address or size")
        pieces: list[tuple[MemoryRegion, int, int]] = []
        cur, left = gpa, size
        while left > 0:
            region = self.region_of(cur)
            if region is None:
                raise MemoryAccessError(gpa, size, f"0x{cur:x} is not guest RAM")
            n = min(left, region.end - cur)
            pieces.append((region, region.offset + (cur - region.gpa), n))
            cur += n
            left -= n
        return pieces

    def to_json(self) -> list[dict[str, int | str]]:
        return [
            {"gpa": r.gpa, "size": r.size, "offset": r.offset, "name": r.name} for r in self.regions
        ]


@dataclass(frozen=True)
class Registers:
    """The state of one vCPU that introspection needs."""

    vcpu: int
    rip: int
    rsp: int
    rflags: int
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    efer: int
    idtr_base: int
    idtr_limit: int
    gdtr_base: int
    gdtr_limit: int
    # General-purpose and segment registers, where the source provides them.
    extra: dict[str, int] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, int]:
        base = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        return {**base, **self.extra}


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. The appliance never writes: `write` is always False."""

    live: bool
    pause: bool
    registers: bool
    write: bool = False

    def to_json(self) -> dict[str, bool]:
        return {"live": self.live, "pause": self.pause, "registers": self.registers, "write": self.write}


@dataclass
class PauseRecord:
    """How long the guest stayed paused inside one `frozen()` block."""

    started: float = 0.0
    seconds: float | None = None  # set when the guest runs again


@runtime_checkable
class Backend(Protocol):
    """One guest's memory and vCPU state, read-only."""

    target: str
    capabilities: Capabilities
    memory_map: MemoryMap

    @property
    def memory_size(self) -> int: ...

    @property
    def vcpu_count(self) -> int: ...

    def read(self, gpa: int, size: int) -> bytes: ...

    def readinto(self, gpa: int, buf: bytearray | memoryview) -> int: ...

    def view(self, gpa: int, size: int) -> memoryview: ...

    def regs(self, vcpu: int = 0) -> Registers: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def frozen(self) -> contextlib.AbstractContextManager[PauseRecord]: ...

    def close(self) -> None: ...


MAX_READ = 1 << 30  # one read() call never copies more than 1 GiB


class MappedBackend:
    """Shared logic for backends whose RAM is a read-only mapped file.

    `read`/`readinto` use pread on a read-only descriptor: a file that shrinks under us
    (a dying QEMU, a truncated snapshot) gives a clean error instead of SIGBUS.
    `view` hands out zero-copy read-only memoryviews of the mapping for bulk scans.
    """

    capabilities = Capabilities(live=False, pause=False, registers=False)

    def __init__(self, target: str, path: str, memory_map: MemoryMap) -> None:
        self.target = target
        self.path = path
        self.memory_map = memory_map
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise TargetError(target, f"cannot open {path}: {e.strerror}") from None
        try:
            st = os.fstat(self._fd)
            self._file_size = st.st_size
            need = max((r.offset + r.size for r in memory_map), default=0)
            if need > st.st_size:
                raise TargetError(
                    target,
                    f"{path} holds {st.st_size} bytes but the memory map needs {need}",
                )
            self._mmap: mmap.mmap | None = (
                mmap.mmap(self._fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                if st.st_size
                else None
            )
        except BaseException:
            os.close(self._fd)
            raise
        self._mv = memoryview(self._mmap) if self._mmap is not None else memoryview(b"")
        self._closed = False
        self._overlay: PageSnapshot | None = None  # see sva.vmi.pagesnap

    # -- memory ---------------------------------------------------------------
    @property
    def memory_size(self) -> int:
        return self.memory_map.total_size

    def _check_open(self) -> None:
        if self._closed:
            raise TargetError(self.target, "backend is closed")

    def read(self, gpa: int, size: int) -> bytes:
        """Copy `size` bytes at guest-physical `gpa`."""
        if size > MAX_READ:
            raise MemoryAccessError(gpa, size, f"read larger than {MAX_READ} bytes refused")
        buf = bytearray(size)
        self.readinto(gpa, buf)
        return bytes(buf)

    def readinto(self, gpa: int, buf: bytearray | memoryview) -> int:
        """Fill `buf` from guest-physical `gpa`; returns len(buf) or raises. Inside
        `overlay(snapshot)` the snapshot's pages are read instead of live RAM."""
        self._check_open()
        out = memoryview(buf).cast("B")
        if self._overlay is not None:
            return self._overlay.readinto(gpa, out, self._read_live)
        return self._read_live(gpa, out)

    def _read_live(self, gpa: int, out: memoryview) -> int:
        """Fill `out` from the guest's RAM as it is now."""
        pos = 0
        for _region, off, n in self.memory_map.translate(gpa, len(out)):
            while n > 0:
                try:
                    got = os.preadv(self._fd, [out[pos : pos + n]], off)
                except OSError as e:
                    raise MemoryAccessError(gpa, len(out), f"read failed: {e.strerror}") from None
                if got <= 0:
                    raise MemoryAccessError(
                        gpa, len(out), f"backing file {self.path} ended at offset 0x{off:x}"
                    )
                pos += got
                off += got
                n -= got
        return pos

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy read-only view of [gpa, gpa+size), which must lie in one region.
        Inside `overlay(snapshot)`: a read-only copy from the snapshot instead."""
        self._check_open()
        if self._overlay is not None:
            if size > MAX_READ:
                raise MemoryAccessError(gpa, size, f"read larger than {MAX_READ} bytes refused")
            buf = bytearray(size)
            self.readinto(gpa, buf)
            return memoryview(buf).toreadonly()
        pieces = self.memory_map.translate(gpa, size)
        if len(pieces) > 1:
            raise MemoryAccessError(gpa, size, "range spans more than one memory region")
        if not pieces:
            return memoryview(b"")
        _region, off, n = pieces[0]
        # A backing file that shrank since we opened it would SIGBUS on access.
        if off + n > os.fstat(self._fd).st_size:
            raise MemoryAccessError(gpa, size, f"backing file {self.path} shrank")
        return self._mv[off : off + n]

    def region_views(self) -> Iterator[tuple[MemoryRegion, memoryview]]:
        """Each region with a zero-copy view of its bytes, for bulk scans."""
        for region in self.memory_map:
            yield region, self.view(region.gpa, region.size)

    # -- short-pause snapshots (sva.vmi.pagesnap) -----------------------------------
    def snapshot(
        self, pfns: Iterable[int], registers: bool = False, buffer: bytearray | None = None
    ) -> PageSnapshot:
        """Copy the guest pages `pfns` (page frame numbers; those outside RAM are left
        out) and, with `registers`, every vCPU's registers. Call it inside `frozen()`:
        the copy is consistent only if the guest does not run meanwhile. `buffer` (an
        earlier snapshot's `data`, no longer read) is reused when big enough: a fresh
        allocation costs a page fault per page, inside the pause."""
        from sva.vmi.pagesnap import PAGE_SHIFT, PAGE_SIZE, PageSnapshot, page_runs

        self._check_open()
        runs = page_runs(pfns)
        need = sum(n for _, n in runs) << PAGE_SHIFT
        data = buffer if buffer is not None and len(buffer) >= need else bytearray(need + need // 4)
        out = memoryview(data)
        pages: dict[int, int] = {}
        pos = 0
        # One read per run of consecutive pages, not through the mapping: pages faulted in
        # there would count in this process's RSS (with fault-around, 64 KiB per page).
        region_of, copy_run = self.memory_map.region_of, self._copy_run
        for first, count in runs:
            gpa, size = first << PAGE_SHIFT, count << PAGE_SHIFT
            r = region_of(gpa)
            try:
                if r is not None and gpa + size <= r.end:
                    copy_run(r.offset + gpa - r.gpa, out[pos : pos + size], gpa)  # the common case
                else:
                    self._read_live(gpa, out[pos : pos + size])
            except MemoryAccessError:  # a run reaching outside RAM: page by page
                for pfn in range(first, first + count):
                    try:
                        self._read_live(pfn << PAGE_SHIFT, out[pos : pos + PAGE_SIZE])
                    except MemoryAccessError:
                        continue
                    pages[pfn] = pos
                    pos += PAGE_SIZE
                continue
            for i in range(count):
                pages[first + i] = pos + (i << PAGE_SHIFT)
            pos += size
        out.release()
        regs = {r.vcpu: r for r in self._all_registers()} if registers else {}
        return PageSnapshot(pages, data, regs)

    def _copy_run(self, off: int, dst: memoryview, gpa: int) -> None:
        """Fill `dst` from backing-file offset `off` (guest-physical `gpa`, for errors)."""
        try:
            got = os.preadv(self._fd, [dst], off)
        except OSError as e:
            raise MemoryAccessError(gpa, len(dst), f"read failed: {e.strerror}") from None
        if got != len(dst):
            raise MemoryAccessError(gpa, len(dst), f"backing file {self.path} ended at offset 0x{off:x}")

    def _all_registers(self) -> list[Registers]:
        return [self.regs(i) for i in range(self.vcpu_count)]

    @contextlib.contextmanager
    def overlay(self, snapshot: PageSnapshot) -> Iterator[PageSnapshot]:
        """Serve reads (and register reads) from `snapshot` for the block."""
        if self._overlay is not None:
            raise TargetError(self.target, "an overlay is already in effect")
        self._overlay = snapshot
        try:
            yield snapshot
        finally:
            self._overlay = None

    def release_resident(self) -> bool:
        """Unmap from this process the RAM pages bulk scans faulted in; the next access
        faults them in again, with the same bytes. False when there is nothing to release.

        The mapping is a read-only MAP_SHARED view of the guest's RAM file: MADV_DONTNEED
        only drops this process's page-table entries for it. The pages stay in the file
        (they are the guest's memory, owned by QEMU) and nothing is written anywhere; but
        as long as they are mapped here they count in this process's RSS (RssFile or
        RssShmem), a whole guest's RAM after one full scan. A device mapping (an ivshmem
        BAR) refuses the advice with EINVAL; its pages never count in RSS.
        """
        if self._closed or self._mmap is None:
            return False
        try:
            self._mmap.madvise(mmap.MADV_DONTNEED)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False
            raise TargetError(self.target, f"cannot release the RAM mapping of {self.path}: {e.strerror}") from None
        except ValueError as e:  # the mapping was closed under us
            raise TargetError(self.target, f"cannot release the RAM mapping of {self.path}: {e}") from None
        return True

    # -- vCPU and execution control (overridden by live backends) ---------------
    @property
    def vcpu_count(self) -> int:
        return 0

    def regs(self, vcpu: int = 0) -> Registers:
        raise TargetError(self.target, "this target has no vCPU registers")

    def pause(self) -> None:
        raise TargetError(self.target, "this target cannot be paused")

    def resume(self) -> None:
        raise TargetError(self.target, "this target cannot be resumed")

    @contextlib.contextmanager
    def frozen(self) -> Iterator[PauseRecord]:
        """Pause the guest for the block and always resume it, whatever happens.

        For targets that do not run (snapshots) this is a no-op with a zero pause.
        """
        rec = PauseRecord(started=time.monotonic())
        if not self.capabilities.pause:
            rec.seconds = 0.0
            yield rec
            return
        self.pause()
        t0 = time.perf_counter()
        try:
            yield rec
        finally:
            # Resume even on KeyboardInterrupt/GeneratorExit; a second Ctrl-C during
            # the resume itself is the only way to leave the guest stopped.
            self.resume()
            rec.seconds = time.perf_counter() - t0

    # -- lifetime ---------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._mv.release()
        except BufferError:
            pass
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # A caller still holds a view; the mapping goes when it is released.
                pass
        os.close(self._fd)

    def __enter__(self) -> MappedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
