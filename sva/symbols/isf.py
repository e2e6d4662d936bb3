"""Write a volatility3 symbol table (ISF JSON) for a Linux kernel from its BTF and kallsyms.

`build_isf(btf, symbols, banner)` turns the kernel's own type data and symbol list into
the Intermediate Symbol Format volatility3 loads, so a kernel nobody has made a table for
still gets one. What goes where:

- `base_types`: every BTF INT and FLOAT under its own name ("long unsigned int", "char",
  "_Bool"...), "pointer" (8 bytes), "void", and the short C spellings volatility's
  plugins also ask for ("unsigned long", "long", "unsigned short"...).
- `user_types`: every struct and union, members at byte offsets. Bitfields become
  `{"kind": "bitfield", "bit_position", "bit_length", "type"}` relative to the storage unit
  the member offset points at. Anonymous struct/union members are named
  `unnamed_field_<byte offset hex>` with `"anonymous": true` (dwarf2json's spelling; ISF
  6.2 readers flatten them). Anonymous types get the name of the typedef that names them
  (`kernel_cap_t` on 6.3+) or `unnamed_<kind>_<btf id>`; a name used by more than one
  type keeps it for the lowest BTF id and the others become `<name>__<btf id>`; a FWD
  with no definition becomes an empty struct. Typedefs and qualifiers are resolved away.
- `enums`: every ENUM/ENUM64, with a base type of the same size and signedness.
- `symbols`: every kallsyms symbol (first of duplicate static names wins). Addresses are
  link-time ones (`slide` subtracted) except absolute (per-CPU) values, so the table is
  the same whichever boot it was built from. Per-CPU variables get their type from BTF
  (the `.data..percpu` DATASEC), text symbols (t/T) `{"kind": "function"}` (so
  `object_from_symbol` works on them, as sockscan needs); for other globals BTF has no
  VARs, so `GLOBAL_TYPES` gives the C type of the ones
  volatility3's Linux plugins read (`init_task`, `modules`, `prb`, ...). Arrays sized by
  a `#define` (`sys_call_table`, `taint_flags`, ...) are sized from the data: the entries
  are read through `reader` and the array ends after the last valid entry below the next
  symbol (a hooked or zeroed entry in the middle does not shorten it). `linux_banner`
  carries `constant_data` (base64 of its bytes, NUL included), which volatility3 scans
  memory for to match the table to an image.
- `metadata`: format `FORMAT_VERSION`, producer `PRODUCER_NAME`, and `linux.symbols`
  naming where the symbols came from.

Format version: 6.2.0, the newest volatility3 2.28 reads (its `Version8Format`; a 6.3.0
file is refused by `_closest_version` although a 6.3.0 schema ships). The result is valid
against both schemas; tests check that with `jsonschema`.

Validation cost: with `jsonschema` installed, volatility3 validates a table on its first
load: ~45 s for a kernel table here (the schema's `oneOf` descriptors are checked branch
by branch), then it remembers the table's hash in `<CACHE_PATH>/valid_isf.hashcache`
(computing that hash still takes ~0.5 s per load). Tables from this writer are checked
against the schema by the tests (tests/symbols/test_isf.py, with jsonschema_rs in 0.2 s),
so at run time they need no validation. sva's loader should therefore construct the table
itself: `LinuxKernelIntermedSymbols(context, config_path, name, isf_url, validate=False)`
(or `IntermediateSymbolTable.create(..., validate=False)`), and build the Intel layer
from the `phys_base`/KASLR slide sva already knows; the test
`test_time_to_first_process_list` shows the whole sequence (~3 s from a never-seen
kernel's RAM to its task list). volatility3's automagic (and `vol` on the command line)
always validates unless the hash is already known: add
`volatility3.schemas.create_json_hash(table)` to `volatility3.schemas.cached_validations`
(in-process, as the tests do) or to the hashcache file, or run without jsonschema.

Producer and `linux.hidden_modules`: that plugin (and `Hidden_modules.find_hidden_modules`)
calls `symbol_space.verify_table_versions("dwarf2json", ...)`, whose result is True
unless some table *is* dwarf2json >= 0.8.0; so every table from any other producer
(ours, or none) makes it raise "Invalid symbol table ... dwarf2json". Calling ourselves
dwarf2json would be a lie in the metadata, so the producer is "sva-btf2isf". The
workaround for callers that want the hidden-module carving is to call the library
function it wraps directly, which does not check the producer:
`linux_utilities_modules.Modules.get_hidden_modules(context, vmlinux_module_name,
known_module_addresses, modules_memory_boundaries)` (see the plugin's
`find_hidden_modules` for how it gathers the two arguments). `linux.kmsg`'s dwarf2json
version check passes for other producers, so it needs nothing.

Hostile input: the BTF has been validated by `parse_btf`, but its shape is still
untrusted (pointer chains, FUNC types as members...): every recursion is bounded and
anything that cannot be expressed is a SymbolsError naming the BTF's source.
"""

from __future__ import annotations

import base64
import bisect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sva.errors import SymbolsError
from sva.symbols.btf import (
    Btf,
    BtfArray,
    BtfDatasec,
    BtfEnum,
    BtfFloat,
    BtfFwd,
    BtfInt,
    BtfKind,
    BtfModifier,
    BtfPtr,
    BtfStruct,
    BtfVar,
    IntEncoding,
)
from sva.symbols.kallsyms import KernelSymbol

FORMAT_VERSION = "6.2.0"
PRODUCER_NAME = "sva-btf2isf"
PRODUCER_VERSION = "1.0.0"  # bump when the output for the same input changes
POINTER_SIZE = 8
MAX_TYPE_DEPTH = 64  # nested pointer/array descriptors followed before giving up
MAX_ARRAY_ENTRIES = 4096  # entries read to size one data-sized array
MAX_BANNER = 512

Descriptor = dict[str, Any]
_FUNCTION: Descriptor = {"kind": "function"}

# Type names volatility3's Linux code asks for by their short C spelling, as aliases of
# the BTF (gcc) spellings: (kind, size, signed).
_ALIASES: dict[str, tuple[str, int, bool]] = {
    "unsigned long": ("int", 8, False),
    "long": ("int", 8, True),
    "unsigned long long": ("int", 8, False),
    "long long": ("int", 8, True),
    "unsigned int": ("int", 4, False),
    "int": ("int", 4, True),
    "unsigned short": ("int", 2, False),
    "short": ("int", 2, True),
    "unsigned char": ("char", 1, False),
    "signed char": ("char", 1, True),
    "char": ("char", 1, True),
    "bool": ("bool", 1, False),
}
# The same types as BTF (gcc) spells them, for GLOBAL_TYPES specs.
_GCC_SPELLING = {
    "unsigned long": "long unsigned int",
    "long": "long int",
    "unsigned long long": "long long unsigned int",
    "long long": "long long int",
    "unsigned short": "short unsigned int",
    "short": "short int",
}
_CHAR_NAMES = frozenset({"char", "signed char", "unsigned char"})

# x86-64 kernel code lives in the kernel image mapping or the module area; a code pointer
# anywhere else is not one (a user address, NULL, or data).
MODULES_VADDR = 0xFFFFFFFFA0000000  # lowest module address on any x86-64 layout
MODULES_END = 0xFFFFFFFFFF000000


class KernelReader(Protocol):
    """Reads kernel virtual memory (run-time addresses); None when it is not there."""

    def read(self, address: int, size: int) -> bytes | None: ...


# -- the C type of globals BTF does not type ----------------------------------------------
#
# Spec grammar: "struct NAME" | "union NAME" | "enum NAME" | "NAME" (a typedef or base
# type) | "anon{m1,m2}" (the anonymous struct with exactly these members), then any
# number of "*", then an optional "[N]" or "[]" (sized from the data, see ARRAY_SIZERS).
# A spec this kernel's BTF cannot resolve leaves the symbol untyped (older/newer kernels).
GLOBAL_TYPES: dict[str, str] = {
    # processes, memory, namespaces
    "init_task": "struct task_struct",
    "init_mm": "struct mm_struct",
    "init_files": "struct files_struct",
    "init_fs": "struct fs_struct",
    "init_cred": "struct cred",
    "init_nsproxy": "struct nsproxy",
    "init_pid_ns": "struct pid_namespace",
    "init_uts_ns": "struct uts_namespace",
    "init_ipc_ns": "struct ipc_namespace",
    "init_net": "struct net",
    "init_user_ns": "struct user_namespace",
    "pid_hash": "struct hlist_head *",
    "pidhash_shift": "unsigned int",
    "init_top_pgt": "pgd_t[512]",
    "init_level4_pgt": "pgd_t[512]",
    "mem_section": "struct mem_section **",
    "mem_map": "struct page *",
    "vmemmap_base": "unsigned long",
    "page_offset_base": "unsigned long",
    "vmalloc_base": "unsigned long",
    "max_pfn": "unsigned long",
    "iomem_resource": "struct resource",
    "ioport_resource": "struct resource",
    "phys_base": "unsigned long",
    # modules
    "modules": "struct list_head",
    "mod_tree": "struct mod_tree_root",
    "module_addr_min": "unsigned long",
    "module_addr_max": "unsigned long",
    "module_kset": "struct kset *",
    # system calls, interrupts, taint
    "sys_call_table": "sys_call_ptr_t[]",
    "ia32_sys_call_table": "sys_call_ptr_t[]",
    "x32_sys_call_table": "sys_call_ptr_t[]",
    "idt_table": "gate_desc[]",
    "taint_flags": "struct taint_flag[]",
    "tainted_mask": "unsigned long",
    "cap_last_cap": "int",
    # kernel log
    "prb": "struct printk_ringbuffer *",
    "printk_rb_static": "struct printk_ringbuffer",
    "printk_rb_dynamic": "struct printk_ringbuffer",
    "log_buf": "char *",
    "log_buf_len": "u32",
    "log_first_idx": "u32",
    "log_next_idx": "u32",
    # notifiers, ttys, networking, files
    "keyboard_notifier_list": "struct atomic_notifier_head",
    "tty_drivers": "struct list_head",
    "net_namespace_list": "struct list_head",
    "socket_file_ops": "struct file_operations",
    "sockfs_dentry_operations": "struct dentry_operations",
    "tcp4_seq_afinfo": "struct tcp_seq_afinfo",
    "tcp6_seq_afinfo": "struct tcp_seq_afinfo",
    "udp4_seq_afinfo": "struct udp_seq_afinfo",
    "udp6_seq_afinfo": "struct udp_seq_afinfo",
    "udplite4_seq_afinfo": "struct udp_seq_afinfo",
    "udplite6_seq_afinfo": "struct udp_seq_afinfo",
    "raw_seq_ops": "struct seq_operations",
    "udp_seq_ops": "struct seq_operations",
    "arp_seq_ops": "struct seq_operations",
    "unix_seq_ops": "struct seq_operations",
    "udp6_seq_ops": "struct seq_operations",
    "raw6_seq_ops": "struct seq_operations",
    "tcp4_seq_ops": "struct seq_operations",
    "tcp6_seq_ops": "struct seq_operations",
    "packet_seq_ops": "struct seq_operations",
    "num_registered_fb": "int",
    "registered_fb": "struct fb_info *[32]",  # FB_MAX
    # eBPF, tracing
    "prog_idr": "struct idr",
    "bpf_kallsyms": "struct list_head",
    "ftrace_ops_list": "struct ftrace_ops *",
    "ftrace_list_end": "struct ftrace_ops",
    "ftrace_mod_maps": "struct list_head",
    "ftrace_ops_trampoline_list": "struct ftrace_ops",
    "__start___tracepoints_ptrs": "tracepoint_ptr_t[0]",  # int under PREL32 relocations
    # time
    "tk_core": "anon{seq,timekeeper}",
    "timekeeper": "struct timekeeper",
    "wall_to_monotonic": "struct timespec64",
    "total_sleep_time": "struct timespec64",
    # strings
    "linux_banner": "char[]",
    "linux_proc_banner": "char[]",
}

# Linker-made markers: volatility3 only takes their address (object_from_symbol("_text")),
# which needs a type; C declares them `extern char NAME[]`.
SECTION_MARKERS = (
    "_text", "_stext", "_etext", "_sinittext", "_einittext", "_sdata", "_edata",
    "__start_rodata", "__end_rodata", "__bss_start", "__bss_stop", "_end",
    "__init_begin", "__init_end", "__start___ksymtab", "__stop___ksymtab",
    "__start___ksymtab_gpl", "__stop___ksymtab_gpl", "__per_cpu_start", "__per_cpu_end",
    "__start_BTF", "__stop_BTF",
)  # fmt: skip


def _code_pointer(text: tuple[int, int]) -> Callable[[bytes], bool]:
    lo, hi = text

    def valid(entry: bytes) -> bool:
        value = int.from_bytes(entry, "little")
        return lo <= value < hi or MODULES_VADDR <= value < MODULES_END

    return valid


def _gate(text: tuple[int, int]) -> Callable[[bytes], bool]:
    code = _code_pointer(text)

    def valid(entry: bytes) -> bool:
        # struct gate_struct: offset_low, segment, bits (type in bits 8-11, P bit 15),
        # offset_middle, offset_high, reserved. Present interrupt/trap gates only.
        bits = int.from_bytes(entry[4:6], "little")
        if not bits & 0x8000 or (bits >> 8) & 0xF not in (0xE, 0xF):
            return False
        target = entry[0:2] + entry[6:8] + entry[8:12]
        return code(target)

    return valid


def _taint_flag(text: tuple[int, int]) -> Callable[[bytes], bool]:
    def valid(entry: bytes) -> bool:
        # struct taint_flag { char c_true, c_false; bool module; }: 'P', 'G', true ...
        return 0x41 <= entry[0] <= 0x5A and entry[1] in b" -G" and entry[2] in (0, 1)

    return valid


@dataclass(frozen=True)
class ArraySizer:
    """How to count a `#define`-sized array's entries from the kernel's own data.

    `fallback` is used when the data cannot be validated (a `.bss` array read from an
    image, where every entry is still zero): the architectural or usual size, capped by
    the room before the next symbol.
    """

    validator: Callable[[tuple[int, int]], Callable[[bytes], bool]]
    max_entries: int
    fallback: int | None = None


ARRAY_SIZERS: dict[str, ArraySizer] = {
    "sys_call_table": ArraySizer(_code_pointer, 1024),
    "ia32_sys_call_table": ArraySizer(_code_pointer, 1024),
    "x32_sys_call_table": ArraySizer(_code_pointer, 1024),
    "idt_table": ArraySizer(_gate, 256, fallback=256),  # IDT_ENTRIES: fixed by the CPU
    "taint_flags": ArraySizer(_taint_flag, 64),
}


# -- BTF types to ISF types ----------------------------------------------------------------


class _TypeWriter:
    """Converts BTF types to ISF descriptors and definitions, memoised by type id."""

    def __init__(self, btf: Btf) -> None:
        self.btf = btf
        self.source = btf.source
        self.base_types: dict[str, dict[str, Any]] = {}
        self._desc: dict[int, Descriptor] = {}
        self._names: dict[int, str] = {}  # struct/union/enum/fwd id -> ISF name
        self._fwd_only: dict[str, str] = {}  # ISF name -> "struct"/"union" for bare FWDs
        # (bits, bit offset) of INTs narrower than their size: pre-kind_flag bitfields.
        self._narrow_ints: dict[int, tuple[int, int]] = {}
        self._ids: dict[BtfKind, list[int]] = {}
        # Names of the kinds GLOBAL_TYPES specs refer to (BTF's own index covers all 100k).
        self._by_name: dict[str, list[int]] = {}
        self._assign_names()

    def ids(self, *kinds: BtfKind) -> list[int]:
        """Type ids of these kinds, ascending (each kind listed once per writer)."""
        for kind in kinds:
            if kind not in self._ids:
                self._ids[kind] = self.btf.ids_of_kind(kind)
        return sorted(i for kind in kinds for i in self._ids[kind])

    def fail(self, type_id: int, message: str) -> SymbolsError:
        return SymbolsError(self.source, f"type {type_id}: {message}")

    # names ---------------------------------------------------------------------------
    def _assign_names(self) -> None:
        btf = self.btf
        aggregates = self.ids(BtfKind.STRUCT, BtfKind.UNION)
        enums = self.ids(BtfKind.ENUM, BtfKind.ENUM64)
        typedef_of: dict[int, str] = {}
        for tid in self.ids(BtfKind.TYPEDEF, BtfKind.INT, BtfKind.FLOAT, BtfKind.STRUCT,
                            BtfKind.UNION, BtfKind.ENUM, BtfKind.ENUM64):  # fmt: skip
            self._by_name.setdefault(btf.name(tid), []).append(tid)
        for tid in self.ids(BtfKind.TYPEDEF):
            target = btf.types[tid]
            assert isinstance(target, BtfModifier)
            if target.target and not btf.name(target.target):
                typedef_of.setdefault(target.target, btf.name(tid))
        for ids, kinds in ((aggregates, "user"), (enums, "enum")):
            taken: set[str] = set()
            named = [(i, btf.name(i)) for i in ids if btf.name(i)]
            for tid, name in named:
                if name in taken:
                    name = f"{name}__{tid}"
                    while name in taken:  # a real type may already be called that
                        name += "_"
                self._names[tid] = name
                taken.add(name)
            for tid in ids:
                if tid in self._names:
                    continue
                alias = typedef_of.get(tid)
                if alias and alias not in taken:
                    self._names[tid] = alias
                    taken.add(alias)
                else:
                    kind = btf.kind_of(tid).name.lower().replace("enum64", "enum")
                    self._names[tid] = f"unnamed_{kind}_{tid}"
            if kinds == "user":
                # A FWD names the full definition of the same name, if there is one.
                for tid in self.ids(BtfKind.FWD):
                    fwd = btf.types[tid]
                    assert isinstance(fwd, BtfFwd)
                    if fwd.name in taken:
                        self._names[tid] = fwd.name
                    else:
                        self._names[tid] = fwd.name or f"unnamed_fwd_{tid}"
                        self._fwd_only[self._names[tid]] = "union" if fwd.is_union else "struct"
                        taken.add(self._names[tid])

    def isf_name(self, type_id: int) -> str:
        return self._names[type_id]

    # base types --------------------------------------------------------------------------
    def _base(self, name: str, kind: str, size: int, signed: bool) -> Descriptor:
        entry = {"endian": "little", "kind": kind, "signed": signed, "size": size}
        old = self.base_types.setdefault(name, entry)
        if old != entry:
            raise SymbolsError(self.source, f"base type {name!r} defined twice, differently")
        return {"kind": "base", "name": name}

    def _int(self, t: BtfInt) -> Descriptor:
        name = t.name or f"int{t.size * 8}_{t.type_id}"
        if t.encoding & IntEncoding.BOOL:
            kind = "bool"
        elif t.encoding & IntEncoding.CHAR or name in _CHAR_NAMES:
            kind = "char"
        else:
            kind = "int"
        return self._base(name, kind, t.size, t.signed)

    # descriptors -------------------------------------------------------------------------
    def descriptor(self, type_id: int, depth: int = 0) -> Descriptor:
        """The ISF type descriptor for a BTF type (typedefs and qualifiers resolved)."""
        cached = self._desc.get(type_id)
        if cached is not None:
            return cached
        if depth > MAX_TYPE_DEPTH:
            raise self.fail(type_id, f"type nesting deeper than {MAX_TYPE_DEPTH}")
        t = self.btf.resolve(type_id)
        desc: Descriptor
        match t:
            case BtfInt():
                desc = self._int(t)
                if t.bits != 8 * t.size:
                    self._narrow_ints[type_id] = (t.bits, t.bit_offset)
            case BtfFloat():
                desc = self._base(t.name or f"float{t.size * 8}", "float", t.size, True)
            case BtfPtr():
                desc = {"kind": "pointer", "subtype": self.descriptor(t.target, depth + 1)}
            case BtfArray():
                desc = {
                    "count": t.nelems,
                    "kind": "array",
                    "subtype": self.descriptor(t.element_type, depth + 1),
                }
            case BtfStruct():
                desc = {"kind": t.kind.name.lower(), "name": self._names[t.type_id]}
            case BtfEnum():
                desc = {"kind": "enum", "name": self._names[t.type_id]}
            case BtfFwd():
                desc = {"kind": "union" if t.is_union else "struct", "name": self._names[t.type_id]}
            case _ if t.kind is BtfKind.FUNC_PROTO:
                desc = {"kind": "function"}
            case _ if t.kind is BtfKind.VOID:
                desc = self._base("void", "void", 0, False)
            case _:
                raise self.fail(type_id, f"a {t.kind.name} cannot be the type of data")
        self._desc[type_id] = desc
        return desc

    def _bitfield(self, owner: int, member_type: int, bit_offset: int, bits: int) -> tuple[int, Descriptor]:
        """(byte offset, descriptor) of a bitfield, relative to its storage unit."""
        base = self.descriptor(member_type)
        if base["kind"] not in ("base", "enum"):
            raise self.fail(owner, f"bitfield of non-integer type {member_type}")
        size = self.btf.size_of(member_type)
        if size <= 0 or size > 16:
            raise self.fail(owner, f"bitfield storage of {size} bytes")
        unit = (bit_offset // (8 * size)) * size  # naturally aligned storage unit
        position = bit_offset - 8 * unit
        if position + bits > 8 * size:
            # Packed structs can straddle units: read from the containing byte instead,
            # through a wide enough integer of the same signedness.
            unit, position = bit_offset // 8, bit_offset % 8
            if position + bits > 8 * size:
                signed = base["kind"] == "base" and self.base_types[base["name"]]["signed"]
                base = self._base("long long int" if signed else "long long unsigned int", "int", 8, signed)
        return unit, {"bit_length": bits, "bit_position": position, "kind": "bitfield", "type": base}

    def user_type(self, t: BtfStruct) -> dict[str, Any]:
        fields: dict[str, dict[str, Any]] = {}
        for m in t.members:
            bits = m.bitfield_size
            bit_offset = m.bit_offset
            desc = self.descriptor(m.type_id)
            if not bits and m.type_id in self._narrow_ints:  # old-style BTF bitfield
                bits, extra = self._narrow_ints[m.type_id]
                bit_offset += extra
            if bits:
                offset, desc = self._bitfield(t.type_id, m.type_id, bit_offset, bits)
            else:
                if m.bit_offset % 8:
                    raise self.fail(t.type_id, f"member {m.name!r} at bit {m.bit_offset} is not byte aligned")
                offset = m.bit_offset // 8
            entry: dict[str, Any] = {"offset": offset, "type": desc}
            name = m.name
            if not name:
                name = f"unnamed_field_{offset:x}"
                if desc["kind"] in ("struct", "union"):
                    entry["anonymous"] = True
            if name in fields:  # two anonymous members at one offset, or damaged BTF
                n = 1
                while f"{name}_{n}" in fields:
                    n += 1
                name = f"{name}_{n}"
            fields[name] = entry
        return {"fields": fields, "kind": t.kind.name.lower(), "size": t.size}

    def enum(self, t: BtfEnum) -> dict[str, Any]:
        signed = t.signed or any(v.value < 0 for v in t.values)
        return {
            "base": self._enum_base(t.size, signed),
            "constants": {v.name: v.value for v in t.values},
            "size": t.size,
        }

    def _enum_base(self, size: int, signed: bool) -> str:
        for kind in ("int", "char"):
            for name in sorted(self.base_types):
                b = self.base_types[name]
                if b["kind"] == kind and b["size"] == size and b["signed"] == signed:
                    return name
        name = f"{'' if signed else 'u'}int{size * 8}_enum"
        self._base(name, "int", size, signed)
        return name

    def all_types(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(user_types, enums) for every struct, union, FWD and enum in the BTF."""
        btf = self.btf
        # Base types first so enum bases pick among all of them, deterministically.
        for tid in self.ids(BtfKind.INT, BtfKind.FLOAT):
            self.descriptor(tid)
        self._base("void", "void", 0, False)
        self._base("pointer", "int", POINTER_SIZE, False)
        for name, (kind, size, signed) in _ALIASES.items():
            if name not in self.base_types:
                self._base(name, kind, size, signed)
        user: dict[str, Any] = {}
        for tid in self.ids(BtfKind.STRUCT, BtfKind.UNION):
            t = btf.types[tid]
            assert isinstance(t, BtfStruct)
            user[self._names[tid]] = self.user_type(t)
        for name, kind in self._fwd_only.items():
            user[name] = {"fields": {}, "kind": kind, "size": 0}
        enums: dict[str, Any] = {}
        for tid in self.ids(BtfKind.ENUM, BtfKind.ENUM64):
            t = btf.types[tid]
            assert isinstance(t, BtfEnum)
            enums[self._names[tid]] = self.enum(t)
        return dict(sorted(user.items())), dict(sorted(enums.items()))

    # global type specs ---------------------------------------------------------------------
    _SPEC = re.compile(r"^(struct |union |enum )?([A-Za-z_][\w ]*?|anon\{[\w,]+\})\s*(\**)\s*(\[\d*\])?$")

    def resolve_spec(self, spec: str) -> tuple[int, int, int | None] | None:
        """(BTF id, pointer depth, array count or -1 for "[]" or None) or None if absent."""
        m = self._SPEC.match(spec)
        if m is None:
            raise SymbolsError("sva.symbols.isf", f"bad type spec {spec!r}")
        tag, name, stars, array = m.groups()
        btf = self.btf
        tid: int | None = None
        if name.startswith("anon{"):
            want = name[5:-1].split(",")
            for cand in self.ids(BtfKind.STRUCT):
                t = btf.types[cand]
                if not t.name and isinstance(t, BtfStruct) and [x.name for x in t.members] == want:
                    tid = cand
                    break
        else:
            if tag:
                kinds = {"struct ": (BtfKind.STRUCT,), "union ": (BtfKind.UNION,),
                         "enum ": (BtfKind.ENUM, BtfKind.ENUM64)}[tag]  # fmt: skip
            else:
                name = _GCC_SPELLING.get(name, name)
                kinds = (BtfKind.TYPEDEF, BtfKind.INT, BtfKind.FLOAT)
            found = [i for i in self._by_name.get(name, ()) if btf.kind_of(i) in kinds]
            tid = found[0] if found else None
        if tid is None:
            return None
        count = None if array is None else (-1 if array == "[]" else int(array[1:-1]))
        return tid, len(stars), count

    def spec_descriptor(self, spec: str, count: int | None = None) -> Descriptor | None:
        """The descriptor for a GLOBAL_TYPES spec; `count` sizes a "[]" array."""
        resolved = self.resolve_spec(spec)
        if resolved is None:
            return None
        tid, stars, array = resolved
        desc = self.descriptor(tid)
        for _ in range(stars):
            desc = {"kind": "pointer", "subtype": desc}
        if array is not None:
            n = count if array < 0 else array
            if n is None:
                return None
            desc = {"count": n, "kind": "array", "subtype": desc}
        return desc

    def element_size(self, spec: str) -> int | None:
        resolved = self.resolve_spec(spec)
        if resolved is None:
            return None
        tid, stars, _ = resolved
        return POINTER_SIZE if stars else self.btf.size_of(tid)


# -- symbols ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtraSymbol:
    """A symbol kallsyms does not list (kallsyms' own arrays), at a run-time address."""

    name: str
    address: int
    spec: str | None = None


@dataclass
class IsfReport:
    """What `build_isf` could and could not do, for the caller to show."""

    typed_globals: list[str] = field(default_factory=list)
    untyped_globals: list[str] = field(default_factory=list)  # in kallsyms, type not in BTF
    array_sizes: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (n, how)


def _first_by_name(symbols: Iterable[KernelSymbol]) -> dict[str, KernelSymbol]:
    by_name: dict[str, KernelSymbol] = {}
    for sym in symbols:
        by_name.setdefault(sym.name, sym)
    return by_name


def _percpu_types(writer: _TypeWriter) -> dict[str, int]:
    """Per-CPU variable name -> BTF type id, from the .data..percpu DATASEC."""
    btf = writer.btf
    out: dict[str, int] = {}
    for tid in writer.ids(BtfKind.DATASEC):
        sec = btf.types[tid]
        assert isinstance(sec, BtfDatasec)
        if sec.name != ".data..percpu":
            continue
        for entry in sec.entries:
            var = btf.types[entry.type_id]
            if isinstance(var, BtfVar):
                out.setdefault(var.name, var.target)
    return out


def _size_array(
    name: str,
    address: int,
    element: int,
    next_address: int | None,
    reader: KernelReader | None,
    text: tuple[int, int] | None,
) -> tuple[int, str] | None:
    """(entries, how) for a data-sized array, or None when it cannot be sized."""
    sizer = ARRAY_SIZERS.get(name)
    if sizer is None or element <= 0:
        return None
    room = sizer.max_entries
    if next_address is not None and next_address > address:
        room = min(room, (next_address - address) // element)
    room = min(room, MAX_ARRAY_ENTRIES)
    data = reader.read(address, room * element) if reader is not None and room > 0 else None
    if data is not None and text is not None and len(data) == room * element:
        valid = sizer.validator(text)
        last = -1
        for i in range(room):
            if valid(data[i * element : (i + 1) * element]):
                last = i
        if last >= 0:
            return last + 1, "validated entries"
        if any(data):
            return None  # data there but nothing valid: not the table we expect
    if sizer.fallback is not None and room > 0:
        return min(sizer.fallback, room), "architectural size"
    return None


def _read_banner(reader: KernelReader | None, address: int) -> bytes | None:
    if reader is None:
        return None
    size = MAX_BANNER
    while size >= 64:  # shorter reads for a string near the end of a section
        data = reader.read(address, size)
        if data is not None:
            end = data.find(b"\0")
            return data[: end + 1] if end >= 0 else None
        size //= 2
    return None


def build_isf(
    btf: Btf,
    symbols: Iterable[KernelSymbol],
    banner: bytes | str,
    *,
    slide: int = 0,
    reader: KernelReader | None = None,
    extra_symbols: Iterable[ExtraSymbol] = (),
    sources: Iterable[Mapping[str, str]] = (),
    report: IsfReport | None = None,
    pointer_slide: int = 0,
) -> dict[str, Any]:
    """The ISF document (a JSON-ready dict) for a kernel.

    `symbols` are run-time addresses (kallsyms from RAM) or link-time ones (an image, with
    `slide` 0); `slide` is subtracted from every non-absolute address so the table holds
    link-time addresses. `reader` reads kernel memory at run-time addresses, to size
    data-sized arrays and read `linux_banner`; without it those stay untyped. `banner` is
    the kernel's `linux_banner` text (trailing newline and NUL optional). `sources` goes
    into `metadata.linux.symbols` (dicts with kind/name/hash_type/hash_value).
    `pointer_slide` is what pointers stored in memory are ahead of `symbols` by (link-time
    symbols over a running kernel's RAM), for validating array entries.
    """
    report = report if report is not None else IsfReport()
    writer = _TypeWriter(btf)
    user_types, enums = writer.all_types()
    by_name = _first_by_name(symbols)
    for extra in extra_symbols:
        by_name.setdefault(extra.name, KernelSymbol(extra.name, extra.address, "r", False))
    specs = dict(GLOBAL_TYPES)
    specs.update({e.name: e.spec for e in extra_symbols if e.spec})
    specs.update({name: "char[0]" for name in SECTION_MARKERS})

    relative = sorted(s.address for s in by_name.values() if not s.absolute)
    text = _text_range(by_name)
    if text is not None:
        text = (text[0] + pointer_slide, text[1] + pointer_slide)
    percpu = _percpu_types(writer)
    banner_bytes = _banner_bytes(banner)

    out_symbols: dict[str, dict[str, Any]] = {}
    for name in sorted(by_name):
        sym = by_name[name]
        entry: dict[str, Any] = {"address": sym.address if sym.absolute else sym.address - slide}
        desc: Descriptor | None = None
        if sym.absolute and name in percpu:
            desc = writer.descriptor(percpu[name])
        elif name in specs:
            desc = _global_descriptor(writer, name, specs[name], sym, relative, reader, text,
                                      banner_bytes, entry, report)  # fmt: skip
        elif sym.type in "tT":
            desc = _FUNCTION  # code; lets object_from_symbol() take a function's address
        if desc is not None:
            entry["type"] = desc
        out_symbols[name] = entry

    if "linux_banner" not in out_symbols:
        raise SymbolsError(btf.source, "the symbol list has no linux_banner")
    source_list = [dict(s) for s in sources]
    metadata: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "producer": {"name": PRODUCER_NAME, "version": PRODUCER_VERSION},
        "linux": {"symbols": source_list} if source_list else {},
    }
    return {
        "base_types": dict(sorted(writer.base_types.items())),
        "enums": enums,
        "metadata": metadata,
        "symbols": out_symbols,
        "user_types": user_types,
    }


def _banner_bytes(banner: bytes | str) -> bytes:
    raw = banner.encode("utf-8", "surrogateescape") if isinstance(banner, str) else bytes(banner)
    raw = raw.rstrip(b"\0")
    if not raw.startswith(b"Linux version ") or len(raw) > MAX_BANNER:
        raise SymbolsError("linux_banner", f"not a Linux banner: {raw[:60]!r}")
    if not raw.endswith(b"\n"):
        raw += b"\n"
    return raw + b"\0"


def _text_range(by_name: Mapping[str, KernelSymbol]) -> tuple[int, int] | None:
    lo = by_name.get("_stext") or by_name.get("_text")
    hi = by_name.get("_etext")
    if lo is None or hi is None or hi.address <= lo.address:
        return None
    return lo.address, hi.address


def _global_descriptor(
    writer: _TypeWriter,
    name: str,
    spec: str,
    sym: KernelSymbol,
    relative: list[int],
    reader: KernelReader | None,
    text: tuple[int, int] | None,
    banner: bytes,
    entry: dict[str, Any],
    report: IsfReport,
) -> Descriptor | None:
    count: int | None = None
    if name == "linux_banner":
        # The banner as the kernel holds it; the caller's text (found independently) must
        # agree, else the symbol list and the banner belong to different kernels.
        held = _read_banner(reader, sym.address)
        if held is not None and held != banner:
            raise SymbolsError(
                "linux_banner",
                f"memory at linux_banner holds {held[:80]!r}, expected {banner[:80]!r}",
            )
        entry["constant_data"] = base64.b64encode(banner).decode("ascii")
        count = len(banner)
    elif name == "linux_proc_banner":
        held = _read_banner(reader, sym.address)
        count = len(held) if held is not None else None
    elif spec.endswith("[]"):
        element = writer.element_size(spec)
        if element is not None:
            i = bisect.bisect_right(relative, sym.address)
            nxt = relative[i] if i < len(relative) else None
            sized = _size_array(name, sym.address, element, nxt, reader, text)
            if sized is not None:
                count = sized[0]
                report.array_sizes[name] = sized
    desc = writer.spec_descriptor(spec, count)
    (report.typed_globals if desc is not None else report.untyped_globals).append(name)
    return desc
