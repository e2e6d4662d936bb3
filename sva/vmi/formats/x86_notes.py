"""The x86 CPU-state notes of an ELF core, as QEMU's `dump-guest-memory` writes them.

QEMU writes, per vCPU and in vCPU order, first all `CORE`/NT_PRSTATUS notes, then all
`QEMU`/type-0 notes:

- NT_PRSTATUS is the kernel's `struct elf_prstatus`. Only pr_pid (QEMU stores vCPU
  index + 1) and pr_reg (a `user_regs_struct`) matter. Its layout follows e_machine,
  which QEMU picks from the *first vCPU's mode at dump time*: x86-64 (336 bytes, pr_pid
  at 32, 27 u64 registers at 112) when it was in long mode, else i386 (144 bytes,
  pr_pid at 24, 17 u32 registers at 72) — a guest stopped in firmware or real mode
  gives an ELF64 file with e_machine EM_386 and i386 prstatus notes.
- The QEMU note (`QEMUCPUState`) is the same in both cases and has what prstatus lacks:
  u32 version (1), u32 size, u64 rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags,
  ten 24-byte segments {u32 selector, u32 limit, u32 flags, u32 pad, u64 base} for cs
  ds es fs gs ss ldt tr gdt idt, u64 cr[5], then (432 bytes in) u64 kernel_gs_base.
  QEMU grows the struct at the end without bumping the version; `size` says which
  fields are present. Verified against QEMU 7.2: version 1, size 440 (0x1b8).

EFER is in neither note. sva's own writer adds an `SVA`/type-1 note per vCPU carrying
it (u32 version 1, u32 vCPU index, u64 efer) so it survives a round trip; other tools
skip notes they do not know.

Register names in `Registers.extra` follow the live QEMU backend: lower-case GPRs
("rax".."r15"; i386 values are stored under the same names), and per segment
"<seg>_selector", "<seg>_base", "<seg>_limit", "<seg>_flags", plus "kernel_gs_base".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sva.vmi.base import Registers

NT_PRSTATUS = 1
QEMU_NOTE_TYPE = 0
SVA_NOTE_EFER = 1

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1

# struct elf_prstatus for x86-64 and i386: (total size, pr_pid offset, pr_reg struct).
PRSTATUS_X86_64_SIZE = 336
_PR64_PID, _PR64_REGS_AT, _PR64_REGS = 32, 112, struct.Struct("<27Q")
PRSTATUS_I386_SIZE = 144
_PR32_PID, _PR32_REGS_AT, _PR32_REGS = 24, 72, struct.Struct("<17I")
_PID = struct.Struct("<I")

# user_regs_struct field order, named the way Registers.extra names them.
USER_REGS_X86_64 = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
    "rdx", "rsi", "rdi", "orig_rax", "rip", "cs_selector", "rflags", "rsp", "ss_selector",
    "fs_base", "gs_base", "ds_selector", "es_selector", "fs_selector", "gs_selector",
)  # fmt: skip
USER_REGS_I386 = (
    "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rax", "ds_selector", "es_selector",
    "fs_selector", "gs_selector", "orig_rax", "rip", "cs_selector", "rflags", "rsp", "ss_selector",
)  # fmt: skip

QEMU_STATE_VERSION = 1
_QEMU_HEAD = struct.Struct("<II18Q")  # version, size, 16 GPRs, rip, rflags
QEMU_GPRS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
_QEMU_SEGMENT = struct.Struct("<IIIIQ")
QEMU_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
_QEMU_SEGMENTS_AT = _QEMU_HEAD.size  # 152
_QEMU_CR = struct.Struct("<5Q")
_QEMU_CR_AT = _QEMU_SEGMENTS_AT + len(QEMU_SEGMENTS) * _QEMU_SEGMENT.size  # 392
QEMU_STATE_MIN_SIZE = _QEMU_CR_AT + _QEMU_CR.size  # 432: every field of version 1
_QEMU_KGS = struct.Struct("<Q")
QEMU_STATE_SIZE = QEMU_STATE_MIN_SIZE + _QEMU_KGS.size  # 440: what we write (and QEMU 7.2 does)

_SVA_EFER = struct.Struct("<IIQ")
SVA_EFER_VERSION = 1


class NoteLayoutError(ValueError):
    """A note whose size or fields do not match its layout (the ELF reader adds the where)."""


@dataclass(frozen=True)
class Segment:
    selector: int
    limit: int
    flags: int
    base: int


@dataclass(frozen=True)
class PrStatus:
    pid: int
    regs: dict[str, int]  # named as in USER_REGS_*


@dataclass(frozen=True)
class QemuCpuState:
    size: int
    gprs: dict[str, int]
    rip: int
    rflags: int
    segments: dict[str, Segment]
    cr: tuple[int, int, int, int, int]
    kernel_gs_base: int | None  # None when `size` says the field is absent


def parse_prstatus(desc: bytes) -> PrStatus:
    if len(desc) == PRSTATUS_X86_64_SIZE:
        names, values = USER_REGS_X86_64, _PR64_REGS.unpack_from(desc, _PR64_REGS_AT)
        pid = _PID.unpack_from(desc, _PR64_PID)[0]
    elif len(desc) == PRSTATUS_I386_SIZE:
        names, values = USER_REGS_I386, _PR32_REGS.unpack_from(desc, _PR32_REGS_AT)
        pid = _PID.unpack_from(desc, _PR32_PID)[0]
    else:
        raise NoteLayoutError(
            f"NT_PRSTATUS holds {len(desc)} bytes; expected {PRSTATUS_X86_64_SIZE} (x86-64) "
            f"or {PRSTATUS_I386_SIZE} (i386)"
        )
    regs = dict(zip(names, values))
    for name in names:
        if name.endswith("_selector"):  # i386 keeps garbage in the upper 16 bits
            regs[name] &= 0xFFFF
    return PrStatus(pid=pid, regs=regs)


def parse_qemu_cpu_state(desc: bytes) -> QemuCpuState:
    if len(desc) < 8:
        raise NoteLayoutError(f"QEMU CPU-state note holds {len(desc)} bytes, too few for its header")
    version, size = struct.unpack_from("<II", desc)
    if version != QEMU_STATE_VERSION:
        raise NoteLayoutError(f"QEMU CPU-state note version {version} is not supported (expected 1)")
    if size < QEMU_STATE_MIN_SIZE:
        raise NoteLayoutError(
            f"QEMU CPU-state note declares size {size}, below the {QEMU_STATE_MIN_SIZE} bytes of version 1"
        )
    if size > len(desc):
        raise NoteLayoutError(f"QEMU CPU-state note declares size {size} but holds only {len(desc)} bytes")
    head = _QEMU_HEAD.unpack_from(desc)
    segments: dict[str, Segment] = {}
    for i, name in enumerate(QEMU_SEGMENTS):
        at = _QEMU_SEGMENTS_AT + i * _QEMU_SEGMENT.size
        selector, limit, flags, _pad, base = _QEMU_SEGMENT.unpack_from(desc, at)
        segments[name] = Segment(selector, limit, flags, base)
    cr = _QEMU_CR.unpack_from(desc, _QEMU_CR_AT)
    kgs = _QEMU_KGS.unpack_from(desc, QEMU_STATE_MIN_SIZE)[0] if size >= QEMU_STATE_SIZE else None
    return QemuCpuState(
        size=size,
        gprs=dict(zip(QEMU_GPRS, head[2:18])),
        rip=head[18],
        rflags=head[19],
        segments=segments,
        cr=(cr[0], cr[1], cr[2], cr[3], cr[4]),
        kernel_gs_base=kgs,
    )


def parse_sva_efer(desc: bytes) -> tuple[int, int]:
    """(vCPU index, EFER) from sva's own note."""
    if len(desc) != _SVA_EFER.size:
        raise NoteLayoutError(f"SVA EFER note holds {len(desc)} bytes; expected {_SVA_EFER.size}")
    version, vcpu, efer = _SVA_EFER.unpack(desc)
    if version != SVA_EFER_VERSION:
        raise NoteLayoutError(f"SVA EFER note version {version} is not supported")
    return vcpu, efer


def registers_from_notes(
    vcpu: int, prstatus: PrStatus | None, qemu: QemuCpuState | None, efer: int | None
) -> Registers:
    """One vCPU's Registers; the QEMU note wins where both notes hold a value."""
    if prstatus is None and qemu is None:
        raise ValueError("registers_from_notes needs at least one note")
    extra: dict[str, int] = {}
    if prstatus is not None:
        extra.update(prstatus.regs)
    rip, rsp, rflags = extra.pop("rip", 0), extra.pop("rsp", 0), extra.pop("rflags", 0)
    extra.pop("orig_rax", None)  # syscall restart bookkeeping, meaningless for a vCPU
    cr = (0, 0, 0, 0, 0)
    gdt = idt = Segment(0, 0, 0, 0)
    if qemu is not None:
        extra.update(qemu.gprs)
        rip, rsp, rflags = qemu.rip, extra.pop("rsp"), qemu.rflags
        for name, seg in qemu.segments.items():
            if name not in ("gdt", "idt"):
                extra.update(
                    {f"{name}_selector": seg.selector, f"{name}_limit": seg.limit,
                     f"{name}_flags": seg.flags, f"{name}_base": seg.base}
                )  # fmt: skip
        if qemu.kernel_gs_base is not None:
            extra["kernel_gs_base"] = qemu.kernel_gs_base
        cr, gdt, idt = qemu.cr, qemu.segments["gdt"], qemu.segments["idt"]
    return Registers(
        vcpu=vcpu,
        rip=rip,
        rsp=rsp,
        rflags=rflags,
        cr0=cr[0],
        cr2=cr[2],
        cr3=cr[3],
        cr4=cr[4],
        # Neither QEMU note holds EFER: without sva's own note, 0 stands for "unknown".
        efer=efer if efer is not None else 0,
        idtr_base=idt.base,
        idtr_limit=idt.limit,
        gdtr_base=gdt.base,
        gdtr_limit=gdt.limit,
        extra=extra,
    )


# -- writing ---------------------------------------------------------------------


def _value(regs: Registers, name: str) -> int:
    """A register from fields or extra; 32-bit names ("eax") stand in for 64-bit ones."""
    if name in ("rip", "rsp", "rflags"):
        return getattr(regs, name) & MASK64
    v = regs.extra.get(name)
    if v is None and name[0] == "r" and name[1:] in ("ax", "bx", "cx", "dx", "si", "di", "bp"):
        v = regs.extra.get("e" + name[1:])
    return (v or 0) & MASK64


def pack_prstatus_x86_64(regs: Registers, pid: int) -> bytes:
    buf = bytearray(PRSTATUS_X86_64_SIZE)
    _PID.pack_into(buf, _PR64_PID, pid & MASK32)
    _PR64_REGS.pack_into(buf, _PR64_REGS_AT, *(_value(regs, name) for name in USER_REGS_X86_64))
    return bytes(buf)


def pack_qemu_cpu_state(regs: Registers) -> bytes:
    buf = bytearray(QEMU_STATE_SIZE)
    _QEMU_HEAD.pack_into(
        buf, 0, QEMU_STATE_VERSION, QEMU_STATE_SIZE,
        *(_value(regs, g) for g in QEMU_GPRS), _value(regs, "rip"), _value(regs, "rflags"),
    )  # fmt: skip
    for i, name in enumerate(QEMU_SEGMENTS):
        if name == "gdt":
            seg = (0, regs.gdtr_limit & MASK32, 0, 0, regs.gdtr_base & MASK64)
        elif name == "idt":
            seg = (0, regs.idtr_limit & MASK32, 0, 0, regs.idtr_base & MASK64)
        else:
            seg = (
                _value(regs, f"{name}_selector") & MASK32,
                _value(regs, f"{name}_limit") & MASK32,
                _value(regs, f"{name}_flags") & MASK32,
                0,
                _value(regs, f"{name}_base"),
            )
        _QEMU_SEGMENT.pack_into(buf, _QEMU_SEGMENTS_AT + i * _QEMU_SEGMENT.size, *seg)
    cr = (regs.cr0, 0, regs.cr2, regs.cr3, regs.cr4)  # QEMU keeps a slot for the unused cr1
    _QEMU_CR.pack_into(buf, _QEMU_CR_AT, *(v & MASK64 for v in cr))
    _QEMU_KGS.pack_into(buf, QEMU_STATE_MIN_SIZE, _value(regs, "kernel_gs_base"))
    return bytes(buf)


def pack_sva_efer(vcpu: int, regs: Registers) -> bytes:
    return _SVA_EFER.pack(SVA_EFER_VERSION, vcpu & MASK32, regs.efer & MASK64)
