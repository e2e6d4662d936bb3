"""Snapshot formats: write/read round trips, a real QEMU dump, and hostile files."""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sva.errors import MemoryAccessError, SnapshotFormatError, SvaError, TargetError
from sva.testing import make_raw_file, qemu_dump_guest_memory, sample_registers, synthetic_backend
from sva.vmi import open_target
from sva.vmi.base import PAGE_SIZE, MemoryMap, MemoryRegion
from sva.vmi.formats.common import COPY_CHUNK, SnapshotBackend
from sva.vmi.formats.elfcore import EHDR, NOTE_HDR, PHDR, PT_LOAD, PT_NOTE, SHDR
from sva.vmi.formats.lime import LIME_HEADER, LIME_MAGIC
from sva.vmi.formats.x86_notes import parse_prstatus
from sva.vmi.snapshot import (
    ElfCoreSnapshot,
    LimeSnapshot,
    RawSnapshot,
    open_snapshot,
    write_elf,
    write_lime,
    write_raw,
)

GiB = 1 << 30
MiB = 1 << 20

# Below 1 MiB with a legacy hole, a region larger than one copy chunk, and RAM above 4 GiB.
MULTI_REGIONS = [(0, 0xA0000), (0x100000, COPY_CHUNK + 3 * PAGE_SIZE), (4 * GiB, 16 * PAGE_SIZE)]


@pytest.fixture
def multi(tmp_path: Path) -> Iterator[SnapshotBackend]:
    src = tmp_path / "src"
    src.mkdir()
    regs = [sample_registers(0, seed=1), sample_registers(1, seed=1)]
    with synthetic_backend(src, MULTI_REGIONS, seed=7, registers=regs) as b:
        yield b


def spans(backend: SnapshotBackend) -> list[tuple[int, int]]:
    return [(r.gpa, r.size) for r in backend.memory_map]


def assert_same_bytes(src: SnapshotBackend, dst: SnapshotBackend) -> None:
    """Every byte of every source region reads the same from `dst`."""
    for r in src.memory_map:
        for off in range(0, r.size, MiB):
            n = min(MiB, r.size - off)
            assert src.read(r.gpa + off, n) == dst.read(r.gpa + off, n), f"GPA 0x{r.gpa + off:x}"


def assert_registers_equal(a: SnapshotBackend, b: SnapshotBackend) -> None:
    assert a.vcpu_count == b.vcpu_count
    for i in range(a.vcpu_count):
        assert a.regs(i) == b.regs(i)
        assert a.regs(i).extra == b.regs(i).extra


# -- round trips ---------------------------------------------------------------------


def test_raw_round_trip_keeps_bytes_and_zero_holes(multi: SnapshotBackend, tmp_path: Path) -> None:
    out = tmp_path / "m.raw"
    write_raw(multi, str(out))
    with open_snapshot(str(out)) as snap:
        assert isinstance(snap, RawSnapshot)
        assert spans(snap) == [(0, multi.memory_map.end)]
        assert not snap.capabilities.registers and snap.vcpu_count == 0
        assert_same_bytes(multi, snap)
        regions = list(multi.memory_map)
        for a, b in zip(regions, regions[1:]):
            for gpa in (a.end, (a.end + b.gpa) // 2 & ~0xFFF, b.gpa - PAGE_SIZE):
                assert snap.read(gpa, PAGE_SIZE) == bytes(PAGE_SIZE), f"hole at 0x{gpa:x}"
    st = os.stat(out)
    assert st.st_size == 4 * GiB + 16 * PAGE_SIZE
    assert st.st_blocks * 512 < 64 * MiB, "holes must stay sparse"


def test_elf_round_trip_keeps_map_bytes_and_registers(multi: SnapshotBackend, tmp_path: Path) -> None:
    out = tmp_path / "m.elf"
    write_elf(multi, str(out), None)
    with open_snapshot(str(out)) as snap:
        assert isinstance(snap, ElfCoreSnapshot)
        assert spans(snap) == spans(multi)
        assert snap.capabilities.registers and not snap.capabilities.live and not snap.capabilities.pause
        assert_same_bytes(multi, snap)
        assert_registers_equal(multi, snap)
        assert snap.regs(1).efer == multi.regs(1).efer != 0


def test_lime_round_trip(multi: SnapshotBackend, tmp_path: Path) -> None:
    out = tmp_path / "m.lime"
    write_lime(multi, str(out))
    with open_snapshot(str(out)) as snap:
        assert isinstance(snap, LimeSnapshot)
        assert spans(snap) == spans(multi)
        assert_same_bytes(multi, snap)
        assert snap.vcpu_count == 0
    assert os.path.getsize(out) == multi.memory_map.total_size + 3 * LIME_HEADER.size


def test_odd_sized_regions_round_trip_through_elf_and_lime(tmp_path: Path) -> None:
    regions = [(0x1000, 1), (0x3000, 4095), (0x10_0000, COPY_CHUNK + 17)]
    with synthetic_backend(tmp_path, regions, seed=3) as src:
        write_elf(src, str(tmp_path / "o.elf"), [])
        write_lime(src, str(tmp_path / "o.lime"))
        for name in ("o.elf", "o.lime"):
            with open_snapshot(str(tmp_path / name)) as snap:
                assert spans(snap) == regions
                assert_same_bytes(src, snap)


def test_formats_convert_into_each_other(multi: SnapshotBackend, tmp_path: Path) -> None:
    write_lime(multi, str(tmp_path / "a.lime"))
    with open_snapshot(str(tmp_path / "a.lime")) as lime:
        write_elf(lime, str(tmp_path / "b.elf"), [multi.regs(0)])
    with open_snapshot(str(tmp_path / "b.elf")) as elf:
        assert elf.vcpu_count == 1 and elf.regs(0) == multi.regs(0)
        write_raw(elf, str(tmp_path / "c.raw"))
    with open_snapshot(str(tmp_path / "c.raw")) as raw:
        assert_same_bytes(multi, raw)


def test_elf_without_registers_has_none(multi: SnapshotBackend, tmp_path: Path) -> None:
    write_elf(multi, str(tmp_path / "n.elf"), [])
    with open_snapshot(str(tmp_path / "n.elf")) as snap:
        assert not snap.capabilities.registers and snap.vcpu_count == 0
        with pytest.raises(TargetError, match="no vCPU registers"):
            snap.regs(0)


def test_bad_vcpu_index_is_a_clear_error(multi: SnapshotBackend, tmp_path: Path) -> None:
    write_elf(multi, str(tmp_path / "v.elf"))
    with open_snapshot(str(tmp_path / "v.elf")) as snap:
        for bad in (2, -1, 10**9):
            with pytest.raises(TargetError, match=r"no vCPU .*holds 2 vCPU\(s\), numbered 0\.\.1"):
                snap.regs(bad)


def test_zero_runs_are_written_sparse(tmp_path: Path) -> None:
    image = tmp_path / "zero.raw"
    with open(image, "wb") as f:  # 32 MiB of zeros around one page of data
        f.truncate(32 * MiB)
        f.seek(16 * MiB)
        f.write(b"\xa5" * PAGE_SIZE)
    with open_snapshot(str(image)) as src:
        for name, writer in (("z.elf", write_elf), ("z.lime", write_lime), ("z.raw", write_raw)):
            writer(src, str(tmp_path / name))
            assert os.stat(tmp_path / name).st_blocks * 512 < 8 * MiB, name
            with open_snapshot(str(tmp_path / name)) as snap:
                assert snap.read(16 * MiB - 1, 3) == b"\0\xa5\xa5"


def test_volatility3_reads_our_elf_and_lime(multi: SnapshotBackend, tmp_path: Path) -> None:
    try:
        from volatility3.framework import contexts
        from volatility3.framework.layers import elf, lime, physical
    except ImportError:
        pytest.skip("volatility3 is not installed")
    write_elf(multi, str(tmp_path / "v.elf"))
    write_lime(multi, str(tmp_path / "v.lime"))
    for name, layer_class in (("v.elf", elf.Elf64Layer), ("v.lime", lime.LimeLayer)):
        ctx = contexts.Context()
        ctx.config["base.location"] = (tmp_path / name).as_uri()
        ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
        ctx.config["mem.base_layer"] = "base"
        layer = layer_class(ctx, "mem", "mem")
        for r in multi.memory_map:
            assert layer.read(r.gpa, 4096) == multi.read(r.gpa, 4096), (name, hex(r.gpa))
            assert layer.read(r.end - 100, 100) == multi.read(r.end - 100, 100), (name, hex(r.gpa))


# -- writer failures -------------------------------------------------------------------


class FailingBackend(SnapshotBackend):
    """Reads fine for a while, then fails like a guest RAM mapping that vanished."""

    def readinto(self, gpa: int, buf: bytearray | memoryview) -> int:
        if gpa >= 0x100000 + COPY_CHUNK:
            raise MemoryAccessError(gpa, len(buf), "mapping vanished")
        return super().readinto(gpa, buf)


@pytest.mark.parametrize("writer", [write_raw, write_elf, write_lime])
def test_failed_write_leaves_nothing_behind(
    writer: Callable[..., None], multi: SnapshotBackend, tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    failing = FailingBackend("failing", multi.path, multi.memory_map)
    previous = out_dir / "keep.snap"
    previous.write_bytes(b"previous snapshot")
    with pytest.raises(MemoryAccessError):
        writer(failing, str(out_dir / "new.snap"))
    with pytest.raises(MemoryAccessError):
        writer(failing, str(previous))
    failing.close()
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep.snap"]
    assert previous.read_bytes() == b"previous snapshot"


def test_unwritable_output_is_a_target_error(multi: SnapshotBackend, tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="cannot write snapshot"):
        write_raw(multi, str(tmp_path / "missing-dir" / "x.raw"))


# -- a real QEMU dump ------------------------------------------------------------------


@pytest.fixture
def qemu_reset_dump(bare_vm: Callable[..., object], tmp_path: Path) -> Path:
    """dump-guest-memory of a 64 MiB, 2-vCPU q35 machine still in its reset state."""
    vm = bare_vm(mem="64M", ram="none", smp=2)
    return qemu_dump_guest_memory(vm.qmp_path, tmp_path / "qemu.elf")  # type: ignore[attr-defined]


def test_real_qemu_dump_parses_with_reset_state(qemu_reset_dump: Path, tmp_path: Path) -> None:
    with open_snapshot(str(qemu_reset_dump)) as snap:
        assert isinstance(snap, ElfCoreSnapshot)
        assert snap.vcpu_count == 2 and snap.capabilities.registers
        # q35's RAM blocks below 1 MiB, the rest of RAM, and the BIOS ROM below 4 GiB.
        assert (0, 0xC0000) in spans(snap) and (0xFFFC0000, 0x40000) in spans(snap)
        assert snap.memory_map.total_size == 64 * MiB + 0x40000
        # The reset vector (F000:FFF0) holds SeaBIOS's far jump.
        assert snap.read(0xFFFF0, 1) == b"\xea"
        for vcpu in range(2):
            r = snap.regs(vcpu)
            assert (r.vcpu, r.rip, r.rflags, r.cr0) == (vcpu, 0xFFF0, 0x2, 0x60000010)
            assert r.extra["cs_selector"] == 0xF000 and r.extra["cs_base"] == 0xFFFF0000
            assert (r.gdtr_limit, r.idtr_limit) == (0xFFFF, 0xFFFF)
            assert r.efer == 0  # not in QEMU's notes
        with pytest.raises(TargetError, match="no vCPU 2"):
            snap.regs(2)
        # Our copy of it reads back the same.
        write_elf(snap, str(tmp_path / "copy.elf"))
        with open_snapshot(str(tmp_path / "copy.elf")) as copy:
            assert spans(copy) == spans(snap)
            assert_same_bytes(snap, copy)
            assert_registers_equal(snap, copy)
    # open_target's file: scheme routes here too.
    with open_target(f"file:{qemu_reset_dump}") as snap:
        assert snap.vcpu_count == 2


def test_real_qemu_prstatus_is_i386_layout_outside_long_mode(qemu_reset_dump: Path) -> None:
    """QEMU writes EM_386 and 144-byte i386 prstatus notes for a vCPU not in long mode."""
    data = qemu_reset_dump.read_bytes()[:PAGE_SIZE]
    fields = EHDR.unpack_from(data)
    e_machine, e_phoff, e_phnum = fields[2], fields[5], fields[10]
    assert (data[4], e_machine) == (2, 3)  # ELF64, yet EM_386
    headers = [PHDR.unpack_from(data, e_phoff + i * PHDR.size) for i in range(e_phnum)]
    note_offset = next(h[2] for h in headers if h[0] == PT_NOTE)
    pos, pids = note_offset, []
    for _ in range(4):
        namesz, descsz, ntype = NOTE_HDR.unpack_from(data, pos)
        desc = data[pos + 12 + ((namesz + 3) & ~3) :][:descsz]
        if data[pos + 12 : pos + 16] == b"CORE":
            assert descsz == 144
            pr = parse_prstatus(desc)
            assert pr.regs["rip"] == 0xFFF0 and pr.regs["cs_selector"] == 0xF000
            pids.append(pr.pid)
        else:
            assert data[pos + 12 : pos + 16] == b"QEMU" and struct.unpack_from("<II", desc) == (1, 440)
        pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    assert pids == [1, 2]


# -- hostile files ---------------------------------------------------------------------


def expect_format_error(path: Path, match: str, format: str = "auto") -> SnapshotFormatError:  # noqa: A002
    with pytest.raises(SnapshotFormatError, match=match) as info:
        open_snapshot(str(path), format=format).close()
    assert str(path) in str(info.value)
    return info.value


@pytest.fixture
def small_elf(tmp_path: Path) -> Path:
    """A valid ELF: PT_NOTE (2 vCPUs) then PT_LOADs at 0, 0x10000 and 4 GiB."""
    with synthetic_backend(tmp_path, [(0, 2 * PAGE_SIZE), (0x10000, PAGE_SIZE), (4 * GiB, PAGE_SIZE)], seed=5,
                           registers=[sample_registers(0), sample_registers(1)]) as b:  # fmt: skip
        write_elf(b, str(tmp_path / "small.elf"))
    return tmp_path / "small.elf"


@pytest.fixture
def small_lime(tmp_path: Path) -> Path:
    with synthetic_backend(tmp_path, [(0, 2 * PAGE_SIZE), (0x10000, 100), (4 * GiB, PAGE_SIZE)], seed=6) as b:
        write_lime(b, str(tmp_path / "small.lime"))
    return tmp_path / "small.lime"


def patch(path: Path, offset: int, fmt: str, *values: int) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    path.write_bytes(data)
    return path


def truncate(path: Path, size: int) -> Path:
    os.truncate(path, size)
    return path


def phdr_at(i: int) -> int:
    return EHDR.size + i * PHDR.size


def elf_with_notes(path: Path, notes: bytes, loads: list[tuple[int, int, int, int]] | None = None) -> Path:
    """An ELF core with the given raw note bytes and PT_LOADs (paddr, offset, filesz, memsz)."""
    loads = loads if loads is not None else [(0, 0x1000, PAGE_SIZE, PAGE_SIZE)]
    phnum = 1 + len(loads)
    notes_at = EHDR.size + phnum * PHDR.size
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    head = EHDR.pack(ident, 4, 62, 1, 0, EHDR.size, 0, 0, 64, PHDR.size, phnum, 0, 0, 0)
    table = PHDR.pack(PT_NOTE, 0, notes_at, 0, 0, len(notes), len(notes), 0)
    table += b"".join(PHDR.pack(PT_LOAD, 0, off, pa, pa, fs, ms, 0) for pa, off, fs, ms in loads)
    body = head + table + notes
    size = max([len(body)] + [off + fs for _pa, off, fs, _ms in loads])
    path.write_bytes(body + bytes(size - len(body)))
    return path


def note(name: bytes, ntype: int, desc: bytes, namesz: int | None = None, descsz: int | None = None) -> bytes:
    name += b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return NOTE_HDR.pack(namesz if namesz is not None else len(name),
                         descsz if descsz is not None else len(desc), ntype) + pad(name) + pad(desc)  # fmt: skip


def qemu_state(version: int = 1, size: int = 440, length: int = 440) -> bytes:
    return struct.pack("<II", version, size) + bytes(length - 8)


def test_empty_and_random_files(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    expect_format_error(tmp_path / "empty", "empty file")
    expect_format_error(tmp_path / "empty", "empty file", format="raw")
    make_raw_file(tmp_path / "odd", 5000, seed=1)
    expect_format_error(tmp_path / "odd", "not ELF, not LiME, and not a page-multiple raw image")
    make_raw_file(tmp_path / "paged", 2 * PAGE_SIZE, seed=1)
    with open_snapshot(str(tmp_path / "paged")) as snap:  # indistinguishable from a raw image
        assert isinstance(snap, RawSnapshot) and spans(snap) == [(0, 2 * PAGE_SIZE)]
    expect_format_error(tmp_path / "paged", "not an ELF file", format="elf")
    expect_format_error(tmp_path / "paged", "LiME range 0: bad magic", format="lime")
    with open_snapshot(str(tmp_path / "odd"), format="raw") as snap:  # forcing raw accepts any size
        assert spans(snap) == [(0, 5000)]


def test_unopenable_targets(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="cannot open"):
        open_snapshot(str(tmp_path / "missing"))
    with pytest.raises(TargetError, match="not a regular file"):
        open_snapshot(str(tmp_path))
    make_raw_file(tmp_path / "x", PAGE_SIZE)
    with pytest.raises(TargetError, match="unknown snapshot format"):
        open_snapshot(str(tmp_path / "x"), format="vmdk")


def test_elf_header_problems(small_elf: Path) -> None:
    good = small_elf.read_bytes()
    expect_format_error(truncate(small_elf, 40), r"ELF header is truncated: the file has 40 bytes")
    cases = [
        (4, "<B", 1, "ELF class 1 is not ELF64"),
        (5, "<B", 2, "not little-endian"),
        (16, "<H", 2, "ELF type 2 is not a core file"),
        (18, "<H", 40, "ELF machine 40 is not x86"),
        (54, "<H", 32, "program header entry size 32"),
        (56, "<H", 0, "no program headers"),
    ]
    for offset, fmt, value, match in cases:
        small_elf.write_bytes(good)
        expect_format_error(patch(small_elf, offset, fmt, value), match)


def test_truncated_program_headers(small_elf: Path) -> None:
    err = expect_format_error(truncate(small_elf, phdr_at(2) + 10), r"program header table \(4 entries\) is truncated")
    assert f"({phdr_at(4) - phdr_at(2) - 10} bytes missing)" in str(err)


def test_absurd_phnum(small_elf: Path) -> None:
    good = small_elf.read_bytes()
    expect_format_error(patch(small_elf, 56, "<H", 60000), r"program header table \(60000 entries\) is truncated")
    # PN_XNUM: the real count comes from section header 0, which claims a million.
    small_elf.write_bytes(good + SHDR.pack(0, 0, 0, 0, 0, 0, 0, 1_000_000, 0, 0))
    patch(small_elf, 40, "<Q", len(good))  # e_shoff
    patch(small_elf, 58, "<H", SHDR.size)  # e_shentsize
    expect_format_error(patch(small_elf, 56, "<H", 0xFFFF), "1000000 program headers; refusing more than 65536")
    patch(small_elf, 40, "<Q", 0)
    expect_format_error(small_elf, "PN_XNUM but there is no valid section header 0")


def test_pt_load_beyond_eof_names_segment_and_missing_bytes(small_elf: Path) -> None:
    size = small_elf.stat().st_size
    err = expect_format_error(truncate(small_elf, size - 100), r"PT_LOAD #3 \(GPA 0x100000000\+0x1000\) is truncated")
    assert "(100 bytes missing)" in str(err)


def test_overlapping_pt_loads(small_elf: Path) -> None:
    patch(small_elf, phdr_at(2) + 24, "<Q", 0x1000)  # PT_LOAD #2's p_paddr inside PT_LOAD #1
    expect_format_error(small_elf, r"overlaps.*paging=true")


def test_absurd_addresses_and_sizes(small_elf: Path) -> None:
    good = small_elf.read_bytes()
    expect_format_error(patch(small_elf, phdr_at(3) + 24, "<Q", 1 << 60), "beyond the 52-bit physical address space")
    small_elf.write_bytes(good)
    expect_format_error(patch(small_elf, phdr_at(3) + 40, "<Q", 1), "p_filesz 0x1000 exceeds p_memsz 0x1")
    small_elf.write_bytes(good)
    expect_format_error(patch(small_elf, phdr_at(3) + 8, "<Q", 1 << 62), "PT_LOAD #3 .* is truncated")


def test_zero_filled_tail_is_a_hole(tmp_path: Path) -> None:
    path = elf_with_notes(tmp_path / "t.elf", b"", [(0, 0x1000, PAGE_SIZE, 4 * PAGE_SIZE)])
    with open_snapshot(str(path)) as snap:
        assert spans(snap) == [(0, PAGE_SIZE)]
        with pytest.raises(MemoryAccessError):
            snap.read(PAGE_SIZE, 1)


def test_garbage_notes(tmp_path: Path) -> None:
    p = tmp_path / "n.elf"
    cases = [
        (note(b"CORE", 1, bytes(100)), "NT_PRSTATUS holds 100 bytes; expected 336"),
        (note(b"CORE", 1, bytes(336), namesz=0xFFFFFFFF), "declares a 4294967295-byte name"),
        (note(b"CORE", 1, bytes(336), descsz=0xFFFFFFF0), "runs .* bytes past the end of PT_NOTE #0"),
        (note(b"QEMU", 0, qemu_state(size=1000)), "declares size 1000 but holds only 440"),
        (note(b"QEMU", 0, qemu_state(size=100)), "declares size 100, below the 432 bytes"),
        (note(b"QEMU", 0, qemu_state(version=7)), "version 7 is not supported"),
        (note(b"QEMU", 0, b"\x01"), "too few for its header"),
        (note(b"CORE", 1, bytes(336)) * 2 + note(b"QEMU", 0, qemu_state()), "2 NT_PRSTATUS notes but 1 QEMU"),
        (note(b"QEMU", 0, qemu_state()) + b"\x01\x02\x03", "3 stray bytes where a 12-byte note header"),
        (note(b"SVA", 1, bytes(15)), "SVA EFER note holds 15 bytes"),
        (note(b"QEMU", 0, qemu_state()) + note(b"SVA", 1, struct.pack("<IIQ", 1, 5, 0)), "EFER note for vCPU 5"),
    ]
    for notes, match in cases:
        expect_format_error(elf_with_notes(p, notes), match)
    two_then_bad = note(b"QEMU", 0, qemu_state()) * 2 + note(b"X", 0, b"", namesz=999)
    err = expect_format_error(elf_with_notes(p, two_then_bad), "declares a 999-byte name")
    assert err.offset == EHDR.size + 2 * PHDR.size + 2 * (12 + 8 + 440)  # the third note's header
    # Unknown notes and zero padding are skipped; a QEMU note without kernel_gs_base is fine.
    ok = note(b"LINUX", 0x202, bytes(512)) + note(b"QEMU", 0, qemu_state(size=432, length=432)) + bytes(8)
    with open_snapshot(str(elf_with_notes(p, ok))) as snap:
        assert snap.vcpu_count == 1 and "kernel_gs_base" not in snap.regs(0).extra


def test_huge_note_segment_is_refused(tmp_path: Path) -> None:
    p = elf_with_notes(tmp_path / "h.elf", b"")
    patch(p, phdr_at(0) + 32, "<QQ", 1 << 40, 1 << 40)  # PT_NOTE p_filesz/p_memsz
    expect_format_error(p, "PT_NOTE segments total more than")


def test_lime_problems(small_lime: Path) -> None:
    good = small_lime.read_bytes()
    second = LIME_HEADER.size + 2 * PAGE_SIZE
    cases: list[tuple[Callable[[], Path], str]] = [
        (lambda: patch(small_lime, 4, "<I", 2), "LiME range 0: unsupported version 2"),
        (lambda: patch(small_lime, second, "<I", 0x12345678), "LiME range 1: bad magic 0x12345678"),
        (lambda: patch(small_lime, second + 8, "<QQ", 0x20000, 0x1FFFF), "end 0x1ffff is below start 0x20000"),
        (lambda: patch(small_lime, second + 8, "<QQ", 0x1000, 0x1063), r"range\[1\].*overlaps"),
        (lambda: patch(small_lime, second + 8, "<QQ", 1 << 62, (1 << 62) + 99), "52-bit"),
        (lambda: truncate(small_lime, second + LIME_HEADER.size + 50),
         r"LiME range 1 \(GPA 0x10000-0x10063\) is truncated.*\(50 bytes missing\)"),
        (lambda: truncate(small_lime, second + 10), "10 trailing bytes after range 0"),
    ]  # fmt: skip
    for make, match in cases:
        small_lime.write_bytes(good)
        expect_format_error(make(), match)
    small_lime.write_bytes(good)
    with open_snapshot(str(small_lime)) as snap:
        assert spans(snap) == [(0, 2 * PAGE_SIZE), (0x10000, 100), (4 * GiB, PAGE_SIZE)]


def test_lime_range_count_is_bounded(tmp_path: Path) -> None:
    p = tmp_path / "many.lime"
    one = lambda i: LIME_HEADER.pack(LIME_MAGIC, 1, i * 2, i * 2) + b"x"  # noqa: E731
    p.write_bytes(b"".join(one(i) for i in range(65537)))
    expect_format_error(p, "more than 65536 LiME ranges")


# -- mutation fuzz ---------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes, hot: list[range]) -> bytes:
    """Flip a few bytes (mostly in the `hot` ranges, where the headers are), truncate, or both."""
    out = bytearray(data)
    action = rng.random()
    if action < 0.75:
        for _ in range(rng.randint(1, 8)):
            i = rng.choice(rng.choice(hot)) if rng.random() < 0.9 else rng.randrange(len(out))
            out[i] = rng.randrange(256) if rng.random() < 0.5 else out[i] ^ (1 << rng.randrange(8))
    if action > 0.6:
        del out[rng.randrange(len(out)) :]
    return bytes(out)


def exercise(path: Path) -> None:
    """Open the file and touch everything a caller would; only SvaError may escape."""
    for fmt in ("auto", "elf", "lime", "raw"):
        try:
            snap = open_snapshot(str(path), format=fmt)
        except SvaError:
            continue
        with snap:
            for r in list(snap.memory_map)[:16]:
                snap.read(r.gpa, min(r.size, 1 << 16))
                snap.read(r.end - 1, 1)
            for i in range(min(snap.vcpu_count, 16)):
                snap.regs(i).to_json()


@pytest.mark.parametrize("kind", ["elf", "lime"])
def test_mutation_fuzz(kind: str, small_elf: Path, small_lime: Path, tmp_path: Path) -> None:
    source = small_elf if kind == "elf" else small_lime
    data = source.read_bytes()
    if kind == "elf":  # the ELF header, program headers and notes all sit in the first page
        hot = [range(0, 2048)]
    else:  # each LiME header sits just before its range's data
        with open_snapshot(str(source)) as snap:
            hot = [range(r.offset - LIME_HEADER.size, r.offset) for r in snap.memory_map]
    rng = random.Random(0x5EED)
    target = tmp_path / f"fuzz.{kind}"
    started = time.monotonic()
    for i in range(400):
        target.write_bytes(mutate(rng, data, hot))
        t0 = time.monotonic()
        try:
            exercise(target)
        except SvaError:
            pass
        except Exception as e:  # pragma: no cover - the failure report
            raise AssertionError(f"iteration {i}: {type(e).__name__}: {e}") from e
        assert time.monotonic() - t0 < 2.0, f"iteration {i} took too long"
    assert time.monotonic() - started < 60


def test_mapped_backend_over_one_file_with_regions_at_0_and_4g(tmp_path: Path) -> None:
    """The brief's multi-region source, built by hand rather than with synthetic_backend."""
    make_raw_file(tmp_path / "backing", 3 * PAGE_SIZE, seed=9)
    regions = [MemoryRegion(0, 2 * PAGE_SIZE, 0), MemoryRegion(4 * GiB, PAGE_SIZE, 2 * PAGE_SIZE, "high")]
    with SnapshotBackend("t", str(tmp_path / "backing"), MemoryMap(regions)) as src:
        for writer, name in ((write_elf, "a.elf"), (write_lime, "a.lime")):
            writer(src, str(tmp_path / name))
            with open_snapshot(str(tmp_path / name)) as snap:
                assert spans(snap) == [(0, 2 * PAGE_SIZE), (4 * GiB, PAGE_SIZE)]
                assert snap.read(4 * GiB, PAGE_SIZE) == (tmp_path / "backing").read_bytes()[2 * PAGE_SIZE :]


def test_more_than_65534_program_headers_use_pn_xnum(tmp_path: Path) -> None:
    """65535 PT_LOADs + a PT_NOTE overflow e_phnum: the count moves to section header 0."""
    regions = [(i * 2, 1) for i in range(65535)]
    with synthetic_backend(tmp_path, regions, registers=[sample_registers(0)]) as src:
        write_elf(src, str(tmp_path / "x.elf"))
        assert struct.unpack_from("<H", (tmp_path / "x.elf").read_bytes()[:64], 56)[0] == 0xFFFF
        with open_snapshot(str(tmp_path / "x.elf")) as snap:
            assert len(snap.memory_map) == 65535 and snap.vcpu_count == 1
            for gpa in (0, 2 * 40000, 2 * 65534):
                assert snap.read(gpa, 1) == src.read(gpa, 1)
