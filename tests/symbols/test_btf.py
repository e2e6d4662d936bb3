"""BTF parsing: a real Debian kernel's BTF, the host's, every kind built by hand, and
damaged or hostile blobs (which must only ever give SymbolsError)."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sva.errors import SymbolsError
from sva.symbols.btf import (
    MAX_CHAIN,
    BtfArray,
    BtfDatasec,
    BtfDeclTag,
    BtfEnum,
    BtfEnumValue,
    BtfFloat,
    BtfFunc,
    BtfFuncProto,
    BtfFwd,
    BtfInt,
    BtfKind,
    BtfLinkage,
    BtfMember,
    BtfModifier,
    BtfParam,
    BtfPtr,
    BtfStruct,
    BtfVar,
    BtfVarSecinfo,
    BtfVoid,
    IntEncoding,
    find_btf_candidates,
    parse_btf,
    parse_first_valid,
)

from .conftest import BtfBuilder, ParsedBtf, sample_builder

HOST_BTF = Path("/sys/kernel/btf/vmlinux")


def sample_blob(endian: str = "<") -> bytes:
    return sample_builder(endian)[0].build()


# --- the real kernel -------------------------------------------------------------------


def test_debian_btf_parses_quickly(debian_btf: ParsedBtf) -> None:
    btf = debian_btf.btf
    print(f"\nDebian kernel BTF: {btf.type_count} types, {len(debian_btf.blob)} bytes, "
          f"parsed in {debian_btf.seconds:.3f} s")  # fmt: skip
    assert btf.type_count > 50_000
    assert btf.byte_order == "little"
    assert btf.sha256 == hashlib.sha256(debian_btf.blob).hexdigest()
    assert btf.size == len(debian_btf.blob)
    # ~0.1-0.3 s on a developer machine; generous so a slow CI machine does not flake.
    assert debian_btf.seconds < 5


def test_debian_task_struct(debian_btf: ParsedBtf) -> None:
    btf = debian_btf.btf
    task = btf.find("task_struct", BtfKind.STRUCT)
    assert isinstance(task, BtfStruct)
    assert task.size > 1000
    assert btf.size_of(task.type_id) == task.size
    for name in ("pid", "tgid", "comm", "tasks", "mm"):
        assert task.member(name) is not None, name

    pid = task.member("pid")
    assert pid is not None
    pid_int = btf.resolve(pid.type_id)
    assert isinstance(pid_int, BtfInt) and pid_int.size == 4 and pid_int.signed
    assert btf.name(pid.type_id) == "pid_t"

    comm = task.member("comm")
    assert comm is not None and comm.bit_offset % 8 == 0
    comm_type = btf.resolve(comm.type_id)
    assert isinstance(comm_type, BtfArray) and comm_type.nelems == 16
    element = btf.resolve(comm_type.element_type)
    assert isinstance(element, BtfInt) and element.name == "char" and element.size == 1
    assert btf.size_of(comm.type_id) == 16

    tasks = task.member("tasks")
    assert tasks is not None
    list_head = btf.resolve(tasks.type_id)
    assert isinstance(list_head, BtfStruct) and list_head.name == "list_head"

    mm = task.member("mm")
    assert mm is not None
    mm_ptr = btf.resolve(mm.type_id)
    assert isinstance(mm_ptr, BtfPtr) and btf.size_of(mm.type_id) == 8
    assert btf.resolve(mm_ptr.target).name == "mm_struct"


def test_debian_list_head(debian_btf: ParsedBtf) -> None:
    btf = debian_btf.btf
    list_head = btf.find("list_head", BtfKind.STRUCT)
    assert isinstance(list_head, BtfStruct)
    assert list_head.size == 16 and btf.size_of(list_head.type_id) == 16
    assert [(m.name, m.byte_offset) for m in list_head.members] == [("next", 0), ("prev", 8)]
    for member in list_head.members:
        ptr = btf.types[member.type_id]
        assert isinstance(ptr, BtfPtr) and ptr.target == list_head.type_id


def test_debian_bitfields_enums_and_functions(debian_btf: ParsedBtf) -> None:
    btf = debian_btf.btf
    bitfields = [
        (t.name, m)
        for t in map(btf.types.__getitem__, btf.ids_of_kind(BtfKind.STRUCT)[:3000])
        if isinstance(t, BtfStruct) and t.kind_flag
        for m in t.members
        if m.bitfield_size
    ]
    assert bitfields, "no kind_flag bitfield members in the first 3000 structs"
    for _, member in bitfields:
        assert 0 < member.bitfield_size <= 64

    enum = btf.find("pid_type", BtfKind.ENUM)
    assert isinstance(enum, BtfEnum)
    assert {v.name: v.value for v in enum.values}["PIDTYPE_PID"] == 0

    enum64_ids = btf.ids_of_kind(BtfKind.ENUM64)
    for type_id in enum64_ids:
        enum64 = btf.types[type_id]
        assert isinstance(enum64, BtfEnum) and enum64.size == 8 and enum64.values
    if enum64_ids:
        values = [v.value for i in enum64_ids for v in btf.types[i].values]  # type: ignore[attr-defined]
        assert any(not -(1 << 31) <= v < 1 << 32 for v in values)

    func = btf.find("schedule", BtfKind.FUNC)
    assert isinstance(func, BtfFunc)  # pahole marks vmlinux functions static, so no linkage check
    assert isinstance(btf.types[func.proto], BtfFuncProto)


def test_debian_percpu_datasec(debian_btf: ParsedBtf) -> None:
    btf = debian_btf.btf
    percpu = btf.find(".data..percpu", BtfKind.DATASEC)
    assert isinstance(percpu, BtfDatasec)
    assert len(percpu.entries) > 50
    names = set()
    for entry in percpu.entries:
        var = btf.types[entry.type_id]
        assert isinstance(var, BtfVar)
        assert btf.size_of(var.type_id) == entry.size
        assert entry.offset + entry.size <= percpu.size
        names.add(var.name)
    assert "runqueues" in names


def test_debian_find_all_names(debian_btf: ParsedBtf) -> None:
    btf = debian_btf.btf
    kinds = {t.kind for t in btf.find_all("task_struct")}
    assert BtfKind.STRUCT in kinds
    assert btf.find("no_such_type_anywhere") is None


def test_btf_found_in_vmlinux_memory(debian_kernel, debian_btf: ParsedBtf) -> None:  # type: ignore[no-untyped-def]
    # As if scanning guest RAM: the kernel image holds the only copy.
    image = memoryview(debian_kernel.vmlinux)
    offset = debian_kernel.section(".BTF").offset
    assert offset in find_btf_candidates(image, "vmlinux")
    btf = parse_first_valid(image, "vmlinux")
    assert btf.sha256 == debian_btf.btf.sha256
    assert btf.source == f"vmlinux+0x{offset:x}"


def test_damaged_copy_in_memory_is_skipped(debian_btf: ParsedBtf) -> None:
    blob = debian_btf.blob
    damaged = bytearray(blob)
    damaged[len(blob) // 3 : len(blob) // 3 + 64] = b"\xff" * 64  # inside the type section
    memory = bytes(100) + bytes(damaged) + bytes(4096) + blob + bytes(100)
    btf = parse_first_valid(memory, "ram")
    assert btf.sha256 == debian_btf.btf.sha256
    assert btf.source == f"ram+0x{100 + len(blob) + 4096:x}"


def test_debian_btf_truncated_anywhere(debian_btf: ParsedBtf) -> None:
    blob = debian_btf.blob
    rng = random.Random(1)
    for cut in [0, 1, 23, 24, 25, len(blob) - 1] + rng.sample(range(24, len(blob)), 20):
        with pytest.raises(SymbolsError, match="truncated|shorter"):
            parse_btf(blob[:cut], "cut")


def test_debian_btf_big_endian_copy(debian_btf: ParsedBtf) -> None:
    """Byte-swap every u32 of the real blob (all fields are u32 but the header's first 4
    bytes): a big-endian kernel's BTF must give the same types."""
    blob = debian_btf.blob
    magic_etc = struct.pack(">HBB", 0xEB9F, 1, 0)
    swapped = bytearray(magic_etc)
    words = struct.unpack_from("<5I", blob, 4)
    swapped += struct.pack(">5I", *words)
    hdr_len, type_off, type_len = words[0], words[1], words[2]
    type_start = hdr_len + type_off
    body = bytearray(blob[24:])
    types = struct.unpack_from(f"<{type_len // 4}I", blob, type_start)
    struct.pack_into(f">{type_len // 4}I", body, type_start - 24, *types)
    btf = parse_btf(bytes(swapped + body), "swapped")
    assert btf.byte_order == "big" and btf.type_count == debian_btf.btf.type_count
    task = btf.find("task_struct", BtfKind.STRUCT)
    assert task == debian_btf.btf.find("task_struct", BtfKind.STRUCT)


@pytest.mark.skipif(not HOST_BTF.exists(), reason="this host has no /sys/kernel/btf/vmlinux")
def test_host_kernel_btf() -> None:
    data = HOST_BTF.read_bytes()
    start = time.perf_counter()
    btf = parse_btf(data, str(HOST_BTF))
    print(f"\nhost BTF: {btf.type_count} types in {time.perf_counter() - start:.3f} s")
    task = btf.find("task_struct", BtfKind.STRUCT)
    assert isinstance(task, BtfStruct) and task.member("comm") is not None
    assert btf.size_of(btf.find("list_head", BtfKind.STRUCT).type_id) == 16  # type: ignore[union-attr]


# --- every kind, built by hand ---------------------------------------------------------


@pytest.mark.parametrize("endian", ["<", ">"])
def test_every_kind(endian: str) -> None:
    builder, ids = sample_builder(endian)
    btf = parse_btf(builder.build(), "sample")
    assert btf.byte_order == ("little" if endian == "<" else "big")
    assert btf.type_count == len(builder.records)
    t = btf.types

    assert t[0] == BtfVoid(0, BtfKind.VOID, "void", False)
    assert t[ids.char] == BtfInt(
        ids.char, BtfKind.INT, "char", False, 1, IntEncoding.SIGNED | IntEncoding.CHAR, 0, 8
    )
    assert t[ids.u64] == BtfInt(
        ids.u64, BtfKind.INT, "long long unsigned int", False, 8, IntEncoding.NONE, 0, 64
    )
    assert t[ids.list_ptr] == BtfPtr(ids.list_ptr, BtfKind.PTR, "", False, ids.list_head)
    assert t[ids.comm] == BtfArray(ids.comm, BtfKind.ARRAY, "", False, ids.char, ids.int_, 16)
    assert t[ids.list_head] == BtfStruct(
        ids.list_head,
        BtfKind.STRUCT,
        "list_head",
        False,
        16,
        (BtfMember("next", ids.list_ptr, 0, 0), BtfMember("prev", ids.list_ptr, 64, 0)),
    )

    task = t[ids.task]
    assert isinstance(task, BtfStruct) and task.kind_flag and not task.is_union
    assert task.member("on_cpu") == BtfMember("on_cpu", ids.u64, 320, 1)
    assert task.member("flag_bits") == BtfMember("flag_bits", ids.u64, 321, 7)
    assert task.member("comm") == BtfMember("comm", ids.comm, 192, 0)
    assert task.member("nope") is None

    union = t[ids.flags_union]
    assert isinstance(union, BtfStruct) and union.is_union and union.kind is BtfKind.UNION
    assert union.members[1].bitfield_size == 3

    assert t[ids.state_enum] == BtfEnum(
        ids.state_enum, BtfKind.ENUM, "state", True, 4, True,
        (BtfEnumValue("RUNNING", 0), BtfEnumValue("DEAD", -1)),
    )  # fmt: skip
    big = t[ids.big_enum]
    assert isinstance(big, BtfEnum) and big.kind is BtfKind.ENUM64 and not big.signed
    assert [(v.name, v.value) for v in big.values] == [("HUGE", 1 << 40), ("NEG", (1 << 64) - 2)]

    assert t[ids.fwd] == BtfFwd(ids.fwd, BtfKind.FWD, "mm_struct", False, False)
    assert t[ids.typedef] == BtfModifier(ids.typedef, BtfKind.TYPEDEF, "pid_t", False, ids.int_)
    assert t[ids.const] == BtfModifier(ids.const, BtfKind.CONST, "", False, ids.typedef)
    assert t[ids.volatile].kind is BtfKind.VOLATILE
    assert t[ids.restrict].kind is BtfKind.RESTRICT
    assert t[ids.type_tag] == BtfModifier(
        ids.type_tag, BtfKind.TYPE_TAG, "user", False, ids.list_ptr
    )

    proto = t[ids.proto]
    assert isinstance(proto, BtfFuncProto) and proto.return_type == ids.int_
    assert proto.params[0].name == "task" and proto.params[1] == BtfParam("", 0)
    assert proto.variadic
    assert t[ids.func] == BtfFunc(
        ids.func, BtfKind.FUNC, "do_exit", False, ids.proto, BtfLinkage.GLOBAL
    )
    var = t[ids.var]
    assert (
        isinstance(var, BtfVar) and var.name == "current_task" and var.linkage is BtfLinkage.GLOBAL
    )
    assert t[ids.datasec] == BtfDatasec(
        ids.datasec, BtfKind.DATASEC, ".data..percpu", False, 64, (BtfVarSecinfo(ids.var, 8, 8),)
    )
    assert t[ids.float_] == BtfFloat(ids.float_, BtfKind.FLOAT, "double", False, 8)
    assert t[ids.decl_tag] == BtfDeclTag(
        ids.decl_tag, BtfKind.DECL_TAG, "kfunc", False, ids.func, -1
    )
    assert t[ids.member_tag] == BtfDeclTag(
        ids.member_tag, BtfKind.DECL_TAG, "rcu", False, ids.task, 6
    )

    assert len(t) == btf.type_count + 1
    assert [x.type_id for x in t] == list(range(len(t)))


def test_both_byte_orders_agree() -> None:
    little = parse_btf(sample_blob("<"), "le")
    big = parse_btf(sample_blob(">"), "be")
    assert list(little.types) == list(big.types)
    assert little.sha256 != big.sha256


def test_lookup_resolve_and_sizes() -> None:
    _, ids = sample_builder()
    btf = parse_btf(sample_blob(), "sample")
    assert (
        btf.name(0) == "void"
        and btf.name(ids.list_ptr) == ""
        and btf.name(ids.task) == "task_struct"
    )
    assert btf.find("task_struct") == btf.types[ids.task]
    assert btf.find("task_struct", BtfKind.UNION) is None
    assert btf.find("pid_t", BtfKind.TYPEDEF).type_id == ids.typedef  # type: ignore[union-attr]
    assert [x.type_id for x in btf.find_all("state")] == [ids.state_enum]
    assert btf.ids_of_kind(BtfKind.ARRAY) == [ids.comm, ids.matrix]
    assert btf.kind_of(ids.var) is BtfKind.VAR

    assert btf.resolve(ids.volatile) == btf.types[ids.int_]  # volatile -> const -> typedef -> int
    assert btf.resolve(ids.type_tag).type_id == ids.list_ptr
    assert btf.resolve(ids.task).type_id == ids.task
    assert btf.resolve(0).kind is BtfKind.VOID

    assert btf.size_of(ids.volatile) == 4
    assert btf.size_of(ids.list_ptr) == 8
    assert btf.size_of(ids.comm) == 16
    assert btf.size_of(ids.matrix) == 48
    assert btf.size_of(ids.var) == 8
    assert btf.size_of(ids.state_enum) == 4 and btf.size_of(ids.big_enum) == 8
    assert btf.size_of(ids.datasec) == 64 and btf.size_of(ids.float_) == 8
    assert btf.size_of(ids.flags_union) == 4
    assert parse_btf(sample_blob(), "32-bit", pointer_size=4).size_of(ids.list_ptr) == 4
    for no_size in (0, ids.fwd, ids.func, ids.proto, ids.decl_tag):
        with pytest.raises(SymbolsError, match="has no size"):
            btf.size_of(no_size)


@pytest.mark.parametrize("bad_id", [-1, 10_000, 1 << 40, "3", None])
def test_out_of_range_ids(bad_id: Any) -> None:
    btf = parse_btf(sample_blob(), "sample")
    for call in (btf.types.__getitem__, btf.name, btf.resolve, btf.size_of, btf.kind_of):
        with pytest.raises(SymbolsError, match="out of range"):
            call(bad_id)


def test_trailing_bytes_are_not_part_of_the_blob() -> None:
    blob = sample_blob()
    btf = parse_btf(blob + b"\xaa" * 100, "padded")
    assert btf.size == len(blob)
    assert btf.sha256 == hashlib.sha256(blob).hexdigest()


def test_header_padding_and_section_order() -> None:
    builder, _ = sample_builder()
    padded = parse_btf(builder.build(hdr_len=32), "hdr32")
    assert padded.type_count == len(builder.records)
    # Strings first, types after: allowed, only offsets matter.
    strings = len(builder.strings)
    swapped = builder.build(str_off=0, type_off=(strings + 3) // 4 * 4)
    assert list(parse_btf(swapped, "swapped").types) == list(parse_btf(builder.build(), "x").types)


# --- damaged and hostile blobs ---------------------------------------------------------


def test_truncated_at_every_point() -> None:
    blob = sample_blob()
    for cut in range(len(blob)):
        with pytest.raises(SymbolsError):
            parse_btf(blob[:cut], "cut")


def header_with(blob: bytes, **fields: int) -> bytes:
    names = ["magic", "version", "flags", "hdr_len", "type_off", "type_len", "str_off", "str_len"]
    values = dict(zip(names, struct.unpack_from("<HBBIIIII", blob), strict=True))
    values.update(fields)
    return struct.pack("<HBBIIIII", *values.values()) + blob[24:]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"magic": 0x1234}, "bad magic"),
        ({"version": 2}, "version 2"),
        ({"flags": 1}, "flags"),
        ({"hdr_len": 23}, "hdr_len 23"),
        ({"hdr_len": 4096}, "hdr_len 4096"),
        ({"hdr_len": 0xFFFFFFFF}, "hdr_len"),
        ({"type_len": 0xFFFFFFF0}, "limit"),
        ({"str_len": 1 << 20}, "truncated"),
        ({"type_len": 6}, "aligned"),
        ({"type_off": 2}, "aligned"),
        ({"str_len": 0}, "str_len 0"),
        ({"str_len": 0xFFFFFFFF}, "limit|str_len"),
        ({"str_off": 0xFFFFFFF0}, "limit"),
        ({"str_off": 4}, "overlap"),
    ],
)
def test_bad_headers(fields: dict[str, int], message: str) -> None:
    with pytest.raises(SymbolsError, match=message) as info:
        parse_btf(header_with(sample_blob(), **fields), "hdr")
    assert str(info.value).startswith("hdr")


def test_non_zero_header_extension_is_refused() -> None:
    blob = bytearray(sample_builder()[0].build(hdr_len=32))
    blob[30] = 1
    with pytest.raises(SymbolsError, match="non-zero header"):
        parse_btf(bytes(blob), "hdr")


def test_string_section_must_be_nul_delimited() -> None:
    builder, _ = sample_builder()
    blob = bytearray(builder.build())
    blob[-1] = ord("x")
    with pytest.raises(SymbolsError, match="NUL"):
        parse_btf(bytes(blob), "str")
    blob = bytearray(builder.build())
    _, _, _, hdr_len, _, _, str_off, _ = struct.unpack_from("<HBBIIIII", blob)
    blob[hdr_len + str_off] = ord("x")
    with pytest.raises(SymbolsError, match="NUL"):
        parse_btf(bytes(blob), "str")


def small(build) -> bytes:  # type: ignore[no-untyped-def]
    b = BtfBuilder()
    b.int_("int", 4, encoding=1)
    build(b)
    return b.build()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda b: b.ptr(99), "type 2: refers to type id 99, beyond the last type 2"),
        (lambda b: b.struct("s", 8, [("a", 1, 0), ("b", 77, 32)]), "refers to type id 77"),
        (lambda b: b.array(1, 55, 4), "refers to type id 55"),
        (lambda b: b.func_proto(1, [("x", 1 << 31)]), "refers to type id"),
        (lambda b: b.datasec(".data", 8, [(9, 0, 4)]), "refers to type id 9"),
        (lambda b: b.raw(BtfKind.PTR, 5000, 0, 1), "name offset 0x1388 beyond the string"),
        (
            lambda b: (
                b.struct("s", 4, [(0, 1, 0)]) and b.raw(BtfKind.STRUCT, "t", 1, 4, [900, 1, 0])
            ),
            "type 3: name offset 0x384",
        ),
        (lambda b: b.raw(BtfKind.STRUCT, "s", 0xFFFF, 8, [0, 1, 0]), "vlen 65535 runs past"),
        (lambda b: b.raw(BtfKind.FUNC_PROTO, "", 3, 1, [0, 1]), "runs past the end"),
        (lambda b: b.raw(20, "x", 0, 0), "unknown kind 20"),
        (lambda b: b.raw(0, "x", 0, 0), "unknown kind 0"),
        (lambda b: b.raw(BtfKind.PTR, "", 0, 1) and b.records.append(b"\0" * 8), "record header"),
        (lambda b: b.raw(BtfKind.PTR, "", 1 << 16, 1), "reserved bits"),
        (lambda b: b.raw(BtfKind.TYPEDEF, "t", 2, 1), "non-zero vlen"),
        (lambda b: b.raw(BtfKind.INT, "i", 0, 4, [64]), "bad INT"),
        (lambda b: b.raw(BtfKind.INT, "i", 0, 3, [8]), "bad INT"),
        (lambda b: b.raw(BtfKind.INT, "i", 0, 4, [0x08000020]), "encoding word"),
        (lambda b: b.raw(BtfKind.FLOAT, "f", 0, 5), "FLOAT size 5"),
        (lambda b: b.raw(BtfKind.ENUM, "e", 0, 3), "size 3"),
        (lambda b: b.raw(BtfKind.FUNC, "f", 3, 1), "FUNC linkage 3"),
        (lambda b: b.func("f", 1), "does not refer to a FUNC_PROTO"),
        (lambda b: b.var("v", 1, 7), "VAR linkage 7"),
        (lambda b: b.datasec(".data", 8, [(1, 0, 4)]), "not a VAR"),
        (lambda b: b.raw(BtfKind.DECL_TAG, "t", 0, 1, [0xFFFFFFFE]), "component_idx -2"),
        (lambda b: b.raw(BtfKind.DECL_TAG, "t", 0, 1, [0]), "component 0 on a INT"),
        (
            lambda b: b.struct("s", 4, [("a", 1, 0)]) and b.raw(BtfKind.DECL_TAG, "t", 0, 2, [1]),
            "component 1 beyond 1",
        ),
        (
            lambda b: b.struct("s", 4, [("a", 1, 32)]) and b.struct("t", 4, [("a", 1, 33)]),
            "type 3: member ends at bit 33",
        ),
        (lambda b: b.struct("s", 4, [("a", 1, 30, 4)]), "member ends at bit 34"),
    ],
)
def test_bad_types(build, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SymbolsError, match=message.replace("(", r"\(")) as info:
        parse_btf(small(build), "bad.btf")
    assert info.value.source == "bad.btf" and info.value.offset is not None


def test_typedef_cycle_is_caught_by_resolve_and_size_of() -> None:
    b = BtfBuilder()
    b.int_("int", 4)
    a = b.ref(BtfKind.TYPEDEF, 3, "A")  # A -> B
    b.ref(BtfKind.TYPEDEF, a, "B")  # B -> A
    self_array = b.array(4, 1, 2)  # an array of itself
    btf = parse_btf(b.build(), "cycle")
    start = time.perf_counter()
    for call in (btf.resolve, btf.size_of):
        with pytest.raises(SymbolsError, match=r"type 2: cycle through types 2 -> 3 -> 2"):
            call(a)
    with pytest.raises(SymbolsError, match="cycle"):
        btf.size_of(self_array)
    assert time.perf_counter() - start < 0.1


def test_overlong_qualifier_chain() -> None:
    b = BtfBuilder()
    previous = b.int_("int", 4)
    for _ in range(MAX_CHAIN + 5):
        previous = b.ref(BtfKind.CONST, previous)
    btf = parse_btf(b.build(), "chain")
    with pytest.raises(SymbolsError, match="chain longer"):
        btf.resolve(previous)
    assert btf.resolve(previous - 5).kind is BtfKind.INT  # exactly MAX_CHAIN is fine


def test_random_bytes_only_give_symbols_errors() -> None:
    rng = random.Random(7)
    for size in list(range(0, 64)) + [rng.randrange(64, 4096) for _ in range(200)]:
        data = bytes(rng.getrandbits(8) for _ in range(size))
        # A valid header around garbage types exercises the type walk too.
        type_len = size // 4 * 4
        wrapped = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, type_len, type_len, 5)
        for blob in (data, wrapped + data[:type_len] + b"\0abc\0"):
            try:
                parse_btf(blob, "random")
            except SymbolsError:
                pass


def exercise(btf) -> None:  # type: ignore[no-untyped-def]
    """Touch everything a parsed blob offers; only SymbolsError may come out."""
    for t in btf.types:
        btf.name(t.type_id)
        for call in (btf.resolve, btf.size_of):
            try:
                call(t.type_id)
            except SymbolsError:
                pass
        btf.find_all(t.name)


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    endian=st.sampled_from(["<", ">"]),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=12),
    words=st.lists(st.tuples(st.integers(0, 1 << 14), st.integers(0, (1 << 32) - 1)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 1 << 16)),
)
def test_fuzz_mutated_blob(
    endian: str, edits: list[tuple[int, int]], words: list[tuple[int, int]], cut: int | None
) -> None:
    blob = bytearray(sample_blob(endian))
    for at, value in edits:
        blob[at % len(blob)] = value
    for at, value in words:  # whole u32s: ids, offsets, counts, info words
        at = (at % (len(blob) // 4)) * 4
        blob[at : at + 4] = value.to_bytes(4, "little" if endian == "<" else "big")
    if cut is not None:
        del blob[cut % (len(blob) + 1) :]
    try:
        btf = parse_btf(bytes(blob), "fuzz")
    except SymbolsError:
        pass
    else:
        exercise(btf)
    try:
        parse_first_valid(bytes(8) + bytes(blob), "fuzz-ram")
    except SymbolsError:
        pass


def test_candidates_and_rejection_reasons() -> None:
    blob = sample_blob()
    lone_magic = b"\x9f\xeb\x01\x00" + b"\xff" * 30  # hdr_len 0xffffffff: not a candidate
    assert find_btf_candidates(lone_magic + blob, "ram") == [len(lone_magic)]
    assert find_btf_candidates(b"nothing here", "ram") == []
    with pytest.raises(SymbolsError, match="ram: no BTF header found"):
        parse_first_valid(b"\0" * 1000, "ram")

    broken = bytearray(blob)
    broken[24 + 6] = 0x7F  # bits 16-23 of the first type's info: reserved
    memory = bytes(broken) + bytes(16) + bytes(broken)
    with pytest.raises(SymbolsError, match="no valid BTF among 2 candidates") as info:
        parse_first_valid(memory, "ram")
    assert str(info.value).count("reserved bits") == 2
    assert f"0x{len(blob) + 16:x}: type 1" in str(info.value)

    memory = bytes(broken) + bytes(3) + blob
    btf = parse_first_valid(memoryview(memory), "ram")
    assert btf.source == f"ram+0x{len(blob) + 3:x}"

    many = bytes(broken) * 5
    with pytest.raises(SymbolsError, match="3 more not tried"):
        parse_first_valid(many, "ram", max_candidates=2)


def test_unusual_buffers() -> None:
    blob = sample_blob()
    assert parse_btf(bytearray(blob), "ba").type_count > 0
    assert parse_btf(memoryview(blob), "mv").type_count > 0
    words = memoryview(bytearray(blob + bytes(-len(blob) % 4))).cast("I")
    assert parse_btf(words, "words").type_count > 0
    assert find_btf_candidates(words, "words") == [0]
    with pytest.raises(SymbolsError):
        parse_btf(memoryview(blob)[::2], "strided")
    with pytest.raises(SymbolsError):
        find_btf_candidates(memoryview(blob)[::2], "strided")


@pytest.mark.skipif(os.environ.get("SVA_BTF_BENCH") is None, reason="set SVA_BTF_BENCH=1")
def test_parse_benchmark(debian_btf: ParsedBtf) -> None:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        parse_btf(debian_btf.blob, "bench")
        times.append(time.perf_counter() - start)
    print(f"\nparse: best {min(times):.3f} s of 5")
