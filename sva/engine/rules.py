"""Rules as typed data: the rule kinds, suppressions and the `RuleSet` detectors receive.

Rule files (TOML, in `rules/`) are loaded by `sva.engine.ruleload` into these frozen
dataclasses; rules/README.md documents the file format. Every rule has an id, a version,
a maturity (Falco's stable / incubating / sandbox / deprecated), a severity, ATT&CK ids,
a title and a description that says what it catches, its false positives and how to
tune it. Each kind adds its own fields; the field names are the TOML keys and the type
hints are the schema the loader enforces.

A new rule kind is a frozen, kw_only subclass of `Rule` registered with
`@rule_kind("name")`; optional `problems()` adds cross-field checks.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from sva.engine.facts import ProcessInfo
from sva.engine.model import Severity

Problem = tuple[tuple[str | int, ...], str]  # (key path below the rule's table, message)


class Maturity(enum.StrEnum):
    """How far a rule is trusted (as in Falco's rules)."""

    STABLE = "stable"  # low false positives, on by default
    INCUBATING = "incubating"  # useful, may need tuning; on by default
    SANDBOX = "sandbox"  # experimental; off unless selected
    DEPRECATED = "deprecated"  # kept for reference; off unless selected


DEFAULT_MATURITIES = frozenset({Maturity.STABLE, Maturity.INCUBATING})

_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MITRE_ID = re.compile(r"(T[0-9]{4}(\.[0-9]{3})?|TA[0-9]{4})")


def check_rule_id(value: str) -> str | None:
    if not _RULE_ID.fullmatch(value):
        return f"{value!r} is not a valid id (letters, digits, '_', '.', '-'; at most 128)"
    return None


def check_mitre_id(value: str) -> str | None:
    if not _MITRE_ID.fullmatch(value):
        return f"{value!r} is not a MITRE ATT&CK id (T1234, T1234.001 or TA0001)"
    return None


def check_positive(value: int) -> str | None:
    return None if value >= 1 else f"must be at least 1, not {value}"


def check_not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def check_absolute(value: str) -> str | None:
    return None if value.startswith("/") else f"{value!r} is not an absolute path"


def meta(
    check: Callable[[Any], str | None] | None = None, item_check: Callable[[Any], str | None] | None = None
) -> dict[str, Any]:
    """Field metadata for the loader: `check` the value, or `item_check` each list item."""
    return {"check": check, "item_check": item_check}


NOT_IN_TOML = {"toml": False}  # fields the loader fills in, not keys of the file


@dataclass(frozen=True, kw_only=True)
class Rule:
    """Fields every rule has. Subclasses add the fields of one kind."""

    KIND: ClassVar[str] = ""

    id: str = field(metadata=meta(check_rule_id))
    version: int = field(metadata=meta(check_positive))
    maturity: Maturity
    severity: Severity
    title: str = field(metadata=meta(check_not_empty))
    description: str = field(metadata=meta(check_not_empty))
    mitre: tuple[str, ...] = field(default=(), metadata=meta(item_check=check_mitre_id))
    enabled: bool = True
    source: str = field(default="", compare=False, metadata=NOT_IN_TOML)  # "file:line" of the rule
    ruleset_version: str = field(default="", compare=False, metadata=NOT_IN_TOML)

    def problems(self) -> Iterable[Problem]:
        """Cross-field checks after the types are right: (key path, message) pairs."""
        return ()


RULE_KINDS: dict[str, type[Rule]] = {}
R = TypeVar("R", bound=Rule)


def rule_kind(name: str) -> Callable[[type[R]], type[R]]:
    """Class decorator: register a rule kind under the TOML `kind = "name"`."""

    def register(cls: type[R]) -> type[R]:
        if name in RULE_KINDS and RULE_KINDS[name] is not cls:
            raise ValueError(f"rule kind {name!r} is already {RULE_KINDS[name].__qualname__}")
        cls.KIND = name
        RULE_KINDS[name] = cls
        return cls

    return register


# -- process policy ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ProcessRule(Rule):
    """A rule about single processes, with allow-lists as the tuning points.

    A process is allowed (the rule does not fire) when its comm is in `allow_comms`, its
    executable or script path starts with one of `allow_paths`, or its command line
    matches one of `allow_cmdlines`. All are empty as shipped.
    """

    allow_comms: tuple[str, ...] = ()
    allow_paths: tuple[str, ...] = field(default=(), metadata=meta(item_check=check_absolute))
    allow_cmdlines: tuple[re.Pattern[str], ...] = ()

    def allows(self, proc: ProcessInfo, paths: Iterable[str] = ()) -> bool:
        if proc.comm in self.allow_comms:
            return True
        if self.allow_paths and any(p.startswith(self.allow_paths) for p in paths):
            return True
        if self.allow_cmdlines:
            cmdline = proc.cmdline
            return any(rx.search(cmdline) for rx in self.allow_cmdlines)
        return False


@rule_kind("process_name")
@dataclass(frozen=True, kw_only=True)
class ProcessNameRule(ProcessRule):
    """Fires when a process's comm, executable name or argv[0]/script name is in `names`
    (case-insensitive; a name longer than 15 characters also matches its truncated comm)."""

    names: tuple[str, ...] = field(metadata=meta(item_check=check_not_empty))

    def problems(self) -> Iterable[Problem]:
        if not self.names:
            yield ("names",), "needs at least one name"


@rule_kind("exec_path")
@dataclass(frozen=True, kw_only=True)
class ExecPathRule(ProcessRule):
    """Fires when the executable (or the script an interpreter runs) lies under one of
    `prefixes`, or, with `deleted`, was unlinked, or, with `memfd`, is a memfd."""

    prefixes: tuple[str, ...] = field(default=(), metadata=meta(item_check=check_absolute))
    deleted: bool = False
    memfd: bool = False

    def problems(self) -> Iterable[Problem]:
        if not self.prefixes and not self.deleted and not self.memfd:
            yield (), "needs `prefixes`, `deleted = true` or `memfd = true`"


@rule_kind("cmdline")
@dataclass(frozen=True, kw_only=True)
class CmdlineRule(ProcessRule):
    """Fires when the command line (argv joined by spaces) matches one of `patterns`
    (Python regular expressions, `re.search`)."""

    patterns: tuple[re.Pattern[str], ...]

    def problems(self) -> Iterable[Problem]:
        if not self.patterns:
            yield ("patterns",), "needs at least one pattern"


@rule_kind("parent_child")
@dataclass(frozen=True, kw_only=True)
class ParentChildRule(ProcessRule):
    """Fires when a process whose comm is in `children` has a parent whose comm is in
    `parents`. The allow-lists apply to the child; `allow_parent_paths` to the parent."""

    parents: tuple[str, ...] = field(metadata=meta(item_check=check_not_empty))
    children: tuple[str, ...] = field(metadata=meta(item_check=check_not_empty))
    allow_parent_paths: tuple[str, ...] = field(default=(), metadata=meta(item_check=check_absolute))

    def problems(self) -> Iterable[Problem]:
        if not self.parents:
            yield ("parents",), "needs at least one parent name"
        if not self.children:
            yield ("children",), "needs at least one child name"


# -- memory -----------------------------------------------------------------------------


class MemoryScope(enum.StrEnum):
    """Where a YARA hit lies: in a process's mapping, or in memory no process maps."""

    PROCESS = "process"
    UNATTRIBUTED = "unattributed"  # kernel memory, page cache, freed pages


@dataclass(frozen=True, kw_only=True)
class MemoryRule(Rule):
    """A rule about process memory. A process is allowed (the rule does not fire) when its
    comm is in `allow_comms` or its executable or the mapping's file starts with one of
    `allow_paths`; both are empty as shipped (the tuning points)."""

    allow_comms: tuple[str, ...] = ()
    allow_paths: tuple[str, ...] = field(default=(), metadata=meta(item_check=check_absolute))

    def allows(self, proc: ProcessInfo, paths: Iterable[str] = ()) -> bool:
        if proc.comm in self.allow_comms:
            return True
        return bool(self.allow_paths) and any(p.startswith(self.allow_paths) for p in paths)


@rule_kind("memory_signature")
@dataclass(frozen=True, kw_only=True)
class MemorySignatureRule(MemoryRule):
    """Turns matches of the active YARA signature bundle into findings: those of YARA
    rules whose `namespace:rule` matches one of `signatures` (globs) and whose hits lie in
    `scope`. The allow-lists apply to the owning process (scope "process" only)."""

    signatures: tuple[str, ...] = field(default=("*",), metadata=meta(item_check=check_not_empty))
    scope: MemoryScope = MemoryScope.PROCESS

    def problems(self) -> Iterable[Problem]:
        if not self.signatures:
            yield ("signatures",), "needs at least one signature glob (\"*\" for all)"

    def covers(self, signature: str) -> bool:
        return any(fnmatchcase(signature, g) for g in self.signatures)


def check_hex_bytes(value: str) -> str | None:
    try:
        return None if bytes.fromhex(value) else f"{value!r}: empty byte pattern"
    except ValueError:
        return f"{value!r} is not hex bytes (e.g. \"55 48 89 e5\")"


INJECTION_REASONS = ("rwx", "anon_exec", "dirty_exec")  # sva.guest.memscan.SuspiciousMapping.reason


def check_code_reason(value: str) -> str | None:
    return None if value in INJECTION_REASONS else f"{value!r} is not one of {', '.join(INJECTION_REASONS)}"


@rule_kind("injected_code")
@dataclass(frozen=True, kw_only=True)
class InjectedCodeRule(MemoryRule):
    """Fires on a process mapping that malfind would show (`reasons`: "rwx" writable and
    executable, "anon_exec" executable with no file, "dirty_exec" executable file mapping
    with a written page) whose first bytes look like code: one of `code_patterns` (hex
    byte strings) in them, unless `require_code` is false. Processes named in `jit_comms`
    (runtimes that generate code: Java, node, QEMU's TCG) are allowed, as by allow_comms."""

    reasons: tuple[str, ...] = field(default=("rwx", "anon_exec"), metadata=meta(item_check=check_code_reason))
    require_code: bool = True
    code_patterns: tuple[str, ...] = field(default=(), metadata=meta(item_check=check_hex_bytes))
    jit_comms: tuple[str, ...] = ()

    def allows(self, proc: ProcessInfo, paths: Iterable[str] = ()) -> bool:
        return proc.comm in self.jit_comms or super().allows(proc, paths)

    def problems(self) -> Iterable[Problem]:
        if not self.reasons:
            yield ("reasons",), "needs at least one of rwx, anon_exec, dirty_exec"
        if self.require_code and not self.code_patterns:
            yield ("code_patterns",), "require_code needs at least one code pattern"

    @property
    def patterns(self) -> tuple[bytes, ...]:
        return tuple(bytes.fromhex(p) for p in self.code_patterns)


# -- rootkits (detectors/hidden_processes.py, detectors/kernel_integrity.py) -------------

TASK_VIEWS = ("task_list", "pid_idr", "memory_scan", "run_queue")  # the views of sva.guest.views
CODE_REGIONS = ("kernel_text", "kernel_init_text", "module", "other")  # sva.guest.integrity.Region


def check_task_view(value: str) -> str | None:
    return None if value in TASK_VIEWS else f"{value!r} is not a task view ({', '.join(TASK_VIEWS)})"


def check_code_region(value: str) -> str | None:
    return None if value in CODE_REGIONS else f"{value!r} is not a code region ({', '.join(CODE_REGIONS)})"


@rule_kind("hidden_task")
@dataclass(frozen=True, kw_only=True)
class HiddenTaskRule(Rule):
    """Fires when a live thread-group leader is seen by some of `views` and not by others
    (all taken in one freeze). `allow_comms` lists task names never reported."""

    views: tuple[str, ...] = field(default=TASK_VIEWS, metadata=meta(item_check=check_task_view))
    allow_comms: tuple[str, ...] = ()

    def problems(self) -> Iterable[Problem]:
        if len(set(self.views)) < 2:
            yield ("views",), "needs at least two different views to compare"


@rule_kind("syscall_hook")
@dataclass(frozen=True, kw_only=True)
class SyscallHookRule(Rule):
    """Fires for a sys_call_table entry that points outside the kernel's text, or at an
    address where no symbol starting with one of `handler_prefixes` begins."""

    handler_prefixes: tuple[str, ...] = field(metadata=meta(item_check=check_not_empty))
    allow_entries: tuple[int, ...] = ()
    allow_modules: tuple[str, ...] = ()

    def problems(self) -> Iterable[Problem]:
        if not self.handler_prefixes:
            yield ("handler_prefixes",), "needs at least one prefix"


@rule_kind("idt_hook")
@dataclass(frozen=True, kw_only=True)
class IdtHookRule(Rule):
    """Fires for a present IDT gate whose handler lies outside `allowed_regions`."""

    allowed_regions: tuple[str, ...] = field(metadata=meta(item_check=check_code_region))
    allow_vectors: tuple[int, ...] = ()
    allow_modules: tuple[str, ...] = ()

    def problems(self) -> Iterable[Problem]:
        if not self.allowed_regions:
            yield ("allowed_regions",), "needs at least one region"
        if any(not 0 <= v < 256 for v in self.allow_vectors):
            yield ("allow_vectors",), "vectors are 0..255"


@rule_kind("hidden_module")
@dataclass(frozen=True, kw_only=True)
class HiddenModuleRule(Rule):
    """Fires for a kernel module found in the module area but not on the module list."""

    allow_names: tuple[str, ...] = ()


@rule_kind("ftrace_syscall_hook")
@dataclass(frozen=True, kw_only=True)
class FtraceSyscallHookRule(Rule):
    """Fires for a system call handler whose fentry site is patched into a call or jump,
    when a registered ftrace_ops whose callback lies outside `allowed_regions` selects it,
    or when no registered ftrace_ops selects it at all (the site was written directly)."""

    allowed_regions: tuple[str, ...] = field(metadata=meta(item_check=check_code_region))
    allow_syscalls: tuple[int, ...] = ()
    allow_modules: tuple[str, ...] = ()

    def problems(self) -> Iterable[Problem]:
        if not self.allowed_regions:
            yield ("allowed_regions",), "needs at least one region"


@rule_kind("ftrace_ops")
@dataclass(frozen=True, kw_only=True)
class FtraceOpsRule(Rule):
    """Fires for a registered ftrace_ops whose callback lies outside `allowed_regions`."""

    allowed_regions: tuple[str, ...] = field(metadata=meta(item_check=check_code_region))
    allow_modules: tuple[str, ...] = ()

    def problems(self) -> Iterable[Problem]:
        if not self.allowed_regions:
            yield ("allowed_regions",), "needs at least one region"


# -- suppressions -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Suppression:
    """Silences findings that match ALL its given criteria (each a list of globs: any
    one of them matches). At least one criterion is required: an empty suppression would
    silence everything."""

    id: str = field(metadata=meta(check_rule_id))
    reason: str = field(metadata=meta(check_not_empty))
    vm: tuple[str, ...] = ()
    detector: tuple[str, ...] = ()
    rule: tuple[str, ...] = ()
    process: tuple[str, ...] = ()  # comm of the finding's process
    enabled: bool = True
    source: str = field(default="", compare=False, metadata=NOT_IN_TOML)

    def problems(self) -> Iterable[Problem]:
        if not (self.vm or self.detector or self.rule or self.process):
            yield (), "needs at least one of vm, detector, rule, process (it would silence everything)"

    def matches(self, *, vm: str, detector: str, rule: str, process: str | None) -> bool:
        if not self.enabled:
            return False

        def any_glob(globs: tuple[str, ...], value: str | None) -> bool:
            if not globs:
                return True
            return value is not None and any(fnmatchcase(value, g) for g in globs)

        return (
            any_glob(self.vm, vm)
            and any_glob(self.detector, detector)
            and any_glob(self.rule, rule)
            and any_glob(self.process, process)
        )


# -- the whole set ----------------------------------------------------------------------


@dataclass(frozen=True)
class RuleFile:
    """One loaded file's header: `[ruleset]` name, version and description."""

    path: str
    name: str
    version: str
    description: str = ""
    rules: int = 0
    suppressions: int = 0


@dataclass(frozen=True)
class RuleSet:
    """Every loaded rule and suppression, and which maturities are switched on."""

    rules: tuple[Rule, ...] = ()
    suppressions: tuple[Suppression, ...] = ()
    files: tuple[RuleFile, ...] = ()
    maturities: frozenset[Maturity] = DEFAULT_MATURITIES

    def active(self) -> Iterator[Rule]:
        """Enabled rules of a selected maturity, in file order."""
        return (r for r in self.rules if r.enabled and r.maturity in self.maturities)

    def of_kind(self, cls: type[R]) -> tuple[R, ...]:
        """The active rules of one kind (instances of `cls`)."""
        return tuple(r for r in self.active() if isinstance(r, cls))

    def get(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)

    def suppression_for(self, *, vm: str, detector: str, rule: str, process: str | None) -> Suppression | None:
        """The first suppression that silences such a finding, if any."""
        return next(
            (s for s in self.suppressions if s.matches(vm=vm, detector=detector, rule=rule, process=process)),
            None,
        )

    def with_maturities(self, maturities: Iterable[Maturity | str]) -> RuleSet:
        return replace(self, maturities=frozenset(Maturity(m) for m in maturities))

    @property
    def version(self) -> str:
        """All files' versions, e.g. `process_policy@1.0.0+suppressions@1.0.0`."""
        return "+".join(f"{f.name}@{f.version}" for f in self.files) or "none"


def default_rules_dir() -> Path:
    """$SVA_RULES_DIR, else the repository's rules/ next to the sva package, else /etc/sva/rules."""
    env = os.environ.get("SVA_RULES_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2] / "rules"
    if repo.is_dir():
        return repo
    return Path("/etc/sva/rules")
