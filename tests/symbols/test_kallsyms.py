"""kallsyms recovery against a real Debian cloud kernel: from the image, from the RAM of
that kernel booted under QEMU, and from hostile copies of its table.

Other table layouts (names-first as in Linux >= 6.4, absolute addresses, text symbols
only) are built from the real kernel's own compressed names and token table, re-laid
the way scripts/kallsyms.c would lay them out.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sva.errors import SymbolsError
from sva.symbols.kallsyms import (
    Kallsyms,
    Layout,
    TableOrder,
    kallsyms_from_image,
    kallsyms_from_memory,
)
from sva.symbols.kimage import KernelImage
from sva.vmi.base import MappedBackend, MemoryMap, MemoryRegion

GUEST_RAM = 256 << 20
LINK_TEXT_BASE = 0xFFFFFFFF81000000  # x86-64 __START_KERNEL_map + CONFIG_PHYSICAL_START


# -- fixtures: the kernel (debian_vmlinuz/debian_kernel come from conftest.py) ------------


@dataclass(frozen=True)
class Kernel:
    vmlinuz: Path
    vmlinux: bytes


@pytest.fixture(scope="session")
def kernel(debian_vmlinuz: Path, debian_kernel: KernelImage) -> Kernel:
    return Kernel(vmlinuz=debian_vmlinuz, vmlinux=debian_kernel.vmlinux)


@pytest.fixture(scope="session")
def image_syms(kernel: Kernel) -> Kallsyms:
    return kallsyms_from_image(kernel.vmlinux, str(kernel.vmlinuz))


# -- from the image --------------------------------------------------------------------------


def test_image_table_is_found_quickly(kernel: Kernel) -> None:
    t0 = time.perf_counter()
    ks = kallsyms_from_image(kernel.vmlinux, "vmlinux")
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"image decode took {elapsed:.2f}s"
    assert ks.source == "vmlinux"
    assert 30_000 < ks.num_syms < 1_000_000


def test_image_layout_is_debian_61(image_syms: Kallsyms) -> None:
    ks = image_syms
    assert ks.layout == Layout.BASE_RELATIVE and ks.layout == "base-relative"
    assert ks.order is TableOrder.ADDRESSES_FIRST
    assert ks.absolute_percpu
    assert ks.has_data_symbols
    assert ks.relative_base == LINK_TEXT_BASE == ks.text_base
    assert ks.kaslr_slide is None  # link-time addresses: no run-time slide known
    loc = ks.location
    # offsets | relative_base | num_syms | names | markers | seqs | token_table | token_index
    assert loc.offsets == ks.offset < loc.relative_base < loc.num_syms < loc.names < loc.markers
    assert loc.relative_base + 8 == loc.num_syms and loc.num_syms + 8 == loc.names
    if ks.has_seqs_of_names:  # Debian 6.1 carries the 6.2 seqs_of_names backport
        assert loc.markers < loc.seqs_of_names < loc.token_table
    assert loc.token_table < loc.token_index


def test_image_well_known_symbols(image_syms: Kallsyms) -> None:
    ks = image_syms

    def typ(name: str) -> str:
        sym = ks.lookup(name)
        assert sym is not None, name
        return sym.type

    assert typ("init_task") in "Dd"
    assert typ("sys_call_table") in "RrDd"
    assert typ("linux_banner") in "RrDd"
    assert typ("start_kernel") == "T"
    assert typ("_text") == "T" and typ("_stext") in "Tt"
    text, etext = ks.address("_text"), ks.address("_etext")
    assert text <= ks.address("_stext") < etext
    assert text <= ks.address("do_syscall_64") < etext
    # start_kernel is __init: it lives in .init.text, after _etext.
    assert ks.address("_sinittext") <= ks.address("start_kernel") < ks.address("_einittext")
    for name in ("init_task", "sys_call_table", "linux_banner", "start_kernel"):
        assert ks.address(name) >= 0xFFFFFFFF80000000
        assert not ks.lookup(name).absolute  # type: ignore[union-attr]
    assert ks.lookup("no_such_symbol_anywhere") is None
    with pytest.raises(SymbolsError, match="no_such_symbol"):
        ks.address("no_such_symbol_anywhere")


def test_image_percpu_symbols_are_small_absolute_values(image_syms: Kallsyms) -> None:
    percpu = [image_syms.lookup(n) for n in ("current_task", "cpu_number", "__per_cpu_start")]
    for sym in percpu:
        assert sym is not None and sym.absolute
        assert 0 <= sym.address < 0x100000
    assert image_syms.address("__per_cpu_start") == 0


def test_image_symbols_by_address(image_syms: Kallsyms) -> None:
    ks = image_syms
    addrs = [s.address for s in ks.by_address]
    assert addrs == sorted(addrs)
    assert [s.address for s in ks.symbols] == addrs  # the kernel stores them sorted
    start = ks.address("start_kernel")
    assert ks.symbol_at(start).name == "start_kernel"  # type: ignore[union-attr]
    assert ks.symbol_at(start + 1).name == "start_kernel"  # type: ignore[union-attr]
    assert ks.symbol_at(-1) is None
    assert len(ks.lookup_all("_text")) == 1


def test_compressed_bzimage_is_not_searched_blindly(kernel: Kernel) -> None:
    with pytest.raises(SymbolsError, match="bz"):
        kallsyms_from_image(kernel.vmlinuz.read_bytes(), "bzImage")


# -- from guest RAM ----------------------------------------------------------------------


@dataclass(frozen=True)
class BootedRam:
    path: Path
    slide: int | None  # from the kernel's own "Kernel Offset:" panic line


@pytest.fixture(scope="module")
def booted_ram(kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootedRam]:
    """Boot the kernel without a root fs until it panics (panic=0: it then stays put)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    tmp = tmp_path_factory.mktemp("kallsyms-boot")
    ram, console = tmp / "ram", tmp / "console.log"
    args = [
        "qemu-system-x86_64", "-machine", "q35,accel=tcg,memory-backend=ram0", "-m", "256M",
        "-object", f"memory-backend-file,id=ram0,size=256M,mem-path={ram},share=on",
        "-kernel", str(kernel.vmlinuz), "-append", "console=ttyS0 panic=0",
        "-display", "none", "-nodefaults", "-serial", f"file:{console}", "-no-reboot",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 150
        log = ""
        while "end Kernel panic" not in log:
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                pytest.fail(f"kernel did not reach its root-fs panic: {err}\n{log[-2000:]}")
            time.sleep(0.2)
            log = console.read_text(errors="replace") if console.exists() else ""
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # share=on: the RAM file keeps the contents
            proc.wait(timeout=20)
    m = re.search(r"Kernel Offset: (0x[0-9a-f]+|disabled)", log)
    slide = None if m is None else (0 if m.group(1) == "disabled" else int(m.group(1), 16))
    yield BootedRam(path=ram, slide=slide)


def _raw_backend(path: Path) -> MappedBackend:
    size = path.stat().st_size
    return MappedBackend(f"raw:{path}", str(path), MemoryMap([MemoryRegion(gpa=0, size=size, offset=0)]))


def test_memory_matches_image_plus_kaslr_slide(booted_ram: BootedRam, image_syms: Kallsyms) -> None:
    with _raw_backend(booted_ram.path) as backend:
        t0 = time.perf_counter()
        ks = kallsyms_from_memory(backend, "guest", hint_text_base=image_syms.text_base)
        elapsed = time.perf_counter() - t0
    assert elapsed < 5, f"256 MiB scan took {elapsed:.2f}s"
    assert ks.num_syms == image_syms.num_syms
    assert [s.name for s in ks.symbols] == [s.name for s in image_syms.symbols]
    assert [s.type for s in ks.symbols] == [s.type for s in image_syms.symbols]
    slide = ks.kaslr_slide
    assert slide is not None and slide % 0x200000 == 0 and slide >= 0
    assert ks.relative_base == image_syms.relative_base + slide  # type: ignore[operator]
    if booted_ram.slide is not None:
        assert slide == booted_ram.slide  # what the kernel itself printed when it panicked
    for mem, img in zip(ks.symbols, image_syms.symbols):
        assert mem.absolute == img.absolute
        assert mem.address == (img.address if img.absolute else img.address + slide), mem.name
    assert ks.address("current_task") == image_syms.address("current_task")
    assert ks.location.start < GUEST_RAM and ks.has_seqs_of_names


def test_memory_without_hint_has_no_slide(booted_ram: BootedRam) -> None:
    with _raw_backend(booted_ram.path) as backend:
        ks = kallsyms_from_memory(backend, "guest")
    assert ks.kaslr_slide is None
    assert ks.text_base is not None and ks.text_base % 0x200000 == 0


def test_zeroed_memory_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "zero"
    with open(path, "wb") as f:
        f.truncate(GUEST_RAM)
    with _raw_backend(path) as backend:
        t0 = time.perf_counter()
        with pytest.raises(SymbolsError, match="zero-guest.*no kallsyms"):
            kallsyms_from_memory(backend, "zero-guest")
        assert time.perf_counter() - t0 < 5


def test_random_memory_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "random"
    path.write_bytes(random.Random(7).randbytes(32 << 20))
    with _raw_backend(path) as backend:
        t0 = time.perf_counter()
        with pytest.raises(SymbolsError, match="no kallsyms"):
            kallsyms_from_memory(backend, "random-guest")
        assert time.perf_counter() - t0 < 5


# -- re-laid and hostile tables -------------------------------------------------------------


@dataclass(frozen=True)
class RawTable:
    """The real kernel's table pieces, undecoded, for re-laying out."""

    entries: list[bytes]  # one compressed name per symbol, length header included
    token_table: bytes
    token_index: bytes
    symbols: Kallsyms


@pytest.fixture(scope="session")
def raw_table(kernel: Kernel, image_syms: Kallsyms) -> RawTable:
    data, loc = kernel.vmlinux, image_syms.location
    entries, p = [], loc.names
    for _ in range(image_syms.num_syms):
        ln, hdr = data[p], 1
        if ln & 0x80:
            ln, hdr = (ln & 0x7F) | (data[p + 1] << 7), 2
        entries.append(data[p : p + hdr + ln])
        p += hdr + ln
    return RawTable(
        entries=entries,
        token_table=data[loc.token_table : loc.token_index].rstrip(b"\0") + b"\0",
        token_index=data[loc.token_index : loc.token_index + 512],
        symbols=image_syms,
    )


def _pad8(out: bytearray) -> int:
    out += bytes(-len(out) % 8)
    return len(out)


def lay_out(
    raw: RawTable, indices: list[int], *, order: TableOrder, layout: Layout, seqs: bool,
    marker_size: int = 4,
) -> tuple[bytes, dict[str, int]]:
    """Lay out the chosen symbols as scripts/kallsyms.c does (every array 8-aligned)."""
    syms = [raw.symbols.symbols[i] for i in indices]
    entries = [raw.entries[i] for i in indices]
    base = raw.symbols.relative_base
    assert base is not None
    out, at = bytearray(), {}

    def addresses() -> None:
        at["offsets"] = _pad8(out)
        if layout is Layout.BASE_RELATIVE:
            for s in syms:  # ABSOLUTE_PERCPU: >= 0 absolute, < 0 relative
                out.extend(struct.pack("<i", s.address if s.absolute else base - 1 - s.address))
            at["relative_base"] = _pad8(out)
            out.extend(struct.pack("<Q", base))
        else:
            for s in syms:
                out.extend(struct.pack("<Q", s.address))

    def names() -> None:
        at["num_syms"] = _pad8(out)
        out.extend(struct.pack("<I", len(syms)))
        at["names"] = _pad8(out)
        markers = []
        for i, e in enumerate(entries):
            if i % 256 == 0:
                markers.append(len(out) - at["names"])
            out.extend(e)
        at["markers"] = _pad8(out)
        for m in markers:
            out.extend(m.to_bytes(marker_size, "little"))

    def seqs_of_names() -> None:
        if seqs:
            at["seqs"] = _pad8(out)
            for i in sorted(range(len(syms)), key=lambda i: syms[i].name):
                out.extend(i.to_bytes(3, "big"))

    def tokens() -> None:
        at["token_table"] = _pad8(out)
        out.extend(raw.token_table)
        at["token_index"] = _pad8(out)
        out.extend(raw.token_index)

    if order is TableOrder.ADDRESSES_FIRST:
        addresses(), names(), seqs_of_names(), tokens()
    else:
        names(), tokens(), addresses(), seqs_of_names()
    _pad8(out)
    return bytes(out), at


FILLER = random.Random(3).randbytes(8192)  # 8-aligned, so table alignment is kept


def embed(table: bytes) -> bytes:
    return FILLER + table + FILLER


def _check_same(raw: RawTable, indices: list[int], ks: Kallsyms) -> None:
    want = [raw.symbols.symbols[i] for i in indices]
    assert [(s.name, s.type, s.address, s.absolute) for s in ks.symbols] == [
        (s.name, s.type, s.address, s.absolute) for s in want
    ]


@pytest.mark.parametrize(
    ("order", "layout", "seqs", "marker_size"),
    [
        (TableOrder.ADDRESSES_FIRST, Layout.BASE_RELATIVE, True, 4),  # Debian 6.1
        (TableOrder.ADDRESSES_FIRST, Layout.BASE_RELATIVE, False, 4),  # mainline <= 6.1
        (TableOrder.ADDRESSES_FIRST, Layout.ABSOLUTE, False, 4),  # KALLSYMS_BASE_RELATIVE=n
        (TableOrder.ADDRESSES_FIRST, Layout.BASE_RELATIVE, False, 8),  # older: long markers
        (TableOrder.NAMES_FIRST, Layout.BASE_RELATIVE, True, 4),  # Linux >= 6.4
        (TableOrder.NAMES_FIRST, Layout.ABSOLUTE, True, 4),
    ],
)
def test_relaid_layouts_decode(
    raw_table: RawTable, order: TableOrder, layout: Layout, seqs: bool, marker_size: int
) -> None:
    indices = list(range(raw_table.symbols.num_syms))
    table, at = lay_out(
        raw_table, indices, order=order, layout=layout, seqs=seqs, marker_size=marker_size
    )
    ks = kallsyms_from_image(embed(table), "relaid")
    assert (ks.order, ks.layout, ks.has_seqs_of_names) == (order, layout, seqs)
    assert ks.location.names == len(FILLER) + at["names"]
    assert ks.location.token_table == len(FILLER) + at["token_table"]
    _check_same(raw_table, indices, ks)


def test_text_only_kernel_without_kallsyms_all(raw_table: RawTable) -> None:
    indices = [i for i, s in enumerate(raw_table.symbols.symbols) if s.type in "Tt"]
    table, _ = lay_out(
        raw_table, indices, order=TableOrder.ADDRESSES_FIRST, layout=Layout.BASE_RELATIVE, seqs=True
    )
    ks = kallsyms_from_image(embed(table), "text-only")
    _check_same(raw_table, indices, ks)
    assert not ks.has_data_symbols
    assert ks.address("start_kernel") == raw_table.symbols.address("start_kernel")
    with pytest.raises(SymbolsError, match="KALLSYMS_ALL"):
        ks.address("init_task")


@pytest.fixture(scope="session")
def debian_copy(raw_table: RawTable) -> tuple[bytes, dict[str, int]]:
    indices = list(range(raw_table.symbols.num_syms))
    return lay_out(
        raw_table, indices, order=TableOrder.ADDRESSES_FIRST, layout=Layout.BASE_RELATIVE, seqs=True
    )


def _poke(table: bytes, pos: int, data: bytes) -> bytes:
    return table[:pos] + data + table[pos + len(data) :]


def _corruptions(table: bytes, at: dict[str, int]) -> dict[str, bytes]:
    n = int.from_bytes(table[at["num_syms"] : at["num_syms"] + 4], "little")
    first_marker = at["markers"] + 4
    entry_256 = at["names"] + int.from_bytes(table[first_marker : first_marker + 4], "little")
    return {
        "num_syms+1": _poke(table, at["num_syms"], struct.pack("<I", n + 1)),
        "num_syms-1": _poke(table, at["num_syms"], struct.pack("<I", n - 1)),
        "num_syms huge": _poke(table, at["num_syms"], struct.pack("<I", 0xFFFFFF)),
        "token index outside": _poke(table, at["token_index"] + 2 * 100, b"\xff\xff"),
        "token index off by one": _poke(
            table, at["token_index"] + 2 * 200,
            struct.pack("<H", int.from_bytes(table[at["token_index"] + 400 : at["token_index"] + 402], "little") + 1),
        ),
        "marker broken": _poke(
            table, first_marker,
            struct.pack("<I", int.from_bytes(table[first_marker : first_marker + 4], "little") + 1),
        ),
        "name length broken": _poke(table, entry_256, bytes([table[entry_256] + 1])),
        "names truncated": table[: at["names"] + 1000] + table[at["markers"] :],
        "seqs duplicated": _poke(table, at["seqs"], table[at["seqs"] + 3 : at["seqs"] + 6]),
        "relative_base not a kernel address": _poke(table, at["relative_base"], struct.pack("<Q", 0x1000)),
        "offsets unsorted": _poke(table, at["offsets"] + 4 * 50000, struct.pack("<i", -5)),
        "token table truncated": table[: at["token_index"] - 3],
    }


@pytest.mark.parametrize(
    "case",
    ["num_syms+1", "num_syms-1", "num_syms huge", "token index outside", "token index off by one",
     "marker broken", "name length broken", "names truncated", "seqs duplicated",
     "relative_base not a kernel address", "offsets unsorted", "token table truncated"],
)
def test_corrupt_table_is_rejected(debian_copy: tuple[bytes, dict[str, int]], case: str) -> None:
    table, at = debian_copy
    bad = _corruptions(table, at)[case]
    t0 = time.perf_counter()
    with pytest.raises(SymbolsError) as err:
        kallsyms_from_image(embed(bad), "hostile")
    assert time.perf_counter() - t0 < 10
    assert str(err.value).startswith("hostile")


def test_search_continues_past_a_rejected_copy(debian_copy: tuple[bytes, dict[str, int]]) -> None:
    table, at = debian_copy
    bad = _corruptions(table, at)["marker broken"]
    ks = kallsyms_from_image(FILLER + bad + table + FILLER, "two copies")
    assert ks.location.names == len(FILLER) + len(bad) + at["names"]


@pytest.fixture(scope="session")
def small_table(raw_table: RawTable) -> tuple[bytes, dict[str, int], list[int]]:
    # Every 40th symbol, plus the first (per-CPU) ones: ~2k symbols decode in milliseconds.
    indices = sorted(set(range(0, raw_table.symbols.num_syms, 40)) | set(range(64)))
    table, at = lay_out(
        raw_table, indices, order=TableOrder.ADDRESSES_FIRST, layout=Layout.BASE_RELATIVE, seqs=True
    )
    return embed(table), {k: v + len(FILLER) for k, v in at.items()}, indices


def test_small_table_decodes(raw_table: RawTable, small_table: tuple[bytes, dict[str, int], list[int]]) -> None:
    data, _, indices = small_table
    _check_same(raw_table, indices, kallsyms_from_image(data, "small"))


@settings(
    max_examples=300, deadline=3000, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.data())
def test_fuzzed_table_only_raises_symbols_error(
    small_table: tuple[bytes, dict[str, int], list[int]], data: st.DataObject
) -> None:
    blob, at, _ = small_table
    buf = bytearray(blob)
    hot = [at[k] for k in ("offsets", "relative_base", "num_syms", "names", "markers", "seqs",
                           "token_table", "token_index")]
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        if data.draw(st.booleans(), label="near a header"):
            pos = data.draw(st.sampled_from(hot)) + data.draw(st.integers(-8, 24))
        else:
            pos = data.draw(st.integers(0, len(buf) - 1))
        pos = min(max(pos, 0), len(buf) - 1)
        buf[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([len(buf), len(buf) - 600, at["markers"], at["names"] + 77]))
    try:
        ks = kallsyms_from_image(bytes(buf[:cut]), "fuzz")
    except SymbolsError as e:
        assert str(e).startswith("fuzz")
        return
    assert ks.num_syms >= 256
    addrs = [s.address for s in ks.symbols]
    assert addrs == sorted(addrs)
