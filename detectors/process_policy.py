"""Process policy: miners, droppers, fileless executables, reverse shells, service shells.

Looks at the `processes` fact one process at a time (name, executable path, command
line), then at the whole set (who started whom), against the rules of
rules/process_policy.toml. Each finding carries the process, its parent, the rule id
and what matched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, ClassVar

from sva.engine.facts import FactView, ProcessInfo
from sva.engine.model import Finding, Severity
from sva.engine.rules import CmdlineRule, ExecPathRule, ParentChildRule, ProcessNameRule, ProcessRule, RuleSet

MAX_EVIDENCE_ARGS = 64  # arguments copied into a finding's evidence
MAX_EVIDENCE_ARG = 1024  # characters per argument
MAX_MATCH_TEXT = 256
MAX_CMDLINE_MATCH = 4096  # characters of a command line the patterns see (bounds regex time)
COMM_LEN = 15  # the kernel truncates comm to 15 characters

# Programs that run a script named by their first non-option argument.
_INTERPRETER = re.compile(r"(ba|da|z|k|a)?sh|python[0-9.]*|perl[0-9.]*|ruby[0-9.]*|php[0-9.]*|node|lua[0-9.]*")
_MULTICALL = frozenset({"busybox", "toybox"})  # argv[0] (or argv[1] after the binary) names the applet
_INLINE_CODE_FLAGS = frozenset({"-c", "-e", "-E", "-r"})  # sh -c, perl -e, php -r: no script file
MEMFD_PREFIX = "/memfd:"


# -- finding kinds ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class KnownBadProcessName(Finding):
    kind: ClassVar[str] = "process.name"
    description: ClassVar[str] = "a process whose name is on a list of known-bad programs (e.g. coin miners)"
    default_severity: ClassVar[Severity] = Severity.HIGH


@dataclass(frozen=True, kw_only=True)
class SuspiciousExecutable(Finding):
    kind: ClassVar[str] = "process.exec_path"
    description: ClassVar[str] = "a process running from a world-writable directory, a deleted file or a memfd"
    default_severity: ClassVar[Severity] = Severity.HIGH


@dataclass(frozen=True, kw_only=True)
class SuspiciousCommandLine(Finding):
    kind: ClassVar[str] = "process.cmdline"
    description: ClassVar[str] = "a process whose command line matches a known-bad pattern (reverse shell, mining pool)"
    default_severity: ClassVar[Severity] = Severity.HIGH


@dataclass(frozen=True, kw_only=True)
class SuspiciousParentChild(Finding):
    kind: ClassVar[str] = "process.parent_child"
    description: ClassVar[str] = "a shell started by a process that should never start one (e.g. a web server)"
    default_severity: ClassVar[Severity] = Severity.HIGH


# -- helpers ----------------------------------------------------------------------------


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def script_path(p: ProcessInfo) -> str | None:
    """The absolute path of the script an interpreter process runs, if there is one."""
    args = p.argv
    if args and basename(args[0]) in _MULTICALL:  # `busybox sh /tmp/x`
        args = args[1:]
    if len(args) < 2:
        return None
    # argv[0] can be anything (exec -a), so a real interpreter binary counts too; but a
    # multi-call binary's exe says nothing: `cat` is /bin/busybox as well.
    exe_name = basename(p.exe) if p.exe else ""
    if not _INTERPRETER.fullmatch(basename(args[0])) and (
        exe_name in _MULTICALL or not _INTERPRETER.fullmatch(exe_name)
    ):
        return None
    for arg in args[1:8]:  # options first, then the script; a few at most
        if arg in _INLINE_CODE_FLAGS:
            return None
        if arg.startswith("-"):
            continue
        return arg if arg.startswith("/") else None
    return None


def executable_paths(p: ProcessInfo) -> list[tuple[str, str]]:
    """(where, path) of what the process executes: its exe (or argv[0] when the exe is
    unknown) and the script its interpreter runs."""
    out: list[tuple[str, str]] = []
    if p.exe:
        out.append(("exe", p.exe))
    elif p.argv and p.argv[0].startswith("/"):
        out.append(("argv0", p.argv[0]))
    script = script_path(p)
    if script:
        out.append(("script", script))
    return out


def _bounded_argv(argv: Sequence[str]) -> list[str]:
    return [a[:MAX_EVIDENCE_ARG] for a in argv[:MAX_EVIDENCE_ARGS]]


def _evidence(p: ProcessInfo, parent: ProcessInfo | None, **matched: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {"pid": p.pid, "comm": p.comm, "ppid": p.ppid, "argv": _bounded_argv(p.argv)}
    if len(p.argv) > MAX_EVIDENCE_ARGS:
        ev["argv_truncated"] = len(p.argv)
    ev["exe"] = p.exe
    if p.exe_deleted:
        ev["exe_deleted"] = True
    if p.uid is not None:
        ev["uid"] = p.uid
    if parent is not None:
        ev["parent_comm"] = parent.comm
    ev.update(matched)
    return ev


def _title(rule: ProcessRule, p: ProcessInfo) -> str:
    return f"{rule.title}: pid {p.pid} ({p.comm})"


# -- the detector -----------------------------------------------------------------------


class ProcessPolicy:
    id = "process_policy"
    version = "1.0.0"
    description = "processes that look like coin miners, droppers, fileless malware, reverse shells or web shells"
    needs = frozenset({"processes"})
    material_fields = frozenset({"argv", "exe", "matched"})

    def detect(self, facts: FactView, rules: RuleSet) -> Iterator[Finding]:
        procs: Sequence[ProcessInfo] = facts["processes"]
        by_pid = {p.pid: p for p in procs}
        name_rules = rules.of_kind(ProcessNameRule)
        path_rules = rules.of_kind(ExecPathRule)
        cmd_rules = rules.of_kind(CmdlineRule)
        for p in procs:
            parent = by_pid.get(p.ppid)
            paths = executable_paths(p)
            for name_rule in name_rules:
                yield from self.check_name(name_rule, p, parent, paths)
            for path_rule in path_rules:
                yield from self.check_path(path_rule, p, parent, paths)
            for cmd_rule in cmd_rules:
                yield from self.check_cmdline(cmd_rule, p, parent, paths)
        for tree_rule in rules.of_kind(ParentChildRule):
            yield from self.check_tree(tree_rule, procs, by_pid)

    # -- one process at a time -----------------------------------------------------------
    def check_name(
        self, rule: ProcessNameRule, p: ProcessInfo, parent: ProcessInfo | None, paths: list[tuple[str, str]]
    ) -> Iterable[Finding]:
        names = {n.lower() for n in rule.names}
        truncated = {n[:COMM_LEN] for n in names if len(n) > COMM_LEN}
        candidates = [("comm", p.comm)] + [(where, basename(path)) for where, path in paths]
        if p.argv and ("argv0", p.argv[0]) not in paths:
            candidates.append(("argv0", basename(p.argv[0])))
        for where, name in candidates:
            low = name.lower()
            if low in names or (where == "comm" and low in truncated):
                if rule.allows(p, (path for _, path in paths)):
                    return
                yield KnownBadProcessName(
                    rule=rule.id, title=_title(rule, p), severity=rule.severity, mitre=rule.mitre,
                    process=p, parent=parent, evidence=_evidence(p, parent, matched=low, matched_on=where),
                )  # fmt: skip
                return

    def check_path(
        self, rule: ExecPathRule, p: ProcessInfo, parent: ProcessInfo | None, paths: list[tuple[str, str]]
    ) -> Iterable[Finding]:
        hit: tuple[str, str, str] | None = None  # (matched, where, path)
        if p.exe is not None and (rule.deleted or rule.memfd):
            if rule.memfd and p.exe.startswith(MEMFD_PREFIX):
                hit = ("memfd", "exe", p.exe)
            elif rule.deleted and p.exe_deleted:
                hit = ("deleted", "exe", p.exe)
        if hit is None and rule.prefixes:
            for where, path in paths:
                prefix = next((x for x in rule.prefixes if path.startswith(x)), None)
                if prefix is not None:
                    hit = (prefix, where, path)
                    break
        if hit is None or rule.allows(p, (path for _, path in paths)):
            return
        matched, where, path = hit
        yield SuspiciousExecutable(
            rule=rule.id, title=_title(rule, p), severity=rule.severity, mitre=rule.mitre, process=p,
            parent=parent, evidence=_evidence(p, parent, matched=matched, matched_on=where, path=path),
        )  # fmt: skip

    def check_cmdline(
        self, rule: CmdlineRule, p: ProcessInfo, parent: ProcessInfo | None, paths: list[tuple[str, str]]
    ) -> Iterable[Finding]:
        if not p.argv:
            return
        cmdline = p.cmdline[:MAX_CMDLINE_MATCH]
        for rx in rule.patterns:
            m = rx.search(cmdline)
            if m is None:
                continue
            if rule.allows(p, (path for _, path in paths)):
                return
            yield SuspiciousCommandLine(
                rule=rule.id, title=_title(rule, p), severity=rule.severity, mitre=rule.mitre, process=p,
                parent=parent, evidence=_evidence(p, parent, matched=rx.pattern, match=m.group()[:MAX_MATCH_TEXT]),
            )  # fmt: skip
            return

    # -- the whole set ---------------------------------------------------------------------
    def check_tree(
        self, rule: ParentChildRule, procs: Sequence[ProcessInfo], by_pid: Mapping[int, ProcessInfo]
    ) -> Iterable[Finding]:
        for child in procs:
            if not any(fnmatchcase(child.comm, c) for c in rule.children):
                continue
            parent = by_pid.get(child.ppid)
            if parent is None or parent.pid == child.pid:
                continue
            if not any(fnmatchcase(parent.comm, c) for c in rule.parents):
                continue
            paths = executable_paths(child)
            if rule.allows(child, (path for _, path in paths)):
                continue
            if rule.allow_parent_paths and any(
                path.startswith(rule.allow_parent_paths) for _, path in executable_paths(parent)
            ):
                continue
            yield SuspiciousParentChild(
                rule=rule.id, title=f"{rule.title}: {parent.comm} (pid {parent.pid}) -> {child.comm} (pid {child.pid})",
                severity=rule.severity, mitre=rule.mitre, process=child, parent=parent,
                evidence=_evidence(child, parent, matched=f"{parent.comm} -> {child.comm}", parent_pid=parent.pid,
                                   parent_argv=_bounded_argv(parent.argv)),
            )  # fmt: skip


DETECTOR = ProcessPolicy()
