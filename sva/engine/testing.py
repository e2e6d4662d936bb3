"""Factories for engine and detector tests: real engine objects, no mocks.

- `proc(...)` builds a `ProcessInfo` with sensible defaults.
- `FunctionDetector` is a real detector made from a function (engine tests, demos).
- `lab_processes(name)` reads a lab guest's process list through its serial console
  (the guest kernel's own /proc: pid, ppid, comm, argv, exe, uid, start time): the ground
  truth that introspection-derived `processes` facts are compared with.
- `LabProcesses(name)` is a `processes` fact provider over it (not `consistent`: the
  guest must run to answer, so it is computed after the thaw).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sva.engine.facts import FactContext, FactView, ProcessInfo
from sva.engine.model import Finding, Severity
from sva.engine.ruleload import load_rules
from sva.engine.rules import Maturity, RuleSet, default_rules_dir
from sva.errors import LabError

USER_HZ = 100  # /proc/PID/stat start times are in clock ticks of 1/USER_HZ s


def proc(
    pid: int,
    comm: str,
    *argv: str,
    ppid: int = 1,
    uid: int | None = 0,
    exe: str | None = None,
    exe_deleted: bool = False,
    start_time: int | None = None,
    task_address: int | None = None,
) -> ProcessInfo:
    """A ProcessInfo; `start_time` defaults to pid * 1000 so (pid, start_time) is unique."""
    return ProcessInfo(
        pid=pid, ppid=ppid, comm=comm, argv=tuple(argv), uid=uid, exe=exe, exe_deleted=exe_deleted,
        start_time=pid * 1000 if start_time is None else start_time, task_address=task_address,
    )  # fmt: skip


def shipped_rules(maturities: Iterable[Maturity] | None = None) -> RuleSet:
    """The rules in the repository's rules/ directory."""
    rules = load_rules(default_rules_dir())
    return rules.with_maturities(maturities) if maturities is not None else rules


@dataclass
class FunctionDetector:
    """A detector whose `detect` is `fn(facts, rules)`; counts its calls."""

    id: str
    fn: Callable[[FactView, RuleSet], Iterable[Finding]]
    needs: frozenset[str] = frozenset()
    version: str = "0.0.1"
    description: str = "a test detector"
    material_fields: frozenset[str] = frozenset()
    calls: int = field(default=0, compare=False)

    def detect(self, facts: FactView, rules: RuleSet) -> Iterable[Finding]:
        self.calls += 1
        return self.fn(facts, rules)


@dataclass(frozen=True, kw_only=True)
class TestFinding(Finding):
    """A finding kind for engine tests."""

    __test__ = False  # not a pytest test class
    kind = "test.finding"
    description = "a finding made by a test"
    default_severity = Severity.LOW


# Reads /proc with shell builtins where it can (each fork is slow under TCG). cmdline's
# NUL separators become \x1f so arguments with spaces survive.
_PS_SCRIPT = r"""echo "self $$"
for d in /proc/[0-9]*; do
  read -r s < "$d/stat" 2>/dev/null || continue
  printf 'P %s\n' "$s"
  printf 'E '; readlink "$d/exe" 2>/dev/null || echo
  while read -r k v rest; do [ "$k" = "Uid:" ] && { printf 'U %s\n' "$v"; break; }; done < "$d/status"
  printf 'A '; tr '\0' '\037' < "$d/cmdline"; echo
done 2>/dev/null
true
"""


def parse_lab_ps(output: str) -> tuple[ProcessInfo, ...]:
    """Parse `_PS_SCRIPT` output, leaving out the shell that ran it and its children."""
    self_pid = -1
    rows: dict[int, dict[str, Any]] = {}
    cur: dict[str, Any] | None = None
    for line in output.splitlines():
        if line.startswith("self "):
            self_pid = int(line.split()[1])
        elif line.startswith("P "):
            stat = line[2:]
            open_at, close_at = stat.find("("), stat.rfind(")")
            rest = stat[close_at + 1 :].split()
            if open_at < 0 or close_at < open_at or len(rest) < 20:
                raise LabError(f"unexpected /proc/PID/stat line from the guest: {stat[:120]!r}")
            pid = int(stat[:open_at])
            cur = rows[pid] = {
                "pid": pid, "ppid": int(rest[1]), "comm": stat[open_at + 1 : close_at],
                "start_time": int(rest[19]) * (1_000_000_000 // USER_HZ),
            }  # fmt: skip
        elif cur is None:
            continue
        elif line.startswith("E "):
            exe = line[2:].strip()
            deleted = exe.endswith(" (deleted)")
            cur["exe"] = exe.removesuffix(" (deleted)") or None
            cur["exe_deleted"] = deleted
        elif line.startswith("U "):
            cur["uid"] = int(line[2:].strip())
        elif line.startswith("A "):
            raw = line[2:]
            cur["argv"] = tuple(raw.rstrip("\x1f").split("\x1f")) if raw.strip() else ()
    procs = [
        ProcessInfo(**r) for pid, r in sorted(rows.items()) if self_pid not in (r["pid"], r["ppid"])
    ]
    return tuple(procs)


def lab_processes(name: str, timeout: float = 30.0) -> tuple[ProcessInfo, ...]:
    """A lab guest's processes as its own kernel reports them."""
    from sva import lab

    result = lab.exec_in(name, _PS_SCRIPT, timeout)
    if result.status != 0:
        raise LabError(f"lab {name}: listing processes failed (status {result.status}): {result.output[-200:]}")
    return parse_lab_ps(result.output)


@dataclass(frozen=True)
class LabProcesses:
    """The `processes` fact from a lab guest's own /proc (ground truth, not introspection)."""

    lab_name: str
    name: str = "processes"
    consistent: bool = False  # the guest answers over its serial console: it must be running

    def compute(self, ctx: FactContext) -> tuple[ProcessInfo, ...]:
        return lab_processes(self.lab_name)


def by_comm(procs: Sequence[ProcessInfo], comm: str) -> list[ProcessInfo]:
    return [p for p in procs if p.comm == comm]
