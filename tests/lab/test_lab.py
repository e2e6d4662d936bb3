"""Lab guests for real: boot, exec, ps and teardown through the CLI and the Python API.

Most tests share the session's infected guest (tests/conftest.py); two boot their own:
a 3 GiB guest driven through the CLI, and one with a user kernel path and an extra
initramfs tree whose QEMU is then killed behind sva's back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yara

from sva import lab
from sva.errors import LabError
from sva.lab import initscript, serial
from sva.lab.guest import parse_ps
from sva.lab.paths import check_name, parse_mem
from sva.lab.scenarios import INFECTED, MARKER, MARKER_ENV, MARKER_PIECES, MARKER_RULE, MARKER_RULE_FILE

REPO = Path(__file__).resolve().parents[2]


def sva(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "sva", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("sva lab: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0]


def qemu_alive(pid: int) -> bool:
    try:
        return b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# -- no VM needed ------------------------------------------------------------------------


def test_marker_rule_matches_the_scenario_marker() -> None:
    rules = yara.compile(filepath=str(REPO / MARKER_RULE_FILE))
    matches = rules.match(data=b"\0junk " + MARKER.encode() + b" junk\0")
    assert [m.rule for m in matches] == [MARKER_RULE]
    meta = matches[0].meta
    assert meta["author"] == "sva" and meta["mitre"] == "T1055" and meta["description"]
    assert rules.match(data=MARKER[:-1].encode()) == []
    assert MARKER.startswith("SVA-LAB-MARKER-")


def test_init_script_only_has_the_marker_in_pieces() -> None:
    script = initscript.render()
    assert MARKER not in script
    assert all(piece in script for piece in MARKER_PIECES)


@pytest.mark.parametrize(
    ("text", "size"), [("256M", 256 << 20), ("3G", 3 << 30), ("512", 512 << 20), ("1g", 1 << 30), ("128MiB", 128 << 20)]
)
def test_parse_mem(text: str, size: int) -> None:
    assert parse_mem(text) == size


@pytest.mark.parametrize("text", ["100M", "lots", "0", "1.5G", "200K", "", "-256M", "100T"])
def test_parse_mem_rejects(text: str) -> None:
    with pytest.raises(LabError, match="memory size"):
        parse_mem(text)


@pytest.mark.parametrize("name", ["", "A", "-x", "x" * 33, "a b", "../x", "a/b", "lab!"])
def test_bad_names(name: str) -> None:
    with pytest.raises(LabError, match="name"):
        check_name(name)


def test_parse_ps_keeps_odd_comms_and_drops_itself() -> None:
    out = (
        "self 50\n"
        "P 1 (init) S 0 1 1 0\nA /bin/sh /init \n"
        "P 7 (a) b (c)) S 1 7 7 0\nA \n"
        "P 50 (sh) S 10 50 50 0\nA sh -c x \n"
        "P 51 (tr) R 50 50 50 0\n"
    )
    assert parse_ps(out) == [
        lab.GuestProcess(1, 0, "init", "/bin/sh /init"),
        lab.GuestProcess(7, 1, "a) b (c)", ""),
    ]


def test_wrapped_command_never_spells_its_markers() -> None:
    command = "echo " + "x" * 5000 + "; exit 3"
    sent = serial.wrap(command, "0123456789abcdef")
    assert b"__SVA_B_0123456789abcdef" not in sent and b"__SVA_E_0123456789abcdef" not in sent
    assert max(len(line) for line in sent.split(b"\n")) < 1024  # far below a tty line's 4095


# -- the session's infected guest --------------------------------------------------------


@pytest.mark.lab
def test_session_guest_record(lab_guest: lab.LabGuest) -> None:
    g = lab.get(lab_guest.name)
    assert g == lab_guest and g.is_running()
    assert stat.S_ISSOCK(os.stat(g.qmp_path).st_mode)
    assert stat.S_ISSOCK(os.stat(g.serial_path).st_mode)
    assert stat.S_ISSOCK(os.stat(g.mirror_path).st_mode)
    assert os.path.getsize(g.mem_path) == g.mem_size == 256 << 20
    assert g.scenario == "infected" and g.accel in ("tcg", "kvm") and g.network
    assert g.kernel_package and g.kernel_package.startswith(f"linux-image-{g.kernel_version}-unsigned ")
    assert lab.exec_in(g.name, "uname -r").output.strip() == g.kernel_version
    assert lab_guest.name in [x.name for x in lab.list_guests()]

    listed = sva("lab", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    mine = [x for x in json.loads(listed.stdout) if x["name"] == g.name]
    assert mine and mine[0]["running"] and mine[0]["qmp_path"] == g.qmp_path


@pytest.mark.lab
def test_cli_exec_output_and_exit_status(lab_guest: lab.LabGuest) -> None:
    res = sva("lab", "exec", lab_guest.name, "--", "echo hello; echo oops >&2; exit 3")
    assert res.returncode == 3, res.stderr
    assert res.stdout == "hello\noops\n"
    res = sva("lab", "exec", lab_guest.name, "--timeout", "20", "--", "ls", "-d", "/proc/1")
    assert (res.returncode, res.stdout) == (0, "/proc/1\n")


@pytest.mark.lab
def test_exec_long_quoted_command(lab_guest: lab.LabGuest) -> None:
    command = "echo " + "x" * 20000 + " | wc -c; echo \"q $HOME \\\" ' done\"; printf 'a\\tb'"
    assert lab.exec_in(lab_guest.name, command) == lab.ExecResult(0, "20001\nq /root \" ' done\na\tb")


@pytest.mark.lab
def test_exec_backgrounded_command_returns(lab_guest: lab.LabGuest) -> None:
    t0 = time.monotonic()
    res = lab.exec_in(lab_guest.name, "sleep 300 >/dev/null 2>&1 & echo $!", timeout=20)
    assert res.status == 0 and time.monotonic() - t0 < 15
    pid = int(res.output)
    assert lab.exec_in(lab_guest.name, f"cat /proc/{pid}/comm").output == "sleep\n"
    assert lab.exec_in(lab_guest.name, f"kill {pid}").status == 0


@pytest.mark.lab
def test_exec_concurrent_callers_are_serialized(lab_guest: lab.LabGuest) -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: lab.exec_in(lab_guest.name, f"echo call{i}; exit {i}"), range(8)))
    assert results == [lab.ExecResult(i, f"call{i}\n") for i in range(8)]


@pytest.mark.lab
def test_exec_timeout_interrupts_and_console_recovers(lab_guest: lab.LabGuest) -> None:
    with pytest.raises(LabError, match=r"within 2s.*interrupted.*output so far: started"):
        lab.exec_in(lab_guest.name, "echo started; sleep 120", timeout=2)
    assert lab.exec_in(lab_guest.name, "echo back", timeout=20) == lab.ExecResult(0, "back\n")


@pytest.mark.lab
def test_ps_shows_the_infected_processes_with_their_parents(lab_guest: lab.LabGuest) -> None:
    procs = lab.ps(lab_guest.name)
    by_pid = {p.pid: p for p in procs}
    assert by_pid[1].comm == "init"
    found = {}
    for expected in INFECTED.processes:
        matches = [p for p in procs if expected.matches(p.comm, p.args)]
        assert matches, f"no {expected.role} ({expected.comm}) in guest ps: {procs}"
        proc = found[expected.role] = matches[0]
        assert by_pid[proc.ppid].comm == expected.parent_comm, (expected, proc)
    # The reverse shell: nc and `sh -i` are siblings under the loop shell, which init started.
    nc, sh_i, loop = found["reverse_shell"], found["reverse_shell_sh"], found["reverse_shell_loop"]
    assert nc.ppid == sh_i.ppid == loop.pid and loop.ppid == 1
    assert found["marker_holder"].ppid == 1 and found["coin_miner"].ppid == 1

    res = sva("lab", "ps", lab_guest.name, "--json")
    assert res.returncode == 0, res.stderr
    cli = {(p["pid"], p["ppid"], p["comm"]) for p in json.loads(res.stdout)}
    assert {(p.pid, p.ppid, p.comm) for p in found.values()} <= cli


@pytest.mark.lab
def test_marker_is_in_the_holders_memory_and_guest_ram(lab_guest: lab.LabGuest) -> None:
    holder = next(p for p in lab.ps(lab_guest.name) if p.comm == INFECTED.process("marker_holder").comm)
    # Hash it in the guest, so this test itself puts no copy of the marker in guest memory.
    environ = f"/proc/{holder.pid}/environ"
    res = lab.exec_in(lab_guest.name, f"tr '\\0' '\\n' < {environ} | sed -n 's/^{MARKER_ENV}=//p' | sha256sum")
    assert res.output.split()[0] == hashlib.sha256(MARKER.encode() + b"\n").hexdigest()
    rules = yara.compile(filepath=str(REPO / MARKER_RULE_FILE))
    assert [m.rule for m in rules.match(lab_guest.mem_path)] == [MARKER_RULE]
    initrd = Path(lab_guest.initrd_path).read_bytes()
    assert MARKER.encode() not in initrd and b"bin/busybox" in initrd


@pytest.mark.lab
def test_reverse_shell_reaches_the_c2_file(lab_guest: lab.LabGuest) -> None:
    c2 = Path(lab_guest.c2_log)
    deadline = time.monotonic() + 30
    while b"# " not in c2.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"# " in c2.read_bytes(), "the reverse shell's prompt never reached the C2 address"


@pytest.mark.lab
def test_nic_traffic_is_mirrored_and_dumped(lab_guest: lab.LabGuest) -> None:
    assert Path(lab_guest.pcap_path).read_bytes()[:4] in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mirror:
        mirror.connect(lab_guest.mirror_path)
        mirror.settimeout(0.5)
        time.sleep(0.2)  # let QEMU accept before the guest sends
        assert lab.exec_in(lab_guest.name, "ping -c 2 -W 1 10.0.2.2 >/dev/null; echo $?").output == "0\n"
        data = b""
        deadline = time.monotonic() + 10
        while len(data) < 4 and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                data += mirror.recv(65536)
    # filter-mirror frames: a 4-byte big-endian length, then the Ethernet frame.
    assert len(data) >= 4 and 14 <= int.from_bytes(data[:4], "big") <= 65535


# -- guests of their own -------------------------------------------------------------------


@pytest.mark.lab
def test_cli_lifecycle_of_a_3g_guest() -> None:
    name = f"g{os.getpid()}"
    res = sva("lab", "up", name, "--mem", "3G", "--json")
    assert res.returncode == 0, res.stderr
    try:
        g = json.loads(res.stdout)
        assert g["name"] == name and g["mem_size"] == 3 << 30 and qemu_alive(g["pid"])
        assert_one_line_error(sva("lab", "up", name), "already running")
        meminfo = sva("lab", "exec", name, "--", "grep MemTotal /proc/meminfo")
        assert meminfo.returncode == 0 and int(meminfo.stdout.split()[1]) > 2_800_000  # kB
        human = sva("lab", "list")
        assert any(line.split()[:2] == [name, "running"] for line in human.stdout.splitlines())
    finally:
        down = sva("lab", "down", name)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stderr
    assert not qemu_alive(g["pid"]) and not Path(g["runtime_dir"]).exists()
    assert name not in [x["name"] for x in json.loads(sva("lab", "list", "--json").stdout)]
    assert_one_line_error(sva("lab", "exec", name, "--", "true"), "no lab guest named")


@pytest.mark.lab
def test_user_kernel_extra_tree_and_a_qemu_that_died(lab_guest: lab.LabGuest, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    (extra / "etc" / "sva-lab").mkdir(parents=True)
    (extra / "hello.txt").write_text("from the host\n")
    rc = extra / "etc" / "sva-lab" / "rc"
    rc.write_text("#!/bin/sh\necho hook ran > /tmp/hook.out\n")
    rc.chmod(0o755)
    name = f"k{os.getpid()}"
    g = lab.up(name, mem="128M", kernel=lab_guest.kernel_path, initrd_extra=extra)
    try:
        assert g.kernel_version == lab_guest.kernel_version and g.kernel_package is None and g.network
        assert lab.exec_in(name, "cat /hello.txt; sleep 0.5; cat /tmp/hook.out").output == "from the host\nhook ran\n"
        os.kill(g.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while g.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LabError, match="no longer running"):
            lab.get(name)
        assert name not in [x.name for x in lab.list_guests()]
        assert name in [x.name for x in lab.list_guests(include_stopped=True)]
    finally:
        stopped = lab.down(name)
    assert stopped is False and not Path(g.runtime_dir).exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("exec", "nosuchlab", "--", "true"), "no lab guest named 'nosuchlab'"),
        (("ps", "nosuchlab"), "no lab guest named"),
        (("down", "nosuchlab"), "no lab guest named"),
        (("up", "x1", "--mem", "64M"), "too small"),
        (("up", "x1", "--mem", "lots"), "memory size"),
        (("up", "Bad!Name"), "name 'Bad!Name' is not valid"),
        (("up", "x1", "--kernel", "/nonexistent/bzImage"), "kernel /nonexistent/bzImage: no such file"),
        (("up", "x1", "--scenario", "pwned"), "unknown lab scenario"),
        (("up", "x1", "--accel", "xen"), "accelerator"),
        (("up", "x1", "--initrd-extra", "/nonexistent"), "not a directory"),
    ],
)
def test_cli_bad_input_is_one_line(args: tuple[str, ...], needle: str) -> None:
    assert_one_line_error(sva("lab", *args), needle)


@pytest.mark.lab
def test_reset_reboots_in_place_while_the_qmp_socket_is_held() -> None:
    from sva.vmi.qmp import QmpClient

    name = f"rst{os.getpid()}"
    g = lab.up(name, scenario="clean")
    boot_id = "cat /proc/sys/kernel/random/boot_id"
    try:
        before = lab.exec_in(name, boot_id).output.strip()
        with QmpClient(g.qmp_path, timeout=5) as held:  # as sva holds it
            lab.reset(name)
            deadline = time.monotonic() + 120
            after = before
            while (after == before or len(after) != 36) and time.monotonic() < deadline:
                with contextlib.suppress(LabError):
                    after = lab.exec_in(name, boot_id, timeout=10).output.strip()
                time.sleep(0.5)
            assert len(before) == 36 and after != before and len(after) == 36, (before, after)
            assert held.execute("query-status")["status"] == "running"  # the same QEMU
        assert lab.get(name).pid == g.pid and lab.get(name).is_running()
    finally:
        lab.down(name)
