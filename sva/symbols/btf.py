"""Parse BTF, the kernel's own compact description of its C types.

Written from the kernel's Documentation/bpf/btf.rst. A kernel built with
CONFIG_DEBUG_INFO_BTF carries every struct, union, enum, typedef, function prototype and
per-CPU variable it has in a `.BTF` section, so sva can build symbol tables for kernels it
has never seen, without debug packages.

The blob is untrusted: it may come from a hostile guest's RAM or be a damaged copy. So
`parse_btf` checks every id, name offset, length and count in one linear pass, bounded by
`MAX_BTF_SIZE` and `MAX_TYPES`, and anything wrong is a `SymbolsError` that names the
source, the type id and the byte offset. Once parsed, reading a type cannot fail.

Speed: a kernel BTF has ~130k types and ~170k members, params and enum values. Every BTF
record is a whole number of u32 words, so the type section is held as one u32 array and
validated with C-level slicing (`max(words[a:b:3])`) instead of per-field unpacking. Typed
objects are built only when a type is looked at, and cached: building all of them up front
would cost more than the parse itself.
"""

from __future__ import annotations

import enum
import hashlib
import re
import struct
import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, NoReturn

from sva.errors import SymbolsError

BTF_MAGIC = 0xEB9F
BTF_VERSION = 1
HEADER_SIZE = 24
# A longer header would be a future format; the kernel requires the extra bytes be zero.
# Beyond this it is damage, not a newer version.
MAX_HEADER_SIZE = 256
# Kernel BTF is ~5 MiB; this leaves room for huge configs while bounding memory and time.
MAX_BTF_SIZE = 128 << 20
MAX_TYPES = 0xFFFFF  # BTF_MAX_TYPE in the kernel: ids are 20-bit in places
MAX_STR_LEN = 1 << 24  # BTF_MAX_NAME_OFFSET + 1
# Longest typedef/qualifier chain followed (MAX_RESOLVE_DEPTH in the kernel is 32).
MAX_CHAIN = 32
# How many header look-alikes in a memory buffer are tried before giving up.
MAX_CANDIDATES = 64

_U32 = next(code for code in "IL" if array(code).itemsize == 4)
ByteOrder = Literal["little", "big"]
_HEADER_LE = struct.Struct("<HBBIIIII")
_HEADER_BE = struct.Struct(">HBBIIIII")
# Magic, version 1 and flags 0 in either byte order: what a header scan looks for.
_HEADER_PATTERN = re.compile(rb"\x9f\xeb\x01\x00|\xeb\x9f\x01\x00")
# info: vlen bits 0-15, kind bits 24-28, kind_flag bit 31; the rest is reserved.
_INFO_RESERVED = 0x60FF0000
_INT_RESERVED = 0xF000FF00  # bits 8-15 and 28-31 of the INT word


class BtfKind(enum.IntEnum):
    """BTF_KIND_* values. VOID is type id 0 only; a record of kind 0 is invalid."""

    VOID = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Kinds that only rename or qualify another type: `resolve` looks through them.
MODIFIER_KINDS = frozenset(
    {BtfKind.TYPEDEF, BtfKind.VOLATILE, BtfKind.CONST, BtfKind.RESTRICT, BtfKind.TYPE_TAG}
)
_SIZED_KINDS = frozenset(
    {
        BtfKind.INT,
        BtfKind.STRUCT,
        BtfKind.UNION,
        BtfKind.ENUM,
        BtfKind.ENUM64,
        BtfKind.FLOAT,
        BtfKind.DATASEC,
    }
)


class IntEncoding(enum.IntFlag):
    """BTF_INT_* encoding bits of an INT type (at most one is set)."""

    NONE = 0
    SIGNED = 1
    CHAR = 2
    BOOL = 4


class BtfLinkage(enum.IntEnum):
    """Linkage of a FUNC (kept in vlen) or a VAR (kept in its btf_var word)."""

    STATIC = 0
    GLOBAL = 1
    EXTERN = 2


@dataclass(frozen=True, slots=True)
class BtfType:
    """Fields every type has. `name` is "" for anonymous types and "void" for id 0."""

    type_id: int
    kind: BtfKind
    name: str
    kind_flag: bool


@dataclass(frozen=True, slots=True)
class BtfVoid(BtfType):
    """Type id 0."""


@dataclass(frozen=True, slots=True)
class BtfInt(BtfType):
    size: int
    encoding: IntEncoding
    bit_offset: int
    bits: int

    @property
    def signed(self) -> bool:
        return bool(self.encoding & IntEncoding.SIGNED)


@dataclass(frozen=True, slots=True)
class BtfPtr(BtfType):
    target: int


@dataclass(frozen=True, slots=True)
class BtfArray(BtfType):
    element_type: int
    index_type: int
    nelems: int


@dataclass(frozen=True, slots=True)
class BtfMember:
    """A struct/union member. `bitfield_size` is 0 unless the member is a bitfield."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int

    @property
    def byte_offset(self) -> int:
        return self.bit_offset // 8


@dataclass(frozen=True, slots=True)
class BtfStruct(BtfType):
    """STRUCT or UNION (see `kind`). With kind_flag set, members may carry bitfield sizes."""

    size: int
    members: tuple[BtfMember, ...]

    @property
    def is_union(self) -> bool:
        return self.kind is BtfKind.UNION

    def member(self, name: str) -> BtfMember | None:
        return next((m for m in self.members if m.name == name), None)


@dataclass(frozen=True, slots=True)
class BtfEnumValue:
    name: str
    value: int


@dataclass(frozen=True, slots=True)
class BtfEnum(BtfType):
    """ENUM (32-bit values) or ENUM64; kind_flag says the values are signed."""

    size: int
    signed: bool
    values: tuple[BtfEnumValue, ...]


@dataclass(frozen=True, slots=True)
class BtfFwd(BtfType):
    is_union: bool


@dataclass(frozen=True, slots=True)
class BtfModifier(BtfType):
    """TYPEDEF, VOLATILE, CONST, RESTRICT or TYPE_TAG: a name or qualifier on `target`."""

    target: int


@dataclass(frozen=True, slots=True)
class BtfFunc(BtfType):
    proto: int
    linkage: BtfLinkage


@dataclass(frozen=True, slots=True)
class BtfParam:
    name: str
    type_id: int


@dataclass(frozen=True, slots=True)
class BtfFuncProto(BtfType):
    return_type: int
    params: tuple[BtfParam, ...]

    @property
    def variadic(self) -> bool:
        # A trailing nameless param of type void stands for "...".
        return bool(self.params) and self.params[-1] == BtfParam("", 0)


@dataclass(frozen=True, slots=True)
class BtfVar(BtfType):
    target: int
    linkage: BtfLinkage


@dataclass(frozen=True, slots=True)
class BtfVarSecinfo:
    """One variable placed in a DATASEC: its VAR (or FUNC) type id, offset and size."""

    type_id: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class BtfDatasec(BtfType):
    size: int
    entries: tuple[BtfVarSecinfo, ...]


@dataclass(frozen=True, slots=True)
class BtfFloat(BtfType):
    size: int


@dataclass(frozen=True, slots=True)
class BtfDeclTag(BtfType):
    """A tag on `target`; component_idx -1 tags the type itself, else a member or param."""

    target: int
    component_idx: int


class BtfTypes:
    """The types of a `Btf`, indexable by type id (0 is void); built on first access."""

    __slots__ = ("_btf",)

    def __init__(self, btf: Btf) -> None:
        self._btf = btf

    def __len__(self) -> int:
        return self._btf.type_count + 1

    def __getitem__(self, type_id: int) -> BtfType:
        return self._btf._type(type_id)

    def __iter__(self) -> Iterator[BtfType]:
        for type_id in range(self._btf.type_count + 1):
            yield self._btf._type(type_id)


class Btf:
    """A parsed, validated BTF blob. Made by `parse_btf`; read-only afterwards."""

    def __init__(
        self,
        *,
        source: str,
        byte_order: ByteOrder,
        size: int,
        sha256: str,
        words: array[int],
        starts: array[int],
        kinds: bytes,
        strings: bytes,
        pointer_size: int,
    ) -> None:
        self.source = source
        self.byte_order = byte_order
        self.size = size
        self.sha256 = sha256
        self.pointer_size = pointer_size
        self._words = words
        self._starts = starts
        self._kinds = kinds
        self._strings = strings
        self._names: dict[int, str] = {0: ""}
        self._cache: list[BtfType | None] = [None] * len(kinds)
        self._by_name: dict[str, list[int]] | None = None
        self.types = BtfTypes(self)

    def __repr__(self) -> str:
        return f"<Btf {self.source} {self.type_count} types sha256={self.sha256[:16]}>"

    @property
    def type_count(self) -> int:
        """Number of types, not counting void."""
        return len(self._kinds) - 1

    def kind_of(self, type_id: int) -> BtfKind:
        return BtfKind(self._kinds[self._check_id(type_id)])

    def name(self, type_id: int) -> str:
        """The type's own name: "" when anonymous, "void" for id 0."""
        if self._check_id(type_id) == 0:
            return "void"
        return self._string(self._words[self._starts[type_id]])

    def ids_of_kind(self, kind: BtfKind) -> list[int]:
        k = int(kind)
        return [i for i, v in enumerate(self._kinds) if v == k and i]

    def find_all(self, name: str, kind: BtfKind | None = None) -> list[BtfType]:
        """All types named `name` (and of `kind`, if given), in id order."""
        if self._by_name is None:
            self._by_name = self._index_names()
        ids = self._by_name.get(name, ())
        return [self._type(i) for i in ids if kind is None or self._kinds[i] == kind]

    def find(self, name: str, kind: BtfKind | None = None) -> BtfType | None:
        """The lowest-id type named `name` (of `kind`, if given); None if there is none.

        Pass `kind`: a name can be both a FWD and a STRUCT, or a STRUCT and a TYPEDEF.
        """
        found = self.find_all(name, kind)
        return found[0] if found else None

    def resolve(self, type_id: int) -> BtfType:
        """The type behind any typedefs, qualifiers and type tags on `type_id`."""
        seen: list[int] = []
        current = self._check_id(type_id)
        while self._kinds[current] in MODIFIER_KINDS:
            if current in seen or len(seen) >= MAX_CHAIN:
                self._chain_error(type_id, seen + [current])
            seen.append(current)
            current = self._words[self._starts[current] + 2]
        return self._type(current)

    def size_of(self, type_id: int) -> int:
        """sizeof() of the type in bytes; SymbolsError for void, functions and FWDs."""
        count = 1
        seen: list[int] = []
        current = self._check_id(type_id)
        while True:
            if current in seen or len(seen) >= 2 * MAX_CHAIN:
                self._chain_error(type_id, seen + [current])
            seen.append(current)
            kind = self._kinds[current]
            pos = self._starts[current]
            if kind in _SIZED_KINDS:
                return count * self._words[pos + 2]
            if kind == BtfKind.PTR:
                return count * self.pointer_size
            if kind in MODIFIER_KINDS or kind == BtfKind.VAR:
                current = self._words[pos + 2]
            elif kind == BtfKind.ARRAY:
                count *= self._words[pos + 5]
                current = self._words[pos + 3]
            else:
                what = (
                    f"type {type_id}" if current == type_id else f"type {type_id} (via {current})"
                )
                raise SymbolsError(self.source, f"{what}: {BtfKind(kind).name} has no size")

    def _chain_error(self, type_id: int, chain: list[int]) -> NoReturn:
        shown = " -> ".join(str(i) for i in chain[:12]) + (" ..." if len(chain) > 12 else "")
        why = "cycle" if chain[-1] in chain[:-1] else f"chain longer than {MAX_CHAIN}"
        raise SymbolsError(self.source, f"type {type_id}: {why} through types {shown}")

    def _check_id(self, type_id: int) -> int:
        if not isinstance(type_id, int) or not 0 <= type_id < len(self._kinds):
            raise SymbolsError(
                self.source, f"type id {type_id!r} out of range (0..{self.type_count})"
            )
        return type_id

    def _string(self, offset: int) -> str:
        text = self._names.get(offset)
        if text is None:
            # Validated at parse: offset < len and the section ends in NUL.
            end = self._strings.index(b"\0", offset)
            text = self._strings[offset:end].decode("utf-8", "backslashreplace")
            self._names[offset] = text
        return text

    def _index_names(self) -> dict[str, list[int]]:
        index: dict[str, list[int]] = {}
        words, starts = self._words, self._starts
        for type_id in range(1, len(self._kinds)):
            name_off = words[starts[type_id]]
            if name_off:
                index.setdefault(self._string(name_off), []).append(type_id)
        return index

    def _type(self, type_id: int) -> BtfType:
        cached = self._cache[self._check_id(type_id)]
        if cached is None:
            cached = self._cache[type_id] = self._build(type_id)
        return cached

    def _build(self, type_id: int) -> BtfType:
        if type_id == 0:
            return BtfVoid(0, BtfKind.VOID, "void", False)
        w, s = self._words, self._string
        pos = self._starts[type_id]
        kind = BtfKind(self._kinds[type_id])
        info, st = w[pos + 1], w[pos + 2]
        vlen, flag = info & 0xFFFF, bool(info >> 31)
        base = (type_id, kind, s(w[pos]), flag)
        body = pos + 3
        match kind:
            case BtfKind.INT:
                word = w[body]
                return BtfInt(
                    *base, st, IntEncoding((word >> 24) & 0xF), (word >> 16) & 0xFF, word & 0xFF
                )
            case BtfKind.PTR:
                return BtfPtr(*base, st)
            case BtfKind.ARRAY:
                return BtfArray(*base, w[body], w[body + 1], w[body + 2])
            case BtfKind.STRUCT | BtfKind.UNION:
                raw = w[body : body + 3 * vlen]
                if flag:
                    members = tuple(
                        BtfMember(s(raw[i]), raw[i + 1], raw[i + 2] & 0xFFFFFF, raw[i + 2] >> 24)
                        for i in range(0, len(raw), 3)
                    )
                else:
                    members = tuple(
                        BtfMember(s(raw[i]), raw[i + 1], raw[i + 2], 0)
                        for i in range(0, len(raw), 3)
                    )
                return BtfStruct(*base, st, members)
            case BtfKind.ENUM:
                raw = w[body : body + 2 * vlen]
                values = tuple(
                    BtfEnumValue(s(raw[i]), _signed(raw[i + 1], 32) if flag else raw[i + 1])
                    for i in range(0, len(raw), 2)
                )
                return BtfEnum(*base, st, flag, values)
            case BtfKind.ENUM64:
                raw = w[body : body + 3 * vlen]
                values = tuple(
                    BtfEnumValue(
                        s(raw[i]),
                        _signed(raw[i + 1] | raw[i + 2] << 32, 64)
                        if flag
                        else raw[i + 1] | raw[i + 2] << 32,
                    )
                    for i in range(0, len(raw), 3)
                )
                return BtfEnum(*base, st, flag, values)
            case BtfKind.FWD:
                return BtfFwd(*base, flag)
            case BtfKind.FUNC:
                return BtfFunc(*base, st, BtfLinkage(vlen))
            case BtfKind.FUNC_PROTO:
                raw = w[body : body + 2 * vlen]
                params = tuple(BtfParam(s(raw[i]), raw[i + 1]) for i in range(0, len(raw), 2))
                return BtfFuncProto(*base, st, params)
            case BtfKind.VAR:
                return BtfVar(*base, st, BtfLinkage(w[body]))
            case BtfKind.DATASEC:
                raw = w[body : body + 3 * vlen]
                entries = tuple(
                    BtfVarSecinfo(raw[i], raw[i + 1], raw[i + 2]) for i in range(0, len(raw), 3)
                )
                return BtfDatasec(*base, st, entries)
            case BtfKind.FLOAT:
                return BtfFloat(*base, st)
            case BtfKind.DECL_TAG:
                return BtfDeclTag(*base, st, _signed(w[body], 32))
            case _:  # the modifier kinds
                return BtfModifier(*base, st)


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) else value


@dataclass(frozen=True, slots=True)
class _Header:
    byte_order: ByteOrder
    hdr_len: int
    type_off: int
    type_len: int
    str_off: int
    str_len: int

    @property
    def blob_size(self) -> int:
        return self.hdr_len + max(self.type_off + self.type_len, self.str_off + self.str_len)


def _read_header(data: memoryview, offset: int) -> _Header | str:
    """The header at `offset`, or why it cannot be a BTF header (no section parsing)."""
    if len(data) - offset < HEADER_SIZE:
        return f"{len(data) - offset} bytes is shorter than a BTF header"
    byte_order: ByteOrder
    if data[offset] == 0x9F and data[offset + 1] == 0xEB:
        layout, byte_order = _HEADER_LE, "little"
    elif data[offset] == 0xEB and data[offset + 1] == 0x9F:
        layout, byte_order = _HEADER_BE, "big"
    else:
        return f"bad magic {bytes(data[offset : offset + 2]).hex()} (want 9feb or eb9f)"
    _, version, flags, hdr_len, type_off, type_len, str_off, str_len = layout.unpack_from(
        data, offset
    )
    if version != BTF_VERSION:
        return f"unsupported BTF version {version}"
    if flags:
        return f"unsupported header flags 0x{flags:x}"
    if not HEADER_SIZE <= hdr_len <= MAX_HEADER_SIZE:
        return f"hdr_len {hdr_len} outside {HEADER_SIZE}..{MAX_HEADER_SIZE}"
    if type_off % 4 or type_len % 4:
        return f"type section 0x{type_off:x}+0x{type_len:x} is not 4-byte aligned"
    if type_off + type_len > MAX_BTF_SIZE or str_off + str_len > MAX_BTF_SIZE:
        return f"sections exceed the {MAX_BTF_SIZE >> 20} MiB limit"
    if not 0 < str_len <= MAX_STR_LEN:
        return f"str_len {str_len} outside 1..{MAX_STR_LEN}"
    if type_off < str_off + str_len and str_off < type_off + type_len:
        return "type and string sections overlap"
    header = _Header(byte_order, hdr_len, type_off, type_len, str_off, str_len)
    if offset + header.blob_size > len(data):
        return (
            f"sections end at 0x{header.blob_size:x} "
            f"but only 0x{len(data) - offset:x} bytes are there (truncated)"
        )
    if any(data[offset + HEADER_SIZE : offset + hdr_len]):
        return "unknown non-zero header fields beyond the first 24 bytes"
    return header


def parse_btf(data: bytes | bytearray | memoryview, source: str, *, pointer_size: int = 8) -> Btf:
    """Parse and fully validate a BTF blob; bytes after its last section are ignored.

    `pointer_size` is the guest's (8 for x86-64). Raises SymbolsError naming `source`.
    """
    view = _byte_view(data, source)
    header = _read_header(view, 0)
    if isinstance(header, str):
        raise SymbolsError(source, header, 0)
    try:
        return _parse_sections(view, header, source, pointer_size)
    except (IndexError, ValueError, OverflowError, struct.error) as exc:  # pragma: no cover
        # Every bound is checked above this line; this keeps the "only SymbolsError"
        # promise should a check ever be missed.
        raise SymbolsError(source, f"malformed BTF ({type(exc).__name__}: {exc})") from exc


def _byte_view(data: bytes | bytearray | memoryview, source: str) -> memoryview:
    """A flat byte view of any contiguous buffer (a mmap, a memoryview of words...)."""
    try:
        return memoryview(data).cast("B")
    except TypeError as exc:
        raise SymbolsError(source, f"not a contiguous byte buffer: {exc}") from exc


def _parse_sections(view: memoryview, header: _Header, source: str, pointer_size: int) -> Btf:
    type_start = header.hdr_len + header.type_off
    str_start = header.hdr_len + header.str_off
    strings = bytes(view[str_start : str_start + header.str_len])
    if strings[0] or strings[-1]:
        raise SymbolsError(source, "string section must start and end with a NUL byte", str_start)
    words = array(_U32)
    words.frombytes(view[type_start : type_start + header.type_len])
    if (header.byte_order == "big") != (sys.byteorder == "big"):
        words.byteswap()
    starts, kinds = _scan_types(words, len(strings), source, type_start)
    return Btf(
        source=source,
        byte_order=header.byte_order,
        size=header.blob_size,
        sha256=hashlib.sha256(view[: header.blob_size]).hexdigest(),
        words=words,
        starts=starts,
        kinds=bytes(kinds),
        strings=strings,
        pointer_size=pointer_size,
    )


def _record_shapes() -> list[tuple[int, int] | None]:
    """Words after the 3-word btf_type, as (fixed, per vlen entry), indexed by kind.

    None marks an unknown kind (including 0, which only type id 0 has).
    """
    shapes: list[tuple[int, int] | None] = [None] * 32
    for kind in BtfKind:
        if kind is not BtfKind.VOID:
            shapes[kind] = (0, 0)
    for kind in (BtfKind.INT, BtfKind.VAR, BtfKind.DECL_TAG):
        shapes[kind] = (1, 0)
    shapes[BtfKind.ARRAY] = (3, 0)
    for kind in (BtfKind.ENUM, BtfKind.FUNC_PROTO):
        shapes[kind] = (0, 2)
    for kind in (BtfKind.STRUCT, BtfKind.UNION, BtfKind.DATASEC, BtfKind.ENUM64):
        shapes[kind] = (0, 3)
    return shapes


_SHAPE = _record_shapes()

# Plain ints: the record loop runs ~100k times and enum attribute lookups are slow there.
_INT, _ARRAY, _STRUCT, _UNION = 1, 3, 4, 5
_ENUM, _FWD, _FUNC, _FUNC_PROTO = 6, 7, 12, 13
_VAR, _DATASEC, _FLOAT, _DECL_TAG, _ENUM64 = 14, 15, 16, 17, 19
_KIND_NAMES = {int(k): k.name for k in BtfKind}
_Fail = Callable[[int, int, str], NoReturn]


def _scan_types(
    w: array[int], str_len: int, source: str, type_start: int
) -> tuple[array[int], bytearray]:
    """Walk every record once; return each type's word index and kind, or raise."""
    n = len(w)
    starts = array(_U32, [0])
    kinds = bytearray(1)  # id 0: void

    def fail(type_id: int, pos: int, message: str) -> NoReturn:
        raise SymbolsError(source, f"type {type_id}: {message}", type_start + 4 * pos)

    # Ids and name offsets are checked once at the end against the final count / length;
    # remember the largest seen and who used it, for the error message.
    max_ref = max_ref_from = max_name = max_name_from = 0
    pos = type_id = 0
    while pos < n:
        type_id += 1
        if type_id > MAX_TYPES:
            fail(type_id, pos, f"more than {MAX_TYPES} types")
        if pos + 3 > n:
            fail(type_id, pos, "record header runs past the end of the type section")
        name_off, info, st = w[pos], w[pos + 1], w[pos + 2]
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        if info & _INFO_RESERVED:
            fail(type_id, pos, f"reserved bits set in info 0x{info:08x}")
        shape = _SHAPE[kind]
        if shape is None:
            fail(type_id, pos, f"unknown kind {kind}")
        fixed, per = shape
        if vlen and not per and kind != _FUNC:
            fail(type_id, pos, f"{_KIND_NAMES[kind]} with non-zero vlen {vlen}")
        body = pos + 3
        end = body + fixed + per * vlen
        if end > n:
            fail(
                type_id,
                pos,
                f"{_KIND_NAMES[kind]} with vlen {vlen} runs past the end of the type section",
            )
        if name_off > max_name:
            max_name, max_name_from = name_off, type_id
        ref = 0
        if kind == _FUNC:
            if vlen > 2:
                fail(type_id, pos, f"unknown FUNC linkage {vlen}")
            ref = st
        elif kind in (_STRUCT, _UNION):
            if vlen:
                names = max(w[body:end:3])
                ref = max(w[body + 1 : end : 3])
                offsets = w[body + 2 : end : 3]
                if info >> 31:
                    last_bit = max((o & 0xFFFFFF) + (o >> 24) for o in offsets)
                else:
                    last_bit = max(offsets)
                if last_bit > 8 * st:
                    fail(type_id, pos, f"member ends at bit {last_bit}, beyond size {st}")
                if names > max_name:
                    max_name, max_name_from = names, type_id
        elif kind == _FUNC_PROTO:
            ref = st
            if vlen:
                names = max(w[body:end:2])
                ref = max(ref, max(w[body + 1 : end : 2]))
                if names > max_name:
                    max_name, max_name_from = names, type_id
        elif kind in (_ENUM, _ENUM64):
            if st not in (1, 2, 4, 8):
                fail(type_id, pos, f"{_KIND_NAMES[kind]} size {st} is not 1, 2, 4 or 8")
            if vlen:
                names = max(w[body:end:per])
                if names > max_name:
                    max_name, max_name_from = names, type_id
        elif kind == _ARRAY:
            ref = max(w[body], w[body + 1])
        elif kind == _INT:
            word = w[body]
            bits, bit_off = word & 0xFF, (word >> 16) & 0xFF
            if word & _INT_RESERVED or (word >> 24) & 0xF & ~7:
                fail(type_id, pos, f"bad INT encoding word 0x{word:08x}")
            if st not in (1, 2, 4, 8, 16) or not 0 < bits <= 128 or bit_off + bits > 8 * st:
                fail(type_id, pos, f"bad INT: size {st}, {bits} bits at bit offset {bit_off}")
        elif kind == _VAR:
            if w[body] > 2:
                fail(type_id, pos, f"unknown VAR linkage {w[body]}")
            ref = st
        elif kind == _DATASEC:
            if vlen:
                ref = max(w[body:end:3])
        elif kind == _FLOAT:
            if st not in (2, 4, 8, 12, 16):
                fail(type_id, pos, f"FLOAT size {st} is not 2, 4, 8, 12 or 16")
        elif kind == _DECL_TAG:
            if w[body] < 0x80000000 or w[body] == 0xFFFFFFFF:
                ref = st
            else:
                fail(type_id, pos, f"DECL_TAG component_idx {_signed(w[body], 32)} < -1")
        elif kind != _FWD:  # PTR and the modifiers
            ref = st
        if ref > max_ref:
            max_ref, max_ref_from = ref, type_id
        starts.append(pos)
        kinds.append(kind)
        pos = end

    if max_ref > type_id:
        fail(
            max_ref_from,
            starts[max_ref_from],
            f"refers to type id {max_ref}, beyond the last type {type_id}",
        )
    if max_name >= str_len:
        fail(
            max_name_from,
            starts[max_name_from],
            f"name offset 0x{max_name:x} beyond the string section (0x{str_len:x} bytes)",
        )
    _check_kinds_of_refs(w, starts, kinds, fail)
    return starts, kinds


def _check_kinds_of_refs(w: array[int], starts: array[int], kinds: bytearray, fail: _Fail) -> None:
    """References whose target kind is fixed by the format, checked once all kinds are known."""
    func, proto = BtfKind.FUNC, BtfKind.FUNC_PROTO
    for type_id, kind in enumerate(kinds):
        if kind == func:
            if kinds[w[starts[type_id] + 2]] != proto:
                fail(type_id, starts[type_id], "FUNC does not refer to a FUNC_PROTO")
        elif kind == BtfKind.DATASEC:
            pos = starts[type_id]
            vlen = w[pos + 1] & 0xFFFF
            for var in w[pos + 3 : pos + 3 + 3 * vlen : 3]:
                if kinds[var] not in (BtfKind.VAR, func):
                    fail(type_id, pos, f"DATASEC entry {var} is not a VAR or FUNC")
        elif kind == BtfKind.DECL_TAG:
            pos = starts[type_id]
            idx = w[pos + 3]
            if idx == 0xFFFFFFFF:
                continue
            target = w[pos + 2]
            target_kind = kinds[target]
            if target_kind in (BtfKind.STRUCT, BtfKind.UNION):
                count = w[starts[target] + 1] & 0xFFFF
            elif target_kind == func:
                count = w[starts[w[starts[target] + 2]] + 1] & 0xFFFF
            else:
                fail(type_id, pos, f"DECL_TAG component {idx} on a {_KIND_NAMES[target_kind]}")
            if idx >= count:
                fail(type_id, pos, f"DECL_TAG component {idx} beyond {count} members/params")


def find_btf_candidates(buf: bytes | bytearray | memoryview, source: str) -> list[int]:
    """Offsets in `buf` where a plausible BTF header starts, whose sections fit in `buf`.

    Only the header is checked; `parse_first_valid` parses each one fully.
    """
    view = _byte_view(buf, source)
    return [
        match.start()
        for match in _HEADER_PATTERN.finditer(view)
        if not isinstance(_read_header(view, match.start()), str)
    ]


def parse_first_valid(
    buf: bytes | bytearray | memoryview,
    source: str,
    *,
    pointer_size: int = 8,
    max_candidates: int = MAX_CANDIDATES,
) -> Btf:
    """The first BTF in `buf` that parses completely; damaged copies are skipped.

    If none is valid, the SymbolsError lists why each candidate was rejected.
    """
    view = _byte_view(buf, source)
    candidates = find_btf_candidates(view, source)
    if not candidates:
        raise SymbolsError(source, "no BTF header found")
    rejected: list[str] = []
    for offset in candidates[:max_candidates]:
        try:
            return parse_btf(view[offset:], f"{source}+0x{offset:x}", pointer_size=pointer_size)
        except SymbolsError as exc:
            where = "" if exc.offset is None else f" (at +0x{exc.offset:x})"
            rejected.append(f"0x{offset:x}: {exc.reason}{where}")
    skipped = len(candidates) - len(rejected)
    more = f"; {skipped} more not tried" if skipped else ""
    raise SymbolsError(
        source, f"no valid BTF among {len(candidates)} candidates: {'; '.join(rejected)}{more}"
    )
