"""Kernel images: Debian's real cloud bzImage, small bzImages in every compression built
here, and truncated, corrupt or foreign images (which must give SymbolsError)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from sva.errors import SymbolsError
from sva.symbols import kimage
from sva.symbols.btf import BtfKind, parse_btf
from sva.symbols.kimage import Compression, KernelImage, load_kernel_image, unpack_kernel_image

from .conftest import lz4_legacy, make_bzimage, make_elf, sample_builder, size_trailer

BANNER = b"Linux version 6.1.0-99-test (builder@example) (gcc 12) #1 SMP\n"


# --- the real kernel -------------------------------------------------------------------


def _configured_compression(vmlinuz: Path) -> Compression | None:
    """What the kernel's own config (shipped beside it by Debian) says it was packed with."""
    config = vmlinuz.with_name(vmlinuz.name.replace("vmlinuz-", "config-"))
    if not config.exists():
        return None
    match = re.search(r"^CONFIG_KERNEL_(\w+)=y$", config.read_text(), re.MULTILINE)
    names = {"GZIP": "gzip", "XZ": "xz", "LZMA": "lzma", "BZIP2": "bzip2", "ZSTD": "zstd",
             "LZ4": "lz4", "UNCOMPRESSED": "none"}  # fmt: skip
    return Compression(names[match.group(1)]) if match and match.group(1) in names else None


def test_debian_kernel_unpacks(debian_vmlinuz: Path, debian_kernel: KernelImage) -> None:
    image = debian_kernel
    expected = _configured_compression(debian_vmlinuz)
    # Debian bookworm's cloud kernels: CONFIG_KERNEL_LZ4, i.e. LZ4 legacy frames.
    assert image.compression is (expected or Compression.LZ4)
    assert image.vmlinux[:4] == b"\x7fELF" and len(image.vmlinux) > 20 << 20
    assert image.path == str(debian_vmlinuz)

    btf_section = image.section(".BTF")
    assert btf_section is not None and btf_section.size > 1 << 20
    assert image.btf is not None and len(image.btf) == btf_section.size
    assert bytes(image.section_data(".BTF")) == image.btf  # type: ignore[arg-type]
    assert image.btf[:2] == b"\x9f\xeb"
    assert image.section("no_such_section") is None and image.section_data("nope") is None
    assert image.section(".bss") is not None and image.section_data(".bss") == b""

    release = debian_vmlinuz.name.removeprefix("vmlinuz-")
    assert image.banner is not None
    assert image.banner.startswith(f"Linux version {release} ")
    assert "\n" not in image.banner

    # Debian strips vmlinux before packing it: no symbol table.
    assert image.section(".symtab") is None and dict(image.symbols) == {}
    assert len(repr(image)) < 2000  # the 50 MiB of vmlinux stay out of reprs


def test_debian_kernel_btf_parses(debian_btf) -> None:  # type: ignore[no-untyped-def]
    assert debian_btf.btf.find("task_struct", BtfKind.STRUCT) is not None


@pytest.fixture(scope="module")
def debian_bytes(debian_vmlinuz: Path) -> bytes:
    return debian_vmlinuz.read_bytes()


def _payload_span(image: bytes) -> tuple[int, int]:
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    return (setup_sects + 1) * 512 + offset, length


def test_debian_truncated(debian_bytes: bytes) -> None:
    start, length = _payload_span(debian_bytes)
    for cut in (0, 100, 0x1F0, 0x250, start, start + length // 2, start + length - 1):
        with pytest.raises(SymbolsError, match="short|outside|truncated|not a bzImage"):
            unpack_kernel_image(debian_bytes[:cut], "cut")


def test_debian_corrupt_lz4_blocks(debian_bytes: bytes) -> None:
    start, length = _payload_span(debian_bytes)
    assert debian_bytes[start : start + 4] == b"\x02\x21\x4c\x18"
    data = bytearray(debian_bytes)
    data[start + 8 : start + 8 + 64] = bytes(64)  # zero match offsets are invalid in LZ4
    with pytest.raises(SymbolsError, match="corrupt lz4 block") as info:
        unpack_kernel_image(bytes(data), "zeroed")
    assert info.value.offset == start + 4

    data = bytearray(debian_bytes)
    struct.pack_into("<I", data, start + 4, 0x7FFFFFF0)  # first block's size
    with pytest.raises(SymbolsError, match="runs past the payload end"):
        unpack_kernel_image(bytes(data), "block size")


def test_debian_size_trailer_is_checked(debian_bytes: bytes) -> None:
    start, length = _payload_span(debian_bytes)
    data = bytearray(debian_bytes)
    trailer = start + length - 4
    struct.pack_into("<I", data, trailer, struct.unpack_from("<I", data, trailer)[0] + 1)
    with pytest.raises(SymbolsError, match="size trailer"):
        unpack_kernel_image(bytes(data), "trailer")


def test_debian_bad_header_fields(debian_bytes: bytes) -> None:
    for offset, patch, message in [
        (0x202, b"HdrX", "not a bzImage"),
        (0x1FE, b"\0\0", "not a bzImage"),
        (0x206, b"\x06\x02", "predates"),
        (0x248, struct.pack("<I", 0x7FFFFFFF), "outside"),
        (0x24C, struct.pack("<I", 0xFFFFFFFF), "outside"),
        (0x248, struct.pack("<I", 0), "unknown payload compression"),
    ]:
        data = bytearray(debian_bytes)
        data[offset : offset + len(patch)] = patch
        with pytest.raises(SymbolsError, match=message):
            unpack_kernel_image(bytes(data), "patched")


# --- small images in every compression -------------------------------------------------


def small_vmlinux(symbols: bool = False) -> bytes:
    btf = sample_builder()[0].build()
    return make_elf(
        [
            (".text", 1, b"\x90" * 64),
            (".rodata", 1, b"\0Linux version %s\0" + BANNER + b"\0more"),
            (".BTF", 1, btf),
            (".bss", 8, b""),
        ],
        symbols=[("init_task", 0xFFFFFFFF82A0C940), ("linux_banner", 0xFFFFFFFF82000100)]
        if symbols
        else [],
    )


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


COMPRESSORS: dict[Compression, Callable[[bytes], bytes]] = {
    Compression.GZIP: lambda d: gzip.compress(d, mtime=0),
    Compression.XZ: lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    Compression.LZMA: lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    Compression.BZIP2: bz2.compress,
    Compression.ZSTD: _zstd,
    Compression.LZ4: lz4_legacy,
    Compression.NONE: lambda d: d,
}


@pytest.mark.parametrize("compression", list(COMPRESSORS), ids=lambda c: c.value)
def test_every_compression(compression: Compression, tmp_path: Path) -> None:
    vmlinux = small_vmlinux(symbols=True)
    packed = COMPRESSORS[compression](vmlinux)
    payload = packed + (size_trailer(vmlinux) if compression is not Compression.NONE else b"")
    path = tmp_path / "vmlinuz"
    path.write_bytes(make_bzimage(payload))
    image = load_kernel_image(path)
    assert image.compression is compression
    assert image.vmlinux == vmlinux
    assert image.btf == sample_builder()[0].build()
    assert parse_btf(image.btf, "small").find("task_struct") is not None
    assert image.banner == BANNER.decode().rstrip("\n")
    assert dict(image.symbols) == {
        "init_task": 0xFFFFFFFF82A0C940,
        "linux_banner": 0xFFFFFFFF82000100,
    }


def test_payload_without_size_trailer() -> None:
    vmlinux = small_vmlinux()
    for compression in (Compression.GZIP, Compression.LZ4, Compression.XZ):
        image = unpack_kernel_image(make_bzimage(COMPRESSORS[compression](vmlinux)), "bare")
        assert image.vmlinux == vmlinux


def test_lz4_multi_block_and_concatenated_streams() -> None:
    vmlinux = small_vmlinux() + bytes(range(256)) * 4000  # ~1 MiB
    packed = lz4_legacy(vmlinux[:300_000], block=100_000) + lz4_legacy(vmlinux[300_000:])
    image = unpack_kernel_image(make_bzimage(packed + size_trailer(vmlinux)), "multi")
    assert image.vmlinux == vmlinux


def test_raw_elf_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(small_vmlinux())
    image = load_kernel_image(path)
    assert image.compression is Compression.NONE and image.btf is not None


def test_elf_without_btf_or_sections() -> None:
    image = unpack_kernel_image(make_elf([(".text", 1, b"\xc3")]), "nobtf")
    assert image.btf is None and image.banner is None
    no_sections = bytearray(make_elf([]))
    struct.pack_into("<Q", no_sections, 0x28, 0)  # e_shoff = 0
    assert unpack_kernel_image(bytes(no_sections), "bare").sections == ()


@pytest.mark.parametrize(
    "compression", [c for c in COMPRESSORS if c is not Compression.NONE], ids=lambda c: c.value
)
def test_corrupt_payloads(compression: Compression) -> None:
    vmlinux = small_vmlinux()
    packed = bytearray(COMPRESSORS[compression](vmlinux))
    middle = len(packed) // 2
    packed[middle : middle + 16] = bytes(b ^ 0x5A for b in packed[middle : middle + 16])
    # LZ4 has no checksum: flipped literals decode to wrong bytes of the right length, so
    # only the ELF check or nothing may notice. Everything else must fail.
    try:
        image = unpack_kernel_image(make_bzimage(bytes(packed) + size_trailer(vmlinux)), "bad")
    except SymbolsError as exc:
        assert "bad" in str(exc)
    else:
        assert compression is Compression.LZ4 and image.vmlinux != vmlinux

    truncated = COMPRESSORS[compression](vmlinux)[:-40]
    with pytest.raises(SymbolsError):
        unpack_kernel_image(make_bzimage(truncated), "short")


def test_unknown_and_unsupported_compressions() -> None:
    with pytest.raises(SymbolsError, match="unsupported payload compression lzo"):
        unpack_kernel_image(make_bzimage(b"\x89LZO\x00" + bytes(100)), "lzo")
    with pytest.raises(SymbolsError, match="unknown payload compression \\(starts 0102"):
        unpack_kernel_image(make_bzimage(b"\x01\x02\x03\x04" + bytes(100)), "odd")


def test_payload_that_is_not_an_elf() -> None:
    with pytest.raises(SymbolsError, match="gzip payload is not an ELF"):
        unpack_kernel_image(make_bzimage(gzip.compress(b"MZ" + bytes(200))), "pe")


def test_decompression_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kimage, "MAX_OUTPUT", 1 << 16)
    bomb = bytes(1 << 20)
    for compression in (Compression.GZIP, Compression.XZ, Compression.BZIP2, Compression.ZSTD,
                        Compression.LZ4):  # fmt: skip
        with pytest.raises(SymbolsError, match="more than 65536 bytes"):
            unpack_kernel_image(make_bzimage(COMPRESSORS[compression](bomb)), compression.value)


def test_not_a_kernel(tmp_path: Path) -> None:
    with pytest.raises(SymbolsError, match="cannot read"):
        load_kernel_image(tmp_path / "missing")
    with pytest.raises(SymbolsError, match="cannot read"):
        load_kernel_image(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_bytes(b"hello" * 200)
    with pytest.raises(SymbolsError, match="not a bzImage"):
        load_kernel_image(text)
    with pytest.raises(SymbolsError, match="too short"):
        unpack_kernel_image(b"", "empty")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (lambda e: struct.pack_into("<Q", e, 0x28, len(e) - 10), "past the end"),
        (lambda e: struct.pack_into("<H", e, 0x3A, 40), "section header size 40"),
        (lambda e: struct.pack_into("<H", e, 0x3E, 200), "implausible"),
        (lambda e: e.__setitem__(4, 7), "bad ELF class"),
        (lambda e: struct.pack_into("<Q", e, _shdr(e, 1) + 0x18, 1 << 40), "section 1"),
    ],
)
def test_corrupt_elf(patch, message: str) -> None:  # type: ignore[no-untyped-def]
    elf = bytearray(small_vmlinux())
    patch(elf)
    with pytest.raises(SymbolsError, match=message):
        unpack_kernel_image(make_bzimage(gzip.compress(bytes(elf))), "elf")


def _shdr(elf: bytearray, index: int) -> int:
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    return shoff + 64 * index


def test_truncated_elf() -> None:
    elf = small_vmlinux()
    for cut in (4, 0x3F, 0x80, len(elf) - 1):
        with pytest.raises(SymbolsError):
            unpack_kernel_image(make_bzimage(gzip.compress(elf[:cut])), "elf")
