"""The supervisor without guests: discovery of QMP sockets, unreachable and destroyed VMs
(a plain unix socket that does not speak QMP stands for a broken VM), the metrics
exposition over real HTTP, the daemon's `--check`. Real bus, real CURVE subscriber."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sva.bus.event import Event, EventType
from sva.bus.subscriber import BusSubscriber
from sva.bus.testing import make_keys
from sva.daemon.config import load
from sva.daemon.metrics import Metrics, MetricsServer, MetricType
from sva.daemon.supervisor import Daemon


def _wait(sub: BusSubscriber, reason: str, vm: str, timeout: float = 20) -> Event:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = sub.recv(timeout=0.5)
        if ev is not None and ev.type is EventType.HEALTH:
            d = ev.payload.get("details", {})
            if d.get("reason") == reason and d.get("vm") == vm:
                return ev
    raise AssertionError(f"no {reason} health event for {vm}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, BusSubscriber, Path]]:
    security = make_keys(tmp_path / "keys")
    vms = tmp_path / "vms"
    (vms / "web01").mkdir(parents=True)
    cfg = tmp_path / "sva.toml"
    cfg.write_text(f"""
[bus]
endpoint = "tcp://127.0.0.1:*"
replay_endpoint = "tcp://127.0.0.1:*"
journal = "journal"
keys_dir = "keys"
heartbeat_s = 0.2
[defaults]
retry = 0.2
gone_after = 1.0
[discovery]
patterns = ["{vms}/*/qmp.sock"]
poll = 0.2
[metrics]
port = 0
""")
    d = Daemon(load(cfg))
    d.start()
    sub = BusSubscriber(d.bus.endpoint, d.bus.replay_endpoint, security=security, since=0)
    try:
        yield d, sub, vms
    finally:
        sub.close()
        d.shutdown()


def test_discovered_vm_unreachable_then_destroyed_and_forgotten(daemon: tuple[Daemon, BusSubscriber, Path]) -> None:
    d, sub, vms = daemon
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(vms / "web01" / "qmp.sock"))  # bound, not listening: connections are refused
    try:
        ev = _wait(sub, "unreachable", "web01")
        assert ev.payload["component"] == "vmi" and ev.payload["status"] == "error"
        assert ev.topic == "sva.health.vmi"
        assert "web01" in d.workers and d.workers["web01"].target.discovered
    finally:
        sock.close()
        (vms / "web01" / "qmp.sock").unlink()
    _wait(sub, "destroyed", "web01")
    deadline = time.monotonic() + 5
    while ("web01" in d.workers or 'vm="web01"' in d.metrics.render()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "web01" not in d.workers
    assert 'vm="web01"' not in d.metrics.render()


def test_metrics_exposition_over_http() -> None:
    m = Metrics()
    m.family("x_total", MetricType.COUNTER, "help with \\ and\nnewline")
    m.inc("x_total", 2, vm='a"b\\c')
    m.collector(lambda: [("x_total", {"vm": "live"}, 7.5)])
    server = MetricsServer(m, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(server.url, timeout=5) as r:
            text = r.read().decode()
            assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert text.splitlines() == [
            "# HELP x_total help with \\\\ and\\nnewline",
            "# TYPE x_total counter",
            'x_total{vm="a\\"b\\\\c"} 2',
            'x_total{vm="live"} 7.5',
        ]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url.replace("/metrics", "/other"), timeout=5)
        assert e.value.code == 404
    finally:
        server.close()


def test_run_check_and_bad_config_exit_status(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "appliance" / "sva.example.toml"
    r = subprocess.run([sys.executable, "-m", "sva", "run", "--config", str(example), "--check"],
                       check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "2 target(s)" in r.stdout, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[[targets]]\nuri = "lab:a"\n[[targets]]\nuri = "lab:b"\ninterval = -1\n')
    r = subprocess.run([sys.executable, "-m", "sva", "run", "--config", str(bad)], check=False, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "targets[1].interval: must be > 0" in r.stderr


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bus_config(bus: int, replay: int, metrics: int) -> str:
    return f"""
[bus]
endpoint = "tcp://127.0.0.1:{bus}"
replay_endpoint = "tcp://127.0.0.1:{replay}"
journal = "journal"
keys_dir = "keys"
[metrics]
port = {metrics}
"""


def _daemon_health(sub: BusSubscriber, reason: str, timeout: float = 20) -> Event:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = sub.recv(timeout=0.5)
        if ev is not None and ev.type is EventType.HEALTH and ev.payload["details"].get("reason") == reason:
            return ev
    raise AssertionError(f"no daemon health event {reason!r}")


def _metrics_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return b"sva_daemon_uptime_seconds" in r.read()
    except (urllib.error.URLError, OSError):
        return False


def test_sighup_moves_the_bus_and_metrics_and_numbering_goes_on(tmp_path: Path) -> None:
    security = make_keys(tmp_path / "keys")
    cfg = tmp_path / "sva.toml"
    a, m1 = (_port(), _port()), _port()
    cfg.write_text(_bus_config(*a, m1))
    d = Daemon(load(cfg))
    d.start()
    old_sub = BusSubscriber(f"tcp://127.0.0.1:{a[0]}", f"tcp://127.0.0.1:{a[1]}", security=security, since=0)
    new_sub = None
    try:
        started = _daemon_health(old_sub, "started")
        assert _metrics_up(m1)
        b, m2 = (_port(), _port()), _port()
        cfg.write_text(_bus_config(*b, m2))
        assert d.reload()
        new_sub = BusSubscriber(f"tcp://127.0.0.1:{b[0]}", f"tcp://127.0.0.1:{b[1]}", security=security,
                                since=started.seq)  # fmt: skip
        reloaded = _daemon_health(new_sub, "reloaded")
        assert reloaded.seq > started.seq  # the same journal: numbering continues
        assert _metrics_up(m2) and not _metrics_up(m1)
        for port in (*a, m1):  # the old endpoints are released (no listener; TIME_WAIT is fine)
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen()
        # a bus endpoint that cannot be bound: refused, the running bus and metrics stay
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        try:
            cfg.write_text(_bus_config(blocker.getsockname()[1], _port(), _port()))
            assert not d.reload()
            refused = _daemon_health(new_sub, "reload-refused")
            assert "[bus]" in refused.payload["message"] and refused.seq > reloaded.seq
            assert _metrics_up(m2)
            assert d.config.bus.endpoint == f"tcp://127.0.0.1:{b[0]}"
        finally:
            blocker.close()
    finally:
        old_sub.close()
        if new_sub is not None:
            new_sub.close()
        d.shutdown()


def test_malloc_arenas_are_capped_unless_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    from sva.daemon.cli import limit_malloc_arenas

    assert limit_malloc_arenas() is True  # glibc (Debian): mallopt accepted the cap
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False  # the admin's setting is left alone
