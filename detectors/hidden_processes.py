"""Hidden processes: a live task that one kernel view shows and another does not.

Cross-view detection over the `task_views` fact (sva.guest.views): the task list, the PID
allocator, a scan of RAM for task structures and the CPUs' run queues, all taken in one
freeze. A rootkit that unlinks a task from the task list (DKOM) hides it from ps and
/proc, but the task stays in the PID allocator, in memory and, whenever it is runnable,
on a run queue. Exited tasks (zombie, dead) are left out: they leave the structures one
after another. A view that was cut short (bound, deadline, failure) or that lists only
some tasks by design (the run queues: runnable tasks only) cannot prove an absence, so
it only counts as a witness.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from sva.engine.facts import FactView
from sva.engine.model import Finding, Severity
from sva.engine.rules import HiddenTaskRule, RuleSet
from sva.guest.views import TaskSighting, TaskViews


@dataclass(frozen=True, kw_only=True)
class HiddenProcess(Finding):
    kind: ClassVar[str] = "rootkit.hidden_process"
    description: ClassVar[str] = "a live process missing from some kernel views of the tasks (DKOM rootkit)"
    default_severity: ClassVar[Severity] = Severity.CRITICAL


class HiddenProcesses:
    id = "hidden_processes"
    version = "1.1.0"
    description = "processes unlinked from the task list or PID allocator but still alive (cross-view)"
    needs = frozenset({"task_views"})
    material_fields = frozenset({"seen_by", "missing_from"})

    def detect(self, facts: FactView, rules: RuleSet) -> Iterator[Finding]:
        views: TaskViews = facts["task_views"]
        for rule in rules.of_kind(HiddenTaskRule):
            yield from self.check(rule, views)

    def check(self, rule: HiddenTaskRule, views: TaskViews) -> Iterator[Finding]:
        selected = [v for v in views.views if v.name in rule.views]
        complete = {v.name for v in selected if v.complete}
        seen: dict[int, dict[str, TaskSighting]] = {}  # phys address -> view -> sighting
        exited: set[int] = set()
        for view in selected:
            for s in view.tasks:
                if s.exit_state:
                    exited.add(s.phys_address)
                seen.setdefault(s.phys_address, {})[view.name] = s
        for phys, by_view in sorted(seen.items()):
            if phys in exited:
                continue
            missing = sorted(complete - set(by_view))
            if not missing:
                continue
            s = next((by_view[n] for n in ("task_list", "pid_idr", "run_queue", "memory_scan") if n in by_view), None) or next(
                iter(by_view.values())
            )
            if s.comm in rule.allow_comms:
                continue
            address = f"0x{s.task_address:x}" if s.task_address else None
            yield HiddenProcess(
                rule=rule.id, title=f"{rule.title}: pid {s.pid} ({s.comm}) missing from {', '.join(missing)}",
                severity=rule.severity, mitre=rule.mitre, subject=("task", f"0x{phys:x}"),
                evidence={"pid": s.pid, "comm": s.comm, "task_address": address, "task_phys_address": f"0x{phys:x}",
                          "seen_by": sorted(by_view), "missing_from": missing},
            )  # fmt: skip


DETECTOR = HiddenProcesses()
