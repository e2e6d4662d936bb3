"""ftrace as a hooking mechanism: which system call handlers ftrace diverts, and to whom.

Kernel rootkits rarely touch the syscall table any more: they register an `ftrace_ops`
whose callback rewrites the saved instruction pointer (FTRACE_OPS_FL_IPMODIFY), filtered
on the handlers they want (`__x64_sys_kill`, `__x64_sys_getdents64`, …). The kernel then
patches the 5-byte `call __fentry__` site at the start of each such handler (a NOP when
nothing traces it; after `endbr64` on IBT kernels) into a call to an ftrace trampoline.
The syscall table stays intact, so only this view sees the hook.

The `ftrace_hooks` fact reads both halves, inside the freeze:
- every distinct handler of the syscall table (the `syscall_table` fact): its fentry site,
  and for a site patched into `call`/`jmp`, where it goes;
- the registered `ftrace_ops` (`ftrace_ops_list`, a singly linked list ending at
  `ftrace_list_end`): each one's callback and trampoline, and the functions its filter
  hash selects (an empty filter means every function).
Judging (an ops callback outside the kernel's text, a patched site no ops claims) is the
detector's job: detectors/kernel_integrity.py.

Guest memory is hostile: the ops list (MAX_OPS, cycle detection), each filter hash
(MAX_HASH_BITS, MAX_FILTER_IPS) and every pointer are bounded or checked; a problem ends
that part of the walk and is reported in `problems`, never as an exception.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sva.engine.facts import FactContext, FactProvider, Unavailable
from sva.guest.integrity import CodeTarget, Region, SyscallEntry, _Resolver
from sva.guest.processes import canonical

if TYPE_CHECKING:
    from sva.guest.context import GuestContext

ADDR48 = (1 << 48) - 1
KERNEL_HALF = 0xFFFF800000000000
MAX_OPS = 1024
MAX_HASH_BITS = 16  # the kernel caps filter hashes at FTRACE_HASH_MAX_BITS (12)
MAX_FILTER_IPS = 1 << 16  # entries read per filter hash
ENDBR64 = bytes.fromhex("f30f1efa")
CALL, JMP = 0xE8, 0xE9


@dataclass(frozen=True, slots=True)
class FtraceOps:
    """One registered ftrace_ops."""

    address: int  # of the struct, canonical
    func: CodeTarget  # the callback
    flags: int
    trampoline: int  # its own trampoline (canonical), 0 for none
    filter_ips: tuple[int, ...]  # fentry sites it selects (canonical); empty with traces_all
    traces_all: bool  # an empty filter hash: every traceable function
    filter_truncated: bool = False

    def claims(self, site: int) -> bool:
        return self.traces_all or site in self.filter_ips


@dataclass(frozen=True, slots=True)
class PatchedSite:
    """A syscall handler whose fentry site is a call or jump instead of the NOP."""

    handler: str  # kallsyms name of the handler (or its address in hex)
    syscalls: tuple[int, ...]  # the table entries that point at the handler
    site: int  # canonical address of the 5-byte site
    instruction: str  # "call" or "jmp"
    target: CodeTarget


@dataclass(frozen=True, slots=True)
class FtraceHooks:
    """The `ftrace_hooks` fact."""

    ops: tuple[FtraceOps, ...]
    patched: tuple[PatchedSite, ...]
    sites_checked: int
    problems: tuple[str, ...] = ()

    def owners(self, site: PatchedSite) -> tuple[FtraceOps, ...]:
        """The registered ops whose filter selects the site."""
        return tuple(o for o in self.ops if o.claims(site.site))


class _Bad(Exception):
    """A pointer or size that cannot be right; ends that part of the walk."""


class _Reader:
    def __init__(self, gc: GuestContext) -> None:
        self.kernel = gc.context.layers[gc.module.layer_name]

    def bytes(self, address: int, size: int) -> bytes:
        return bytes(self.kernel.read(address & ADDR48, size))

    def u64(self, address: int) -> int:
        return int(struct.unpack("<Q", self.bytes(address, 8))[0])

    def ptr(self, address: int, what: str) -> int:
        value = self.u64(address)
        if value and value < KERNEL_HALF:
            raise _Bad(f"{what} at 0x{canonical(address & ADDR48):x} holds 0x{value:x}, not a kernel address")
        return value


def _offsets(gc: GuestContext) -> dict[str, int]:
    m = gc.module

    def off(t: str, member: str) -> int:
        return int(m.get_type(t).relative_child_offset(member))

    return {
        "func": off("ftrace_ops", "func"), "next": off("ftrace_ops", "next"), "flags": off("ftrace_ops", "flags"),
        "func_hash": off("ftrace_ops", "func_hash"), "trampoline": off("ftrace_ops", "trampoline"),
        "filter_hash": off("ftrace_ops_hash", "filter_hash"), "size_bits": off("ftrace_hash", "size_bits"),
        "buckets": off("ftrace_hash", "buckets"), "count": off("ftrace_hash", "count"),
        "entry_next": off("ftrace_func_entry", "hlist") + off("hlist_node", "next"),
        "entry_ip": off("ftrace_func_entry", "ip"),
    }  # fmt: skip


def _filter(r: _Reader, o: dict[str, int], ops: int) -> tuple[tuple[int, ...], bool, bool]:
    """(ips, traces_all, truncated) of an ops' filter hash."""
    func_hash = r.ptr(ops + o["func_hash"], "ftrace_ops.func_hash")
    hash_ = r.ptr(func_hash + o["filter_hash"], "ftrace_ops_hash.filter_hash") if func_hash else 0
    if not hash_ or r.u64(hash_ + o["count"]) == 0:
        return (), True, False
    bits = r.u64(hash_ + o["size_bits"])
    if bits > MAX_HASH_BITS:
        raise _Bad(f"filter hash of the ops at 0x{canonical(ops & ADDR48):x} claims {bits} size bits")
    buckets = r.ptr(hash_ + o["buckets"], "ftrace_hash.buckets")
    if not buckets:
        return (), False, False
    heads = struct.unpack(f"<{1 << bits}Q", r.bytes(buckets, 8 << bits))
    ips: list[int] = []
    seen: set[int] = set()
    for entry in heads:
        while entry:
            if entry < KERNEL_HALF or entry in seen:
                break  # garbage, or a chain that loops
            if len(ips) >= MAX_FILTER_IPS:
                return tuple(ips), False, True
            seen.add(entry)
            ips.append(canonical(r.u64(entry + o["entry_ip"]) & ADDR48))
            entry = r.u64(entry + o["entry_next"])
    return tuple(sorted(set(ips))), False, False


def registered_ops(gc: GuestContext, resolver: _Resolver, problems: list[str]) -> tuple[FtraceOps, ...]:
    """The ftrace_ops on ftrace_ops_list, in list order (at most MAX_OPS)."""
    m = gc.module
    r = _Reader(gc)
    o = _offsets(gc)
    end = (m.get_symbol("ftrace_list_end").address + m.offset) & ADDR48
    out: list[FtraceOps] = []
    seen: set[int] = set()
    try:
        ops = r.ptr((m.get_symbol("ftrace_ops_list").address + m.offset) & ADDR48, "ftrace_ops_list") & ADDR48
        while ops and ops != end:
            if ops in seen:
                raise _Bad(f"ftrace_ops_list loops back to 0x{canonical(ops):x}")
            if len(out) >= MAX_OPS:
                raise _Bad(f"more than {MAX_OPS} ftrace_ops registered")
            seen.add(ops)
            try:
                ips, everything, cut = _filter(r, o, ops)
            except _Bad as e:
                problems.append(str(e))
                ips, everything, cut = (), False, True
            out.append(FtraceOps(
                address=canonical(ops), func=resolver.target(r.u64(ops + o["func"])), flags=r.u64(ops + o["flags"]),
                trampoline=canonical(r.u64(ops + o["trampoline"]) & ADDR48) if r.u64(ops + o["trampoline"]) else 0,
                filter_ips=ips, traces_all=everything, filter_truncated=cut,
            ))  # fmt: skip
            ops = r.ptr(ops + o["next"], "ftrace_ops.next") & ADDR48
    except _Bad as e:
        problems.append(str(e))
    except Exception as e:  # noqa: BLE001 - unreadable memory (volatility3 raises its own types)
        problems.append(f"ftrace_ops_list: {type(e).__name__}: {e}")
    return tuple(out)


def decode_site(code: bytes, address: int) -> tuple[int, str, int] | None:
    """(site address, "call"/"jmp", target) when the fentry site at the start of `code`
    (read at `address`; after endbr64 if there is one) is a rel32 call or jump; None when
    it is anything else (the NOP of an untraced function, or not an fentry site)."""
    at = len(ENDBR64) if code.startswith(ENDBR64) else 0
    if len(code) < at + 5 or code[at] not in (CALL, JMP):
        return None
    (rel,) = struct.unpack_from("<i", code, at + 1)
    site = address + at
    return site, "call" if code[at] == CALL else "jmp", (site + 5 + rel) & ((1 << 64) - 1)


def patched_sites(
    gc: GuestContext, resolver: _Resolver, table: Iterable[SyscallEntry], problems: list[str],
    time_left: Callable[[], float],
) -> tuple[tuple[PatchedSite, ...], int]:  # fmt: skip
    """The syscall handlers (in kernel text) whose fentry site is patched, and how many
    handlers were checked."""
    handlers: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for e in table:
        if e.target.region is Region.KERNEL_TEXT:
            handlers.setdefault(e.target.address, []).append(e.number)
            if e.target.symbols:
                names.setdefault(e.target.address, e.target.symbols[-1])
    r = _Reader(gc)
    out: list[PatchedSite] = []
    checked = 0
    for address, numbers in sorted(handlers.items()):
        if checked % 64 == 0 and time_left() <= 0:
            problems.append(f"cycle deadline reached after {checked} of {len(handlers)} handlers")
            break
        checked += 1
        try:
            code = r.bytes(address, len(ENDBR64) + 5)
        except Exception as e:  # noqa: BLE001
            problems.append(f"handler at 0x{address:x}: {type(e).__name__}: {e}")
            continue
        decoded = decode_site(code, address)
        if decoded is None:
            continue
        site, instruction, target = decoded
        name = names.get(address, f"0x{address:x}")
        out.append(PatchedSite(name, tuple(numbers), site, instruction, resolver.target(target)))
    return tuple(out), checked


def ftrace_hooks(gc: GuestContext, ctx: FactContext) -> FtraceHooks | Unavailable:
    """The `ftrace_hooks` fact (reads the `syscall_table` fact for the handlers). A kernel
    without dynamic ftrace gives an empty value that says so, not Unavailable: the rest of
    the kernel-integrity checks must not be skipped for it."""
    table = ctx.fact("syscall_table")
    if isinstance(table, Unavailable):
        return Unavailable(f"syscall_table: {table.reason}")
    missing = [s for s in ("ftrace_ops_list", "ftrace_list_end") if not gc.module.has_symbol(s)]
    if missing:
        return FtraceHooks((), (), 0, (f"the kernel has no {', '.join(missing)} (no dynamic ftrace)",))
    resolver = _Resolver(gc)
    problems: list[str] = []
    ops = registered_ops(gc, resolver, problems)
    patched, checked = patched_sites(gc, resolver, table, problems, ctx.time_left)
    return FtraceHooks(ops, patched, checked, tuple(problems))


def ftrace_provider(session: Any) -> FactProvider:
    """`ftrace_hooks` for a `GuestSession`."""
    return session.provider("ftrace_hooks", ftrace_hooks, requires=("syscall_table",))
