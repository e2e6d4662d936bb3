"""The QMP allow-list proxy against real QEMUs: the session lab guest (sva's own backend
through the proxy, refusals while the guest keeps running) and minimal `-machine none`
QEMUs for the connection-handling cases (malformed input, queueing, upstream loss)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sva import lab
from sva.errors import ConfigError
from sva.lab import LabGuest
from sva.qmpproxy.policy import AllowList
from sva.vmi import open_target
from tests.appliance.conftest import wait_for_path

QemuStarter = Callable[[Path], subprocess.Popen[bytes]]


def start_proxy(args: list[str], stderr: Path, wait: Path | None) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-m", "sva", "qmp-proxy", "-v", *args],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr.open("wb"))  # fmt: skip
    if wait is not None:
        try:
            wait_for_path(wait, proc=p)
        except AssertionError:
            p.kill()
            raise AssertionError(f"{wait} not created; proxy said: {stderr.read_text()}") from None
    return p


def stop_proxy(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


class Client:
    """A raw QMP client that shows exactly what the proxy sends back."""

    def __init__(self, path: Path, timeout: float = 5.0, handshake: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        if handshake:
            assert "QMP" in self.read()
            assert self.request({"execute": "qmp_capabilities"}) == {"return": {}}

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("proxy closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, req: dict[str, Any] | bytes) -> dict[str, Any]:
        """Send one request, return its reply (events before it are skipped)."""
        self.send_raw(req if isinstance(req, bytes) else json.dumps(req).encode() + b"\n")
        while True:
            msg = self.read()
            if "event" not in msg:
                return msg

    def close(self) -> None:
        self.sock.close()


# -- through the session lab guest -----------------------------------------------------------

@pytest.fixture(scope="module")
def lab_proxy(lab_guest: LabGuest) -> Iterator[Path]:
    """The session lab guest's QMP behind a proxy (module-wide: one proxy process)."""
    d = Path(tempfile.mkdtemp(prefix="sva-ap-"))
    sock = d / "p.sock"
    p = start_proxy(["--upstream", lab_guest.qmp_path, "--listen", str(sock)], d / "proxy.log", sock)
    try:
        yield sock
    finally:
        stop_proxy(p)
        shutil.rmtree(d, ignore_errors=True)


def test_sva_backend_works_through_the_proxy(lab_guest: LabGuest, lab_proxy: Path) -> None:
    with open_target(f"qemu:{lab_proxy}") as b:
        # The RAM file path and the layout come through qom-get and `info mtree -f`.
        assert b.path == lab_guest.mem_path
        assert b.memory_size == lab_guest.mem_size
        assert b.vcpu_count >= 1
        regs = b.regs(0)  # `info registers -a`
        assert regs.cr3 != 0 and regs.rip != 0
        with b.frozen() as rec:
            assert b.status() == "paused"
            region = next(iter(b.memory_map))
            gpa = region.gpa + 0x100000
            data = b.read(gpa, 4096)
            with open(lab_guest.mem_path, "rb") as f:
                f.seek(region.offset + 0x100000)
                assert data == f.read(4096)
        assert rec.seconds > 0
        assert b.status() == "running"
    # The network inventory's questions (query-rx-filter, query-name) pass too.
    from sva.net.inventory import from_qmp

    inv = from_qmp(str(lab_proxy), name="through-proxy")
    assert lab_guest.mac.lower() in {m.lower() for vm in inv.vms for m in vm.macs}


REFUSED: list[dict[str, Any]] = [
    {"execute": "system_reset"},
    {"execute": "quit"},
    {"execute": "system_powerdown"},
    {"execute": "device_del", "arguments": {"id": "net0"}},
    {"execute": "device_add", "arguments": {"driver": "virtio-rng-pci"}},
    {"execute": "object-add", "arguments": {"qom-type": "rng-random", "id": "r0"}},
    {"execute": "qom-set", "arguments": {"path": "/machine", "property": "x", "value": 1}},
    {"execute": "inject-nmi"},
    {"execute": "send-key", "arguments": {"keys": [{"type": "qcode", "data": "a"}]}},
    {"execute": "migrate", "arguments": {"uri": "exec:touch {tmp}/migrated"}},
    {"execute": "pmemsave", "arguments": {"val": 0, "size": 4096, "filename": "{tmp}/pmem"}},
    {"execute": "memsave", "arguments": {"val": 0, "size": 4096, "filename": "{tmp}/vmem"}},
    {"execute": "screendump", "arguments": {"filename": "{tmp}/screen.ppm"}},
    {"execute": "dump-guest-memory", "arguments": {"paging": False, "protocol": "file:{tmp}/dump"}},
    {"execute": "netdev_del", "arguments": {"id": "n0"}},
    {"execute": "set_link", "arguments": {"name": "n0", "up": False}},
    {"execute": "query-version"},  # harmless, but not something sva asks
    {"execute": "human-monitor-command", "arguments": {"command-line": "info version"}},
    {"execute": "human-monitor-command", "arguments": {"command-line": "system_reset"}},
    {"execute": "human-monitor-command", "arguments": {"command-line": "info registers"}},
    {"execute": "human-monitor-command", "arguments": {"command-line": "info registers -a "}},
    {"execute": "human-monitor-command", "arguments": {"command-line": "info mtree -f\nsystem_reset"}},
    {"execute": "human-monitor-command", "arguments": {"command-line": "xp /8x 0"}},
    {"execute": "human-monitor-command", "arguments": {"command-line": "pmemsave 0 4096 {tmp}/h"}},
    {"execute": "human-monitor-command", "arguments": {"command-line": "info registers -a", "cpu-index": 0}},
    {"execute": "qom-list", "arguments": {"path": "/machine"}},
    {"execute": "qom-get", "arguments": {"path": "/machine", "property": "type"}},
    {"execute": "qom-get", "arguments": {"path": "/objects/mem", "property": "prealloc-threads"}},
    {"execute": "qom-get", "arguments": {"path": "/objects/../machine", "property": "size"}},
    {"execute": "stop", "arguments": {"x": 1}},
    {"execute": "query-status", "arguments": {"extra": True}},
]


def test_everything_outside_the_allow_list_is_refused(lab_guest: LabGuest, lab_proxy: Path, tmp_path: Path) -> None:
    c = Client(lab_proxy)
    try:
        for i, template in enumerate(REFUSED):
            req = json.loads(json.dumps(template).replace("{tmp}", str(tmp_path)))
            req["id"] = {"n": i}
            reply = c.request(req)
            assert set(reply) == {"error", "id"}, (req, reply)
            assert reply["id"] == {"n": i}
            assert reply["error"]["class"] == "GenericError"
            assert reply["error"]["desc"].startswith(f"sva qmp-proxy: command '{req['execute']}' is not allowed"), reply
        assert c.request({"execute": "query-status"})["return"]["status"] == "running"
    finally:
        c.close()
    assert list(tmp_path.iterdir()) == [], "a refused command wrote a host file"
    assert lab.get(lab_guest.name).is_running()
    r = lab.exec_in(lab_guest.name, "echo still-here", timeout=20)
    assert r.status == 0 and "still-here" in r.output


def test_allowed_hmp_lines_pass(lab_proxy: Path) -> None:
    c = Client(lab_proxy)
    try:
        for line, needle in (("info registers -a", "RIP="), ("info mtree -f", "FlatView")):
            reply = c.request({"execute": "human-monitor-command", "arguments": {"command-line": line}, "id": 1})
            assert reply["id"] == 1 and needle in reply["return"]
    finally:
        c.close()


# -- connection handling, against minimal QEMUs ------------------------------------------------

@pytest.fixture
def proxied(bare_qemu: QemuStarter, short_dir: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes], Path]]:
    """(proxy socket, the QEMU behind it, the proxy's log)."""
    qemu = bare_qemu(short_dir / "up.sock")
    sock, log = short_dir / "p.sock", short_dir / "proxy.log"
    p = start_proxy(["--upstream", str(short_dir / "up.sock"), "--listen", str(sock), "--mode", "0660"], log, sock)
    try:
        yield sock, qemu, log
    finally:
        stop_proxy(p)


def test_malformed_input_gets_an_error_and_the_session_goes_on(proxied: tuple[Path, Any, Path]) -> None:
    sock, _, _ = proxied
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    c = Client(sock)
    try:
        bad = [b"not json", b"[1, 2]", b'"execute"', b'{"execute": 5}', b'{"arguments": {}}',
               b'{"execute": "stop", "arguments": [1]}', b'{"execute": "stop", "control": {}}',
               b'{"exec-oob": "stop", "id": 3}', b'{"execute": "query-status", "x": NaN}',
               b'\xff\xfe{"execute": "stop"}', b"[" * 30000, b'{"execute": "stop"']  # fmt: skip
        for line in bad:
            reply = c.request(line + b"\n")
            assert set(reply) == {"error"} and reply["error"]["class"] == "GenericError", (line[:40], reply)
            assert reply["error"]["desc"].startswith("sva qmp-proxy: ")
        c.send_raw(b"\n  \n")  # blank lines are skipped, as QEMU does
        assert c.request({"execute": "query-status", "id": "after"}) == {
            "return": {"status": "running", "singlestep": False, "running": True}, "id": "after"}
        # Over the line limit: an error, then the proxy hangs up.
        c.send_raw(b'{"execute": "' + b"a" * 70000 + b'"}\n')
        assert "longer than" in c.read()["error"]["desc"]
        with pytest.raises((EOFError, ConnectionResetError)):
            c.read()
    finally:
        c.close()
    c2 = Client(sock)  # and the next client is served
    assert c2.request({"execute": "query-status"})["return"]["running"] is True
    c2.close()


def test_events_pass_through(proxied: tuple[Path, Any, Path]) -> None:
    c = Client(proxied[0])
    try:
        c.send_raw(b'{"execute": "stop"}\n')
        msgs = [c.read(), c.read()]
        assert msgs[0]["event"] == "STOP" and msgs[1] == {"return": {}}
        c.send_raw(b'{"execute": "cont"}\n')
        msgs = [c.read(), c.read()]
        assert {"RESUME"} == {m.get("event") for m in msgs if "event" in m}
        assert {"return": {}} in msgs
    finally:
        c.close()


def test_one_client_at_a_time_the_next_waits(proxied: tuple[Path, Any, Path]) -> None:
    a = Client(proxied[0])
    b = Client(proxied[0], handshake=False, timeout=0.7)
    try:
        with pytest.raises(socket.timeout):
            b.read()  # no greeting while `a` holds the monitor
        a.close()
        b.sock.settimeout(5)
        assert "QMP" in b.read()
    finally:
        a.close()
        b.close()


def test_upstream_gone_disconnects_the_client(proxied: tuple[Path, subprocess.Popen[bytes], Path]) -> None:
    sock, qemu, log = proxied
    c = Client(sock)
    qemu.kill()
    qemu.wait(5)
    t0 = time.monotonic()
    with pytest.raises((EOFError, ConnectionResetError)):
        try:
            c.read()
        except socket.timeout:
            raise AssertionError("still connected; proxy log:\n" + log.read_text()) from None
    assert time.monotonic() - t0 < 5
    c.close()
    deadline = time.monotonic() + 5
    while "closed (QEMU gone?)" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "upstream" in log.read_text() and "client disconnected" in log.read_text()
    # A client arriving now is told nothing and closed (the upstream is not there).
    late = Client(sock, handshake=False)
    with pytest.raises((EOFError, ConnectionResetError)):
        late.read()
    late.close()


def test_directory_mode_follows_vms(bare_qemu: QemuStarter, short_dir: Path) -> None:
    qa = bare_qemu(short_dir / "up" / "vma" / "qmp.sock")
    bare_qemu(short_dir / "up" / "vmb" / "qmp.sock")
    (short_dir / "up" / "vmc").mkdir()
    (short_dir / "up" / "vmc" / "qmp.sock").write_text("not a socket")
    px = short_dir / "px"
    p = start_proxy(["--upstream-glob", f"{short_dir}/up/*/qmp.sock", "--listen-dir", str(px), "--mode", "0600"],
                    short_dir / "log", px / "vmb" / "qmp.sock")  # fmt: skip
    try:
        wait_for_path(px / "vma" / "qmp.sock")
        assert not (px / "vmc").exists()
        for name in ("vma", "vmb"):
            c = Client(px / name / "qmp.sock")
            assert c.request({"execute": "quit", "id": 1})["error"]["desc"] == "sva qmp-proxy: command 'quit' is not allowed"
            assert c.request({"execute": "query-status"})["return"]["running"] is True
            c.close()
        qa.kill()
        qa.wait(5)
        os.unlink(short_dir / "up" / "vma" / "qmp.sock")  # QEMU killed leaves its socket file
        deadline = time.monotonic() + 8
        while (px / "vma" / "qmp.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (px / "vma" / "qmp.sock").exists()
        assert (px / "vmb" / "qmp.sock").exists()
    finally:
        stop_proxy(p)
    assert p.returncode == 0


def test_stdio_mode_as_a_guestfwd_command(bare_qemu: QemuStarter, short_dir: Path) -> None:
    """QEMU's guestfwd `cmd:` gives the program one socket as stdin, stdout and stderr: the
    proxy must keep its log lines out of that stream."""
    bare_qemu(short_dir / "up.sock")
    ours, theirs = socket.socketpair()
    with theirs:
        p = subprocess.Popen([sys.executable, "-m", "sva", "qmp-proxy", "-v", "--upstream", str(short_dir / "up.sock"),
                              "--stdio"], stdin=theirs, stdout=theirs, stderr=theirs)  # fmt: skip
    try:
        ours.settimeout(15)
        data = b""
        # One request at a time, as a real client talks (data arriving on the socket must
        # not be mistaken for the peer closing it).
        for n, req in enumerate((b"", b'{"execute":"qmp_capabilities"}\n', b'{"execute":"quit","id":9}\n',
                                 b'{"execute":"query-status","id":10}\n'), 1):  # fmt: skip
            ours.sendall(req)
            while data.count(b"\n") < n:
                chunk = ours.recv(65536)
                assert chunk, data
                data += chunk
        ours.shutdown(socket.SHUT_WR)
        assert p.wait(10) == 0
        data += ours.recv(65536)
    finally:
        ours.close()
        if p.poll() is None:
            p.kill()
            p.wait(5)
    lines = [json.loads(x) for x in data.splitlines()]  # nothing but QMP in the stream
    assert len(lines) == 4, data
    assert "QMP" in lines[0] and lines[1] == {"return": {}}
    assert lines[2] == {"error": {"class": "GenericError", "desc": "sva qmp-proxy: command 'quit' is not allowed"},
                        "id": 9}  # fmt: skip
    assert lines[3]["id"] == 10 and lines[3]["return"]["running"] is True


def test_stdio_mode_over_pipes(bare_qemu: QemuStarter, short_dir: Path) -> None:
    bare_qemu(short_dir / "up.sock")
    p = subprocess.Popen([sys.executable, "-m", "sva", "qmp-proxy", "--upstream", str(short_dir / "up.sock"), "--stdio"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert p.stdin is not None and p.stdout is not None
    try:
        assert "QMP" in json.loads(p.stdout.readline())
        for req, want in ((b'{"execute":"qmp_capabilities"}', {"return": {}}),
                          (b'{"execute":"system_reset","id":1}', {"error": {"class": "GenericError",
                           "desc": "sva qmp-proxy: command 'system_reset' is not allowed"}, "id": 1})):  # fmt: skip
            p.stdin.write(req + b"\n")
            p.stdin.flush()
            assert json.loads(p.stdout.readline()) == want
        p.stdin.close()
        assert p.wait(10) == 0
        assert p.stderr is not None and b"refused: command 'system_reset'" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)


# -- policy and options ----------------------------------------------------------------------

def test_policy_extras_are_explicit_and_never_open_writes() -> None:
    base = AllowList()
    assert not base.check("dump-guest-memory", {"paging": False, "protocol": "file:/x"}).allowed
    extra = AllowList.build(["dump-guest-memory"], ["info cpus"])
    assert extra.check("dump-guest-memory", {"paging": False, "protocol": "file:/x"}).allowed
    assert extra.check("human-monitor-command", {"command-line": "info cpus"}).allowed
    assert not extra.check("human-monitor-command", {"command-line": "info cpus "}).allowed
    assert base.check("qom-get", {"path": "/objects/ram0", "property": "mem-path"}).allowed
    for cmd in ("human-monitor-command", "pmemsave", "qom-set", "migrate", "device_add"):
        with pytest.raises(ConfigError, match=cmd):
            AllowList.build([cmd])
    with pytest.raises(ConfigError, match="only 'info"):
        AllowList.build([], ["system_reset"])


def test_every_qmp_command_sva_issues_is_allowed() -> None:
    """Drift guard: a new `qmp.execute("X")` / `qmp.hmp("…")` in sva must be added to the
    allow-list (or it would fail in the appliance). sva/testing.py (test helpers) and
    sva/lab (the lab's own QEMU management) do not go through the proxy."""
    root = Path(__file__).resolve().parents[2] / "sva"
    policy = AllowList()
    seen = set()
    for src in root.rglob("*.py"):
        rel = src.relative_to(root).as_posix()
        if rel == "testing.py" or rel.startswith(("lab/", "qmpproxy/")):
            continue
        text = src.read_text()
        for cmd in re.findall(r"\.execute\(\s*\"([a-z_-]+)\"", text):
            seen.add(cmd)
            if cmd != "human-monitor-command":
                # Arguments are checked per call site below where they are literal; the
                # command itself must be known.
                assert cmd in ("qom-list", "qom-get") or policy.check(cmd, {}).allowed, f"{rel}: {cmd}"
        for line in re.findall(r"\.hmp\(\s*\"([^\"]+)\"", text):
            seen.add(line)
            assert policy.check("human-monitor-command", {"command-line": line}).allowed, f"{rel}: hmp {line!r}"
    assert {"stop", "cont", "query-status", "info registers -a", "info mtree -f"} <= seen  # the scan works


def test_cli_rejects_a_forbidden_extra_with_status_2(short_dir: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "sva", "qmp-proxy", "--upstream", "/nonexistent", "--listen",
                        str(short_dir / "p.sock"), "--allow-extra", "pmemsave"], capture_output=True, text=True,
                       timeout=20)  # fmt: skip
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "--allow-extra pmemsave" in p.stderr
