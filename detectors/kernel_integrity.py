"""Kernel integrity: system-call and interrupt handlers redirected, modules hidden, ftrace hooks.

Reads the `syscall_table`, `idt_entries`, `hidden_modules` (sva.guest.integrity) and
`ftrace_hooks` (sva.guest.ftrace) facts and judges them against rules/rootkit.toml: a
syscall entry must point into the kernel's text at the start of a system call handler
(kallsyms says which function begins there); a present IDT gate must point into an
allowed region (kernel text, and the init text that keeps early handlers of vectors the
kernel never installs); a module found in the module area must be on the module list; a
syscall handler's ftrace site may only be diverted for ftrace_ops whose callbacks are the
kernel's own, and every ftrace_ops callback must be the kernel's own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from sva.engine.facts import FactView
from sva.engine.model import Finding, Severity
from sva.engine.rules import (
    FtraceOpsRule,
    FtraceSyscallHookRule,
    HiddenModuleRule,
    IdtHookRule,
    RuleSet,
    SyscallHookRule,
)
from sva.guest.ftrace import FtraceHooks, FtraceOps
from sva.guest.integrity import CodeTarget, HiddenModule, IdtEntry, Region, SyscallEntry


@dataclass(frozen=True, kw_only=True)
class SyscallHook(Finding):
    kind: ClassVar[str] = "rootkit.syscall_hook"
    description: ClassVar[str] = "a system call table entry that does not point at a system call handler"
    default_severity: ClassVar[Severity] = Severity.CRITICAL


@dataclass(frozen=True, kw_only=True)
class IdtHook(Finding):
    kind: ClassVar[str] = "rootkit.idt_hook"
    description: ClassVar[str] = "an interrupt descriptor table gate whose handler lies outside the kernel's text"
    default_severity: ClassVar[Severity] = Severity.CRITICAL


@dataclass(frozen=True, kw_only=True)
class HiddenKernelModule(Finding):
    kind: ClassVar[str] = "rootkit.hidden_module"
    description: ClassVar[str] = "a kernel module present in memory but missing from the module list"
    default_severity: ClassVar[Severity] = Severity.CRITICAL


@dataclass(frozen=True, kw_only=True)
class FtraceSyscallHook(Finding):
    kind: ClassVar[str] = "rootkit.ftrace_syscall_hook"
    description: ClassVar[str] = "a system call handler diverted through ftrace (or its ftrace site overwritten)"
    default_severity: ClassVar[Severity] = Severity.CRITICAL


@dataclass(frozen=True, kw_only=True)
class ForeignFtraceOps(Finding):
    kind: ClassVar[str] = "rootkit.ftrace_ops"
    description: ClassVar[str] = "an ftrace callback registered from outside the kernel's text"
    default_severity: ClassVar[Severity] = Severity.HIGH


def _ops(o: FtraceOps) -> dict[str, Any]:
    t = o.func
    return {"ops": f"0x{o.address:x}", "callback": f"0x{t.address:x}", "callback_symbols": list(t.symbols),
            "callback_region": t.region.value, "callback_module": t.module,
            "trampoline": f"0x{o.trampoline:x}" if o.trampoline else None, "flags": o.flags}  # fmt: skip


def _where(t: CodeTarget) -> str:
    return f"module {t.module}" if t.module else (t.symbols[0] if t.symbols else t.region.value)


def _target(t: CodeTarget) -> dict[str, Any]:
    return {"target": f"0x{t.address:x}", "target_symbols": list(t.symbols), "target_region": t.region.value,
            "target_module": t.module}  # fmt: skip


class KernelIntegrity:
    id = "kernel_integrity"
    version = "1.1.0"
    description = "syscall table and IDT entries redirected, modules hidden from the list, syscalls hooked via ftrace"
    needs = frozenset({"syscall_table", "idt_entries", "hidden_modules", "ftrace_hooks"})
    material_fields = frozenset({"target", "name", "callback"})

    def detect(self, facts: FactView, rules: RuleSet) -> Iterator[Finding]:
        for sc_rule in rules.of_kind(SyscallHookRule):
            yield from self.check_syscalls(sc_rule, facts["syscall_table"])
        for idt_rule in rules.of_kind(IdtHookRule):
            yield from self.check_idt(idt_rule, facts["idt_entries"])
        for mod_rule in rules.of_kind(HiddenModuleRule):
            yield from self.check_modules(mod_rule, facts["hidden_modules"])
        for ft_rule in rules.of_kind(FtraceSyscallHookRule):
            yield from self.check_ftrace_syscalls(ft_rule, facts["ftrace_hooks"])
        for ops_rule in rules.of_kind(FtraceOpsRule):
            yield from self.check_ftrace_ops(ops_rule, facts["ftrace_hooks"])

    def check_syscalls(self, rule: SyscallHookRule, table: Sequence[SyscallEntry]) -> Iterator[Finding]:
        for e in table:
            t = e.target
            handler = [s for s in t.symbols if s.startswith(rule.handler_prefixes)]
            if t.region is Region.KERNEL_TEXT and handler:
                continue
            if e.number in rule.allow_entries or (t.module is not None and t.module in rule.allow_modules):
                continue
            where = f"module {t.module}" if t.module else (t.symbols[0] if t.symbols else t.region.value)
            yield SyscallHook(
                rule=rule.id, title=f"{rule.title}: syscall {e.number} -> 0x{t.address:x} ({where})",
                severity=rule.severity, mitre=rule.mitre, subject=("syscall", e.number),
                evidence={"entry": e.number, "expected": f"kernel text, a symbol starting with {' or '.join(rule.handler_prefixes)}",
                          **_target(t)},
            )  # fmt: skip

    def check_idt(self, rule: IdtHookRule, gates: Sequence[IdtEntry]) -> Iterator[Finding]:
        for g in gates:
            t = g.target
            if not g.present or t.region.value in rule.allowed_regions or g.vector in rule.allow_vectors:
                continue
            if t.module is not None and t.module in rule.allow_modules:
                continue
            where = f"module {t.module}" if t.module else t.region.value
            yield IdtHook(
                rule=rule.id, title=f"{rule.title}: vector {g.vector} -> 0x{t.address:x} ({where})",
                severity=rule.severity, mitre=rule.mitre, subject=("idt", g.vector),
                evidence={"vector": g.vector, "expected": f"a handler in {' or '.join(rule.allowed_regions)}", **_target(t)},
            )  # fmt: skip

    def check_modules(self, rule: HiddenModuleRule, modules: Sequence[HiddenModule]) -> Iterator[Finding]:
        for m in modules:
            if m.name in rule.allow_names:
                continue
            yield HiddenKernelModule(
                rule=rule.id, title=f"{rule.title}: {m.name} at 0x{m.address:x}", severity=rule.severity,
                mitre=rule.mitre, subject=("module", f"0x{m.address:x}"),
                evidence={"name": m.name, "address": f"0x{m.address:x}",
                          "base": f"0x{m.base:x}" if m.base is not None else None, "size": m.size},
            )  # fmt: skip

    def check_ftrace_syscalls(self, rule: FtraceSyscallHookRule, hooks: FtraceHooks) -> Iterator[Finding]:
        def foreign(o: FtraceOps) -> bool:
            return o.func.region.value not in rule.allowed_regions and o.func.module not in rule.allow_modules

        for site in hooks.patched:
            if any(n in rule.allow_syscalls for n in site.syscalls):
                continue
            owners = hooks.owners(site)
            culprits = [o for o in owners if foreign(o)]
            if owners and not culprits:
                continue  # the kernel's own tracers (kprobes, function tracer, BPF, livepatch)
            numbers = ", ".join(str(n) for n in site.syscalls)
            if culprits:
                how = "ftrace callback " + ", ".join(f"0x{o.func.address:x} ({_where(o.func)})" for o in culprits)
            else:
                how = "no registered ftrace_ops selects it"
            yield FtraceSyscallHook(
                rule=rule.id, severity=rule.severity, mitre=rule.mitre, subject=("ftrace-syscall", site.handler),
                title=f"{rule.title}: syscall {numbers} ({site.handler}) {site.instruction} 0x{site.target.address:x}; {how}",
                evidence={"entries": list(site.syscalls), "handler": site.handler, "site": f"0x{site.site:x}",
                          "instruction": site.instruction, **_target(site.target),
                          "claimed_by_ftrace": bool(owners), "hooked_by": [_ops(o) for o in culprits]},
            )  # fmt: skip

    def check_ftrace_ops(self, rule: FtraceOpsRule, hooks: FtraceHooks) -> Iterator[Finding]:
        for o in hooks.ops:
            t = o.func
            if t.region.value in rule.allowed_regions or (t.module is not None and t.module in rule.allow_modules):
                continue
            selects = "every function" if o.traces_all else f"{len(o.filter_ips)} function(s)"
            yield ForeignFtraceOps(
                rule=rule.id, severity=rule.severity, mitre=rule.mitre, subject=("ftrace-ops", f"0x{o.address:x}"),
                title=f"{rule.title}: ops 0x{o.address:x} calls 0x{t.address:x} ({_where(t)}) on {selects}",
                evidence={**_ops(o), "traces_all": o.traces_all,
                          "filter": [f"0x{ip:x}" for ip in o.filter_ips[:64]], "filter_size": len(o.filter_ips)},
            )  # fmt: skip


DETECTOR = KernelIntegrity()
