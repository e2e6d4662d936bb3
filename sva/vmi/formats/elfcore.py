"""ELF64 core snapshots, the format of QEMU's `dump-guest-memory` (paging=false).

The file is an ELF64 little-endian ET_CORE. Each PT_LOAD maps p_filesz bytes at file
offset p_offset to guest-physical address p_paddr (p_vaddr is not used; QEMU sets it
equal to p_paddr). A p_memsz beyond p_filesz would be a zero-filled tail; we leave it as
a hole rather than invent RAM the file does not hold. One PT_NOTE holds the vCPU state
(see `x86_notes`). More than 65534 program headers use ELF's PN_XNUM escape: e_phnum is
0xffff and section header 0's sh_info has the real count.

What real QEMU 7.2 files look like (checked with readelf and by hand):
- e_machine is EM_X86_64 only if the first vCPU was in long mode; a guest in firmware or
  real mode gives EM_386 (still ELF64 on a PC, because the BIOS ROM ends at 4 GiB).
- e_ehsize is 8, not 64 (QEMU stores sizeof a pointer), so it is not checked.
- There is a section header table with just .shstrtab; it is ignored.
- PT_LOADs follow QEMU's RAM blocks, e.g. for q35 -m 3G: [0, 0xc0000), [0xc0000,
  0xe0000), [0xe0000, 0x100000), [0x100000, 2 GiB), the BIOS at [0xfffc0000, 4 GiB) and
  the RAM above 4 GiB at [4 GiB, 5 GiB). Data is stored unaligned, right after the notes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from sva.errors import TargetError
from sva.vmi.base import Backend, MemoryRegion, Registers
from sva.vmi.formats.common import (
    MAX_NOTE_BYTES,
    MAX_NOTES,
    MAX_SEGMENTS,
    MAX_VCPUS,
    SnapshotBackend,
    SnapshotFile,
    atomic_output,
    build_memory_map,
    check_gpa_range,
    copy_region,
    page_align,
    pwrite_all,
    regions_to_write,
)
from sva.vmi.formats.x86_notes import (
    NT_PRSTATUS,
    QEMU_NOTE_TYPE,
    SVA_NOTE_EFER,
    NoteLayoutError,
    PrStatus,
    QemuCpuState,
    pack_prstatus_x86_64,
    pack_qemu_cpu_state,
    pack_sva_efer,
    parse_prstatus,
    parse_qemu_cpu_state,
    parse_sva_efer,
    registers_from_notes,
)

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_CORE = 4
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr, 56 bytes
SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr, 64 bytes
NOTE_HDR = struct.Struct("<III")  # namesz, descsz, type
MAX_NOTE_NAME = 256  # real names are "CORE", "QEMU", "LINUX", "VMCOREINFO"

_OVERLAP_HINT = (
    "; overlapping PT_LOADs mean this is not a physical-memory dump "
    "(a dump-guest-memory with paging=true maps virtual ranges)"
)


@dataclass(frozen=True)
class ProgramHeader:
    index: int
    at: int  # file offset of this header, for error messages
    type: int
    offset: int
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class Note:
    name: bytes  # without the trailing NULs
    type: int
    desc: bytes
    at: int  # file offset of the note header


def _align4(n: int) -> int:
    return (n + 3) & ~3


def read_program_headers(f: SnapshotFile) -> list[ProgramHeader]:
    """Check the ELF header is an x86 ELF64 LE core and return its program headers."""
    head = f.read_exact(0, min(f.size, EHDR.size), "ELF header")
    if not head.startswith(ELF_MAGIC):
        raise f.error("not an ELF file (no \\x7fELF magic)", 0)
    if len(head) < EHDR.size:
        raise f.error(
            f"ELF header is truncated: the file has {f.size} bytes, the header needs {EHDR.size}", 0
        )
    (ident, e_type, e_machine, _version, _entry, e_phoff, e_shoff, _flags,
     _ehsize, e_phentsize, e_phnum, e_shentsize, _shnum, _shstrndx) = EHDR.unpack(head)  # fmt: skip
    if ident[4] != ELFCLASS64:
        raise f.error(f"ELF class {ident[4]} is not ELF64; only 64-bit cores are supported", 4)
    if ident[5] != ELFDATA2LSB:
        raise f.error(f"ELF data encoding {ident[5]} is not little-endian", 5)
    if e_type != ET_CORE:
        raise f.error(f"ELF type {e_type} is not a core file (ET_CORE=4), so not a memory dump", 16)
    if e_machine not in (EM_X86_64, EM_386):
        raise f.error(f"ELF machine {e_machine} is not x86 (EM_X86_64=62, or EM_386=3 from QEMU)", 18)
    # e_ehsize is deliberately unchecked: QEMU 7.2 writes 8 there.
    if e_phentsize != PHDR.size:
        raise f.error(f"program header entry size {e_phentsize}, expected {PHDR.size}", 54)
    phnum = e_phnum
    if e_phnum == PN_XNUM:
        # Too many headers for e_phnum: ELF puts the real count in section 0's sh_info.
        if e_shoff == 0 or e_shentsize != SHDR.size:
            raise f.error("e_phnum is PN_XNUM but there is no valid section header 0 with the count", 56)
        phnum = SHDR.unpack(f.read_exact(e_shoff, SHDR.size, "section header 0 (program header count)"))[7]
    if phnum == 0:
        raise f.error("no program headers, so nothing maps guest memory", 56)
    if phnum > MAX_SEGMENTS:
        raise f.error(f"{phnum} program headers; refusing more than {MAX_SEGMENTS}", 56)
    table = f.read_exact(e_phoff, phnum * PHDR.size, f"program header table ({phnum} entries)")
    headers = []
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = PHDR.unpack_from(
            table, i * PHDR.size
        )
        headers.append(
            ProgramHeader(i, e_phoff + i * PHDR.size, p_type, p_offset, p_paddr, p_filesz, p_memsz)
        )
    return headers


def load_regions(f: SnapshotFile, headers: list[ProgramHeader]) -> list[MemoryRegion]:
    regions = []
    for ph in headers:
        if ph.type != PT_LOAD:
            continue
        what = f"PT_LOAD #{ph.index}"
        if ph.filesz > ph.memsz:
            raise f.error(f"{what}: p_filesz 0x{ph.filesz:x} exceeds p_memsz 0x{ph.memsz:x}", ph.at)
        check_gpa_range(f, what, ph.paddr, ph.memsz, ph.at)
        if ph.filesz == 0:
            continue
        if ph.offset + ph.filesz > f.size:
            raise f.error(
                f"{what} (GPA 0x{ph.paddr:x}+0x{ph.filesz:x}) is truncated: its data ends at "
                f"0x{ph.offset + ph.filesz:x} but the file ends at 0x{f.size:x} "
                f"({ph.offset + ph.filesz - f.size} bytes missing)",
                ph.at,
            )
        regions.append(
            MemoryRegion(gpa=ph.paddr, size=ph.filesz, offset=ph.offset, name=f"PT_LOAD[{ph.index}]")
        )
    if not regions:
        raise f.error("no PT_LOAD segment holds any data")
    return regions


def read_notes(f: SnapshotFile, headers: list[ProgramHeader]) -> list[Note]:
    notes: list[Note] = []
    total = 0
    for ph in headers:
        if ph.type != PT_NOTE or ph.filesz == 0:
            continue
        total += ph.filesz
        if total > MAX_NOTE_BYTES:
            raise f.error(f"PT_NOTE segments total more than {MAX_NOTE_BYTES} bytes; refusing", ph.at)
        data = f.read_exact(ph.offset, ph.filesz, f"PT_NOTE #{ph.index}")
        pos = 0
        while pos < len(data):
            at = ph.offset + pos
            left = len(data) - pos
            if left < NOTE_HDR.size:
                if any(data[pos:]):  # zero padding at the end is harmless
                    raise f.error(
                        f"PT_NOTE #{ph.index}: {left} stray bytes where a 12-byte note header should be", at
                    )
                break
            if len(notes) >= MAX_NOTES:
                raise f.error(f"more than {MAX_NOTES} notes; refusing", at)
            namesz, descsz, ntype = NOTE_HDR.unpack_from(data, pos)
            if namesz > MAX_NOTE_NAME:
                raise f.error(
                    f"note #{len(notes)} declares a {namesz}-byte name (at most {MAX_NOTE_NAME})", at
                )
            desc_at = pos + NOTE_HDR.size + _align4(namesz)
            if desc_at + descsz > len(data):
                raise f.error(
                    f"note #{len(notes)} (namesz {namesz}, descsz {descsz}) runs "
                    f"{desc_at + descsz - len(data)} bytes past the end of PT_NOTE #{ph.index}",
                    at,
                )
            name = data[pos + NOTE_HDR.size : pos + NOTE_HDR.size + namesz].rstrip(b"\0")
            notes.append(Note(name, ntype, data[desc_at : desc_at + descsz], at))
            pos = desc_at + _align4(descsz)
    return notes


def registers_from_elf_notes(f: SnapshotFile, notes: list[Note]) -> list[Registers]:
    """Pair the i-th NT_PRSTATUS with the i-th QEMU note: QEMU writes both in vCPU order."""
    prstatus: list[PrStatus] = []
    qemu: list[QemuCpuState] = []
    efer: dict[int, int] = {}
    for note in notes:
        try:
            if note.name == b"CORE" and note.type == NT_PRSTATUS:
                prstatus.append(parse_prstatus(note.desc))
            elif note.name == b"QEMU" and note.type == QEMU_NOTE_TYPE:
                qemu.append(parse_qemu_cpu_state(note.desc))
            elif note.name == b"SVA" and note.type == SVA_NOTE_EFER:
                vcpu, value = parse_sva_efer(note.desc)
                if vcpu in efer:
                    raise NoteLayoutError(f"a second EFER note for vCPU {vcpu}")
                efer[vcpu] = value
        except NoteLayoutError as e:
            raise f.error(f"note {note.name!r} type {note.type}: {e}", note.at) from None
    if prstatus and qemu and len(prstatus) != len(qemu):
        raise f.error(
            f"{len(prstatus)} NT_PRSTATUS notes but {len(qemu)} QEMU CPU-state notes; "
            "expected one of each per vCPU"
        )
    count = max(len(prstatus), len(qemu))
    if count > MAX_VCPUS:
        raise f.error(f"{count} vCPUs; refusing more than {MAX_VCPUS}")
    stray = sorted(v for v in efer if v >= count)
    if stray:
        raise f.error(f"EFER note for vCPU {stray[0]}, but the file has {count} vCPU(s)")
    return [
        registers_from_notes(
            i, prstatus[i] if prstatus else None, qemu[i] if qemu else None, efer.get(i)
        )
        for i in range(count)
    ]


class ElfCoreSnapshot(SnapshotBackend):
    """A QEMU dump-guest-memory ELF core: one region per PT_LOAD, registers per vCPU."""

    def __init__(self, path: str, target: str | None = None) -> None:
        target = target or f"elf:{path}"
        with SnapshotFile(path, target) as f:
            headers = read_program_headers(f)
            regions = load_regions(f, headers)
            registers = registers_from_elf_notes(f, read_notes(f, headers))
        super().__init__(target, path, build_memory_map(path, regions, _OVERLAP_HINT), registers)


# -- writing ---------------------------------------------------------------------


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name += b"\0"
    pad_name = b"\0" * (_align4(len(name)) - len(name))
    pad_desc = b"\0" * (_align4(len(desc)) - len(desc))
    return NOTE_HDR.pack(len(name), len(desc), ntype) + name + pad_name + desc + pad_desc


def build_notes(registers: list[Registers]) -> bytes:
    """The PT_NOTE payload in QEMU's order: all NT_PRSTATUS, then all QEMU notes; ours last."""
    parts = [_note(b"CORE", NT_PRSTATUS, pack_prstatus_x86_64(r, pid=i + 1)) for i, r in enumerate(registers)]
    parts += [_note(b"QEMU", QEMU_NOTE_TYPE, pack_qemu_cpu_state(r)) for r in registers]
    parts += [_note(b"SVA", SVA_NOTE_EFER, pack_sva_efer(i, r)) for i, r in enumerate(registers)]
    return b"".join(parts)


def write_elf(backend: Backend, out_path: str, registers: list[Registers] | None = None) -> None:
    """Save `backend` as an x86-64 ELF core readable by ElfCoreSnapshot and volatility3.

    `registers` None takes every vCPU's registers from the backend when it has them;
    an empty list writes no CPU state. Region data is page-aligned in the file.
    """
    regions = regions_to_write(backend, out_path)
    if registers is None:
        registers = (
            [backend.regs(i) for i in range(backend.vcpu_count)] if backend.capabilities.registers else []
        )
    if len(registers) > MAX_VCPUS:
        raise TargetError(out_path, f"{len(registers)} vCPUs; at most {MAX_VCPUS} are supported")
    notes = build_notes(list(registers))
    phnum = len(regions) + (1 if notes else 0)
    xnum = phnum >= PN_XNUM
    phoff = EHDR.size
    shoff = phoff + phnum * PHDR.size if xnum else 0
    notes_at = phoff + phnum * PHDR.size + (SHDR.size if xnum else 0)
    data_at = page_align(notes_at + len(notes))

    table = bytearray()
    if notes:
        table += PHDR.pack(PT_NOTE, 0, notes_at, 0, 0, len(notes), len(notes), 0)
    placed: list[tuple[MemoryRegion, int]] = []
    for r in regions:
        # p_vaddr = p_paddr as QEMU writes it for paging=false dumps.
        table += PHDR.pack(PT_LOAD, 0, data_at, r.gpa, r.gpa, r.size, r.size, 0)
        placed.append((r, data_at))
        data_at = page_align(data_at + r.size)
    end = placed[-1][1] + placed[-1][0].size

    ident = ELF_MAGIC + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT]) + bytes(9)
    header = EHDR.pack(
        ident, ET_CORE, EM_X86_64, EV_CURRENT, 0, phoff, shoff, 0, EHDR.size, PHDR.size,
        PN_XNUM if xnum else phnum, SHDR.size if xnum else 0, 1 if xnum else 0, 0,
    )  # fmt: skip
    with atomic_output(out_path) as fd:
        pwrite_all(fd, header, 0)
        pwrite_all(fd, table, phoff)
        if xnum:
            pwrite_all(fd, SHDR.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0), shoff)
        pwrite_all(fd, notes, notes_at)
        for region, at in placed:
            copy_region(backend, region, fd, at)
        os.ftruncate(fd, end)
