"""Unpack an x86 bzImage into its vmlinux ELF, to read `.BTF`, symbols and the banner.

A bzImage is real-mode setup code followed by the protected-mode decompressor, which
carries the compressed vmlinux as its payload. The boot protocol header tells where:
"HdrS" at 0x202, setup_sects at 0x1f1 (the protected-mode code starts after
setup_sects + 1 sectors), payload_offset/payload_length at 0x248/0x24c (protocol 2.08+),
relative to the protected-mode code. The kernel build appends the uncompressed size as
a little-endian u32 to every compressed payload; where it can be told apart it is checked.

Images are untrusted (they may come from a guest's disk), so every offset is checked and
decompression stops at `MAX_OUTPUT` bytes and caps decoder memory.
"""

from __future__ import annotations

import bz2
import enum
import lzma
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from sva.errors import SymbolsError

MAX_OUTPUT = 512 << 20  # decompressed vmlinux; Debian's is ~60 MiB
MAX_INPUT = 512 << 20  # the image file itself (a raw vmlinux may be large)
MAX_DECODER_MEMORY = 256 << 20  # xz/lzma/zstd window a header may ask for
MAX_SECTIONS = 65535
MAX_BANNER = 512
LZ4_LEGACY_BLOCK = 8 << 20  # each legacy-frame block decompresses to at most this
_ZSTD_FEED = 512  # input bytes per zstd step: bounds the output of one step to ~16 MiB

_SETUP_SECTS = 0x1F1
_BOOT_FLAG = 0x1FE
_HDRS = 0x202
_PROTOCOL_VERSION = 0x206
_PAYLOAD_OFFSET = 0x248
_MIN_PROTOCOL = 0x208  # first boot protocol with payload_offset/payload_length
_LZ4_LEGACY_MAGIC = 0x184C2102


class Compression(enum.Enum):
    NONE = "none"  # a raw vmlinux ELF, or CONFIG_KERNEL_UNCOMPRESSED
    GZIP = "gzip"
    XZ = "xz"
    LZMA = "lzma"
    BZIP2 = "bzip2"
    ZSTD = "zstd"
    LZ4 = "lz4"


# Leading bytes of each payload format. LZO is recognised only to name it in the error.
_MAGICS: tuple[tuple[bytes, Compression | str], ...] = (
    (b"\x7fELF", Compression.NONE),
    (b"\x1f\x8b", Compression.GZIP),
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x5d\x00\x00", Compression.LZMA),
    (b"BZh", Compression.BZIP2),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
    (b"\x02\x21\x4c\x18", Compression.LZ4),
    (b"\x89LZO", "lzo"),
)


@dataclass(frozen=True, slots=True)
class ElfSection:
    name: str
    type: int  # SHT_*
    flags: int
    addr: int
    offset: int
    size: int
    link: int

    @property
    def has_data(self) -> bool:
        return self.type != 8  # SHT_NOBITS (.bss) takes no file space


@dataclass(frozen=True, slots=True)
class KernelImage:
    """A kernel image, unpacked. `vmlinux` is the (stripped) ELF the bzImage carried."""

    path: str
    compression: Compression
    vmlinux: bytes = field(repr=False)
    sections: tuple[ElfSection, ...] = field(repr=False)
    btf: bytes | None = field(repr=False)
    banner: str | None
    symbols: Mapping[str, int] = field(repr=False, compare=False)

    def section(self, name: str) -> ElfSection | None:
        return next((s for s in self.sections if s.name == name), None)

    def section_data(self, name: str) -> memoryview | None:
        """The section's bytes (empty for .bss-like sections); None if there is none."""
        sec = self.section(name)
        if sec is None:
            return None
        if not sec.has_data:
            return memoryview(b"")
        return memoryview(self.vmlinux)[sec.offset : sec.offset + sec.size]


def load_kernel_image(path: str | os.PathLike[str]) -> KernelImage:
    """Read a bzImage (or a raw vmlinux ELF) and unpack it. SymbolsError on any problem."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_INPUT + 1)
    except OSError as exc:
        raise SymbolsError(name, f"cannot read kernel image: {exc.strerror or exc}") from exc
    if len(data) > MAX_INPUT:
        raise SymbolsError(name, f"larger than {MAX_INPUT >> 20} MiB: not a kernel image")
    return unpack_kernel_image(data, name)


def unpack_kernel_image(data: bytes, source: str) -> KernelImage:
    """`load_kernel_image` on bytes already in memory; `source` names them in errors."""
    if data[:4] == b"\x7fELF":
        compression, vmlinux = Compression.NONE, data
    else:
        payload_start, payload = _bzimage_payload(data, source)
        compression = _detect(payload, source, payload_start)
        vmlinux = _decompress(compression, payload, source, payload_start)
        if vmlinux[:4] != b"\x7fELF":
            raise SymbolsError(source, f"{compression.value} payload is not an ELF vmlinux")
    sections = _elf_sections(vmlinux, source)
    by_name = {s.name: s for s in reversed(sections)}
    btf = by_name.get(".BTF")
    return KernelImage(
        path=source,
        compression=compression,
        vmlinux=vmlinux,
        sections=sections,
        btf=_data(vmlinux, btf) if btf is not None else None,
        banner=_banner(vmlinux, by_name.get(".rodata")),
        symbols=MappingProxyType(_elf_symbols(vmlinux, sections)),
    )


def _bzimage_payload(data: bytes, source: str) -> tuple[int, bytes]:
    if len(data) < _PAYLOAD_OFFSET + 8:
        raise SymbolsError(source, f"{len(data)} bytes is too short for a bzImage")
    if data[_HDRS : _HDRS + 4] != b"HdrS" or data[_BOOT_FLAG : _BOOT_FLAG + 2] != b"\x55\xaa":
        raise SymbolsError(source, "not a bzImage (no HdrS boot header) nor an ELF vmlinux")
    (version,) = struct.unpack_from("<H", data, _PROTOCOL_VERSION)
    if version < _MIN_PROTOCOL:
        raise SymbolsError(
            source, f"boot protocol {version >> 8}.{version & 0xFF:02d} predates payload fields"
        )
    setup_sects = data[_SETUP_SECTS] or 4  # 0 means 4, for ancient bootloaders
    pm_start = (setup_sects + 1) * 512
    payload_offset, payload_length = struct.unpack_from("<II", data, _PAYLOAD_OFFSET)
    start = pm_start + payload_offset
    if payload_length < 8 or start + payload_length > len(data):
        raise SymbolsError(
            source,
            f"payload 0x{start:x}+0x{payload_length:x} lies outside the "
            f"0x{len(data):x}-byte image (truncated?)",
            _PAYLOAD_OFFSET,
        )
    return start, data[start : start + payload_length]


def _detect(payload: bytes, source: str, offset: int) -> Compression:
    for magic, compression in _MAGICS:
        if payload.startswith(magic):
            if isinstance(compression, str):
                raise SymbolsError(source, f"unsupported payload compression {compression}", offset)
            return compression
    raise SymbolsError(source, f"unknown payload compression (starts {payload[:8].hex()})", offset)


def _decompress(compression: Compression, payload: bytes, source: str, offset: int) -> bytes:
    try:
        if compression is Compression.NONE:
            out, tail = payload, b""
        elif compression is Compression.LZ4:
            out, tail = _lz4_legacy(payload, source, offset)
        elif compression is Compression.ZSTD:
            out, tail = _zstd(payload, source, offset)
        else:
            out, tail = _stdlib(compression, payload, source, offset)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError, MemoryError) as exc:
        # OSError: bz2 on corrupt data; EOFError/ValueError: decoders fed after their end.
        raise SymbolsError(source, f"corrupt {compression.value} payload: {exc}", offset) from exc
    if len(tail) == 4 and int.from_bytes(tail, "little") != len(out) & 0xFFFFFFFF:
        raise SymbolsError(
            source,
            f"{compression.value} payload gave {len(out)} bytes but its size trailer says "
            f"{int.from_bytes(tail, 'little')}",
            offset,
        )
    return out


def _too_big(source: str, offset: int) -> SymbolsError:
    return SymbolsError(source, f"payload decompresses to more than {MAX_OUTPUT} bytes", offset)


def _stdlib(
    compression: Compression, payload: bytes, source: str, offset: int
) -> tuple[bytes, bytes]:
    """gzip, xz, lzma or bzip2: one bounded call; returns (output, bytes after the stream)."""
    decoder: zlib._Decompress | lzma.LZMADecompressor | bz2.BZ2Decompressor
    if compression is Compression.GZIP:
        zd = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        out = zd.decompress(payload, MAX_OUTPUT + 1)
        done, tail = zd.eof, zd.unused_data
    else:
        if compression is Compression.BZIP2:
            decoder = bz2.BZ2Decompressor()
        else:  # xz or legacy .lzma: FORMAT_AUTO tells them apart
            decoder = lzma.LZMADecompressor(memlimit=MAX_DECODER_MEMORY)
        out = decoder.decompress(payload, MAX_OUTPUT + 1)
        done, tail = decoder.eof, decoder.unused_data
    if len(out) > MAX_OUTPUT:
        raise _too_big(source, offset)
    if not done:
        raise SymbolsError(source, f"{compression.value} payload is truncated", offset)
    return out, tail


def _zstd(payload: bytes, source: str, offset: int) -> tuple[bytes, bytes]:
    """zstd, fed in small pieces: its decompressobj has no output bound of its own, and
    one piece can expand at most ~128 KiB per 4 input bytes (RLE blocks)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_DECODER_MEMORY)
    decoder = dctx.decompressobj()
    view = memoryview(payload)
    chunks: list[bytes] = []
    total = pos = 0
    try:
        while pos < len(view) and not decoder.eof:
            chunk = decoder.decompress(view[pos : pos + _ZSTD_FEED])
            pos += _ZSTD_FEED
            total += len(chunk)
            if total > MAX_OUTPUT:
                raise _too_big(source, offset)
            chunks.append(chunk)
    except zstandard.ZstdError as exc:
        raise SymbolsError(source, f"corrupt zstd payload: {exc}", offset) from exc
    if not decoder.eof:
        raise SymbolsError(source, "zstd payload is truncated", offset)
    return b"".join(chunks), decoder.unused_data + payload[pos:]


def _lz4_legacy(payload: bytes, source: str, offset: int) -> tuple[bytes, bytes]:
    """LZ4 legacy frames (`lz4 -l`): magic, then [u32 size][block] to the end.

    python-lz4's frame module does not read the legacy format, so the blocks are split
    here and each one decompressed, bounded to the 8 MiB a legacy block can hold.
    """
    import lz4.block

    chunks: list[bytes] = []
    total = 0
    pos, end = 4, len(payload)
    while pos < end:
        if end - pos < 4:
            raise SymbolsError(source, "lz4 payload ends inside a block header", offset + pos)
        (size,) = struct.unpack_from("<I", payload, pos)
        if size == _LZ4_LEGACY_MAGIC:  # concatenated legacy streams
            pos += 4
            continue
        if size > end - pos - 4:
            if end - pos == 4:  # the build's size trailer, not a block
                return b"".join(chunks), payload[pos:]
            raise SymbolsError(
                source, f"lz4 block of {size} bytes runs past the payload end", offset + pos
            )
        try:
            block = lz4.block.decompress(
                payload[pos + 4 : pos + 4 + size], uncompressed_size=LZ4_LEGACY_BLOCK
            )
        except lz4.block.LZ4BlockError as exc:
            raise SymbolsError(source, f"corrupt lz4 block: {exc}", offset + pos) from exc
        total += len(block)
        if total > MAX_OUTPUT:
            raise _too_big(source, offset)
        chunks.append(block)
        pos += 4 + size
    return b"".join(chunks), b""


def _data(image: bytes, sec: ElfSection) -> bytes:
    return image[sec.offset : sec.offset + sec.size] if sec.has_data else b""


def _elf_sections(image: bytes, source: str) -> tuple[ElfSection, ...]:
    """Section headers of an ELF32/ELF64 of either byte order, each checked against the file."""
    if len(image) < 0x40:
        raise SymbolsError(source, "vmlinux is too short for an ELF header")
    elf_class, data_order = image[4], image[5]
    if elf_class not in (1, 2) or data_order not in (1, 2):
        raise SymbolsError(source, f"vmlinux has bad ELF class/data bytes {elf_class}/{data_order}")
    e = "<" if data_order == 1 else ">"
    if elf_class == 2:
        shoff, shentsize, shnum, shstrndx = struct.unpack_from(e + "Q10xHHH", image, 0x28)
        entry, want = struct.Struct(e + "IIQQQQIIQQ"), 64
    else:
        shoff, shentsize, shnum, shstrndx = struct.unpack_from(e + "I10xHHH", image, 0x20)
        entry, want = struct.Struct(e + "IIIIIIIIII"), 40
    if shoff == 0:
        return ()
    if shentsize != want:
        raise SymbolsError(source, f"ELF section header size {shentsize}, expected {want}")

    def header(index: int) -> tuple[int, ...]:
        at = shoff + index * want
        if at + want > len(image):
            raise SymbolsError(source, f"ELF section header {index} lies past the end", at)
        return entry.unpack_from(image, at)

    first = header(0)
    if shnum == 0:  # extended numbering: the real count is in section 0's size
        shnum = first[5]
    if shstrndx == 0xFFFF:  # SHN_XINDEX: the real index is in section 0's link
        shstrndx = first[6]
    if shnum > MAX_SECTIONS or shstrndx >= shnum:
        raise SymbolsError(source, f"implausible ELF section count {shnum} / index {shstrndx}")
    raw = [header(i) for i in range(shnum)]
    for index, (_, sh_type, _, _, off, size, *_rest) in enumerate(raw):
        if sh_type != 8 and off + size > len(image):
            raise SymbolsError(
                source, f"ELF section {index} 0x{off:x}+0x{size:x} lies past the end", off
            )
    names = raw[shstrndx]
    strtab = image[names[4] : names[4] + names[5]]
    return tuple(
        ElfSection(_cstr(strtab, name), sh_type, flags, addr, off, size, link)
        for name, sh_type, flags, addr, off, size, link, *_rest in raw
    )


def _cstr(table: bytes, offset: int) -> str:
    if offset >= len(table):
        return ""
    end = table.find(b"\0", offset)
    return table[offset : end if end >= 0 else len(table)].decode("utf-8", "backslashreplace")


def _elf_symbols(image: bytes, sections: tuple[ElfSection, ...]) -> dict[str, int]:
    """Named symbols of .symtab (first definition wins); empty for a stripped image."""
    symtab = next((s for s in sections if s.type == 2), None)  # SHT_SYMTAB
    if symtab is None or symtab.link >= len(sections):
        return {}
    strtab = _data(image, sections[symtab.link])
    if image[4] == 2:
        entry, name_at, value_at = struct.Struct(("<" if image[5] == 1 else ">") + "IBBHQQ"), 0, 4
    else:
        entry, name_at, value_at = struct.Struct(("<" if image[5] == 1 else ">") + "IIIBBH"), 0, 1
    table = _data(image, symtab)
    usable = len(table) - len(table) % entry.size
    symbols: dict[str, int] = {}
    for fields in entry.iter_unpack(table[:usable]):
        name = _cstr(strtab, fields[name_at]) if fields[name_at] else ""
        if name and name not in symbols:
            symbols[name] = fields[value_at]
    return symbols


def _banner(image: bytes, rodata: ElfSection | None) -> str | None:
    """linux_banner: "Linux version <release> (...) ...", from .rodata if there is one."""
    start, end = (rodata.offset, rodata.offset + rodata.size) if rodata else (0, len(image))
    at = image.find(b"Linux version ", start, end)
    while at >= 0:
        digit = image[at + 14 : at + 15]
        if digit.isdigit():  # skip format strings such as "Linux version %s"
            stop = at + MAX_BANNER
            for terminator in (b"\n", b"\0"):
                found = image.find(terminator, at, stop)
                if found >= 0:
                    stop = found
            return image[at:stop].decode("utf-8", "backslashreplace")
        at = image.find(b"Linux version ", at + 1, end)
    return None
