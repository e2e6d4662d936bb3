"""Helpers shared by the live-guest tests: running the sva CLI, and checking that `sva ps`
equals the guest's own process list at a quiescent moment."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from sva import lab

SvaRunner = Callable[..., subprocess.CompletedProcess[str]]
PsComparison = Callable[..., "PsMatch"]

# What the guest's console and scenario loops start and end around our read.
SHORT_LIVED = ("ps", "sh", "sleep", "cat", "nc")


def run_sva(*args: str, timeout: float = 180, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sva", *args], capture_output=True, text=True, timeout=timeout, check=False,
        env=dict(env) if env is not None else None,
    )  # fmt: skip


def same_comm(ours: str, proc_name: str) -> bool:
    """/proc shows workqueue workers as 'kworker/0:1-events' and long names uncut."""
    return proc_name == ours or proc_name.startswith(ours + "-") or (len(ours) == 15 and proc_name.startswith(ours))


@dataclass(frozen=True)
class PsMatch:
    processes: dict[int, dict[str, Any]]  # `sva ps --json` by pid
    stderr: str  # its progress lines: where the symbols came from


def sva_ps_equals_guest_ps(name: str, env: Mapping[str, str] | None = None) -> PsMatch:
    """Run `sva ps --json` between two of the guest's own listings and check they agree.

    Every process alive before and after our read must be in sva's list with its parent
    and name; whatever sva saw that the guest showed in neither listing must be
    short-lived. Returns sva's processes (and its progress output) for further checks."""
    before = {p.pid: p for p in lab.ps(name)}
    res = run_sva("ps", f"lab:{name}", "--json", env=env)
    after = {p.pid: p for p in lab.ps(name)}
    assert res.returncode == 0, res.stderr[-2000:]
    ours = {p["pid"]: p for p in json.loads(res.stdout)}
    stable = set(before) & set(after)
    missing = stable - set(ours)
    assert not missing, f"processes the guest shows but sva does not: {[before[p] for p in missing]}"
    for pid in stable:
        assert ours[pid]["ppid"] == before[pid].ppid, (pid, ours[pid], before[pid])
        assert same_comm(ours[pid]["comm"], before[pid].comm), (ours[pid]["comm"], before[pid].comm)
    extra = set(ours) - set(before) - set(after)
    assert all(ours[p]["comm"] in SHORT_LIVED for p in extra), [ours[p] for p in extra]
    # User processes and kernel threads are both there.
    assert any(p["ppid"] == 2 for p in ours.values()) and 1 in ours and 2 in ours
    assert all(p["task_address"] >= 0xFFFF800000000000 for p in ours.values())
    return PsMatch(ours, res.stderr)


@pytest.fixture(scope="session")
def sva_cli() -> SvaRunner:
    return run_sva


@pytest.fixture(scope="session")
def ps_comparison() -> PsComparison:
    return sva_ps_equals_guest_ps
