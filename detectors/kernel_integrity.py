"""Kernel integrity: system-call and interrupt handlers redirected, modules hidden.

Reads the `syscall_table`, `idt_entries` and `hidden_modules` facts (sva.guest.integrity)
and judges them against rules/rootkit.toml: a syscall entry must point into the kernel's
text at the start of a system call handler (kallsyms says which function begins there);
a present IDT gate must point into an allowed region (kernel text, and the init text
that keeps early handlers of vectors the kernel never installs); a module found in the
module area must be on the module list.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from sva.engine.facts import FactView
from sva.engine.model import Finding, Severity
from sva.engine.rules import HiddenModuleRule, IdtHookRule, RuleSet, SyscallHookRule
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


def _target(t: CodeTarget) -> dict[str, Any]:
    return {"target": f"0x{t.address:x}", "target_symbols": list(t.symbols), "target_region": t.region.value,
            "target_module": t.module}  # fmt: skip


class KernelIntegrity:
    id = "kernel_integrity"
    version = "1.0.0"
    description = "syscall table and IDT entries redirected away from the kernel, modules hidden from the list"
    needs = frozenset({"syscall_table", "idt_entries", "hidden_modules"})
    material_fields = frozenset({"target", "name"})

    def detect(self, facts: FactView, rules: RuleSet) -> Iterator[Finding]:
        for sc_rule in rules.of_kind(SyscallHookRule):
            yield from self.check_syscalls(sc_rule, facts["syscall_table"])
        for idt_rule in rules.of_kind(IdtHookRule):
            yield from self.check_idt(idt_rule, facts["idt_entries"])
        for mod_rule in rules.of_kind(HiddenModuleRule):
            yield from self.check_modules(mod_rule, facts["hidden_modules"])

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


DETECTOR = KernelIntegrity()
