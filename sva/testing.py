"""Factories for tests: real sva objects built from generated files, not mocks.

- `make_raw_file` writes deterministic random bytes (a raw image, or backing for a map).
- `synthetic_backend` builds a read-only backend with any memory map (holes, RAM above
  4 GiB) over one generated file, optionally with vCPU registers.
- `sample_registers` makes a vCPU state with every field and extra register distinct.
- `qemu_dump_guest_memory` asks a running QEMU for a dump-guest-memory ELF core.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from sva.vmi.base import MemoryMap, MemoryRegion, Registers
from sva.vmi.formats.common import SnapshotBackend
from sva.vmi.formats.x86_notes import QEMU_GPRS

_FILL_CHUNK = 1 << 20


def make_raw_file(path: str | os.PathLike[str], size: int, seed: int = 0) -> Path:
    """Write `size` pseudo-random bytes (the same for the same seed) to `path`."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, _FILL_CHUNK)
            f.write(rng.randbytes(n))
            left -= n
    return Path(path)


def synthetic_backend(
    tmp_path: str | os.PathLike[str],
    regions: Sequence[tuple[int, int]],
    seed: int = 0,
    registers: Sequence[Registers] = (),
    name: str = "synthetic.bin",
) -> SnapshotBackend:
    """A read-only backend whose RAM is `regions` [(gpa, size), …] of random bytes.

    All regions share one backing file, laid out back to back, so the result exercises
    the GPA→offset translation the way a real multi-region guest does.
    """
    path = Path(tmp_path) / name
    layout: list[MemoryRegion] = []
    offset = 0
    for i, (gpa, size) in enumerate(regions):
        layout.append(MemoryRegion(gpa=gpa, size=size, offset=offset, name=f"ram{i}"))
        offset += size
    make_raw_file(path, offset, seed)
    return SnapshotBackend(f"synthetic:{path}", str(path), MemoryMap(layout), registers)


def sample_registers(vcpu: int, seed: int = 0) -> Registers:
    """A vCPU state with distinct values everywhere, including the extra registers the
    ELF writer stores (GPRs, segment selector/base/limit/flags, kernel_gs_base)."""
    rng = random.Random(seed * 1000 + vcpu)

    def u64() -> int:
        return rng.getrandbits(64)

    def u32() -> int:
        return rng.getrandbits(32)

    extra = {name: u64() for name in QEMU_GPRS if name != "rsp"}
    for seg in ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr"):
        extra |= {f"{seg}_selector": rng.getrandbits(16), f"{seg}_limit": u32(),
                  f"{seg}_flags": u32(), f"{seg}_base": u64()}  # fmt: skip
    extra["kernel_gs_base"] = u64()
    return Registers(
        vcpu=vcpu, rip=u64(), rsp=u64(), rflags=u64(), cr0=u64(), cr2=u64(), cr3=u64(),
        cr4=u64(), efer=u64(), idtr_base=u64(), idtr_limit=u32(), gdtr_base=u64(),
        gdtr_limit=u32(), extra=extra,
    )  # fmt: skip


def qemu_dump_guest_memory(qmp_path: str, out_path: str | os.PathLike[str], timeout: float = 120.0) -> Path:
    """Have the QEMU behind `qmp_path` write a physical (paging=false) ELF core."""
    from sva.vmi.qmp import QmpClient

    out = Path(out_path).resolve()
    with QmpClient(qmp_path, timeout=timeout) as qmp:
        # Without "detach" the command returns only once the file is complete.
        qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{out}"})
    return out
