"""`sva alerts tail|replay|schema` against a real publisher."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sva.bus import BusPublisher, ClientSecurity, Severity, alert_payload
from sva.bus.keys import KeyPair, write_certificate
from sva.bus.schema import validate_event
from sva.bus.testing import sample_alert

from .conftest import REPO, child_env

SEVERITIES = ["low", "high", "critical", "informational", "medium", "high"]


def _sva(*argv: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sva", *argv], capture_output=True, text=True, env=child_env(),
                          cwd=REPO, timeout=timeout)


@pytest.fixture
def busy(publisher: Callable[..., BusPublisher], keys: ClientSecurity) -> BusPublisher:
    """A publisher holding 6 alerts of mixed severity (seq 1-6), a health event (7), a sigs event (8)."""
    bus = publisher()
    for i, sev in enumerate(SEVERITIES):
        bus.publish("alert", alert_payload(sample_alert(i, severity=sev)))
    bus.publish("health", {"component": "vmi", "status": "error", "message": "target web02 went away"})
    bus.publish("sigs", {"event": "updated", "message": "bundle active", "bundle_version": "2025.11.1"})
    return bus


def _conn(bus: BusPublisher, tmp_path: Path) -> list[str]:
    return ["--endpoint", bus.endpoint, "--replay-endpoint", bus.replay_endpoint, "--dir", str(tmp_path / "keys")]


def test_tail_human_blocks(busy: BusPublisher, tmp_path: Path) -> None:
    r = _sva("alerts", "tail", *_conn(busy, tmp_path), "--since", "0", "--count", "8")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("━━ ") == 6 and "\033[" not in out  # not a terminal: no colour
    first = out.split("━━ ")[1]
    for label in ("vm        web01", "what      ", "where     pid ", "rule      SVA-", "evidence  "):
        assert label in first
    assert "[LOW]" in first and "bundle 2025.11.0" in first and "ATT&CK T1014, T1055.001" in first
    assert "tcp 10.0.0.5:40003 -> 192.0.2.7:4444" in out  # sample 3 is a flow alert
    assert "health vmi error: target web02 went away" in out
    assert "signatures updated 2025.11.1: bundle active" in out


def test_tail_json_lines_and_filters(busy: BusPublisher, tmp_path: Path) -> None:
    r = _sva("alerts", "tail", *_conn(busy, tmp_path), "--since", "0", "--count", "8", "--json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, 9))
    for e in events:
        validate_event(e)
    r = _sva("alerts", "tail", *_conn(busy, tmp_path), "--since", "0", "--count", "4", "--json",
             "--min-severity", "high")
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["seq"] for e in events] == [2, 3, 6, 7]  # high, critical, high, then the health event
    assert all(e["payload"]["severity_id"] >= Severity.HIGH for e in events if e["type"] == "alert")
    r = _sva("alerts", "tail", *_conn(busy, tmp_path), "--since", "0", "--count", "2", "--json",
             "--topic", "sva.alert.high.", "--topic", "sva.sigs.")
    assert [json.loads(line)["topic"].split(".")[1] for line in r.stdout.splitlines()] == ["alert", "alert"]


def test_tail_follows_new_events_from_now(busy: BusPublisher, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "sva", "alerts", "tail", *_conn(busy, tmp_path), "--json",
                             "--count", "3", "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=child_env(), cwd=REPO)
    try:
        # No --since: only what is published after it starts. Publish until it has seen 3.
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            busy.publish("alert", alert_payload(sample_alert(1)))
            time.sleep(0.2)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    seqs = [json.loads(line)["seq"] for line in out.splitlines()]
    assert len(seqs) == 3 and seqs[0] > 8 and seqs == list(range(seqs[0], seqs[0] + 3))


def test_tail_colours_on_a_terminal(busy: BusPublisher, tmp_path: Path) -> None:
    master, slave = pty.openpty()
    env = child_env()
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "sva", "alerts", "tail", *_conn(busy, tmp_path), "--since", "1",
                             "--count", "1"], stdout=slave, stderr=subprocess.PIPE, env=env, cwd=REPO)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "\033[1;31m[HIGH]" in text and "seq 2" in text


def test_replay_since_and_until(busy: BusPublisher, tmp_path: Path) -> None:
    r = _sva("alerts", "replay", *_conn(busy, tmp_path), "--since", "5", "--json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["seq"] for line in r.stdout.splitlines()] == [6, 7, 8]
    r = _sva("alerts", "replay", *_conn(busy, tmp_path), "--since", "0", "--until", "3")
    assert r.returncode == 0 and r.stdout.count("━━ ") == 3
    r = _sva("alerts", "replay", *_conn(busy, tmp_path), "--since", "100", "--json")
    assert r.returncode == 0 and r.stdout == ""


def test_replay_with_nobody_listening_is_a_clear_error(tmp_path: Path, keys: ClientSecurity) -> None:
    r = _sva("alerts", "replay", "--endpoint", "tcp://127.0.0.1:9", "--dir", str(tmp_path / "keys"),
             "--since", "0")
    assert r.returncode == 2
    assert "replay endpoint tcp://127.0.0.1:10 did not answer" in r.stderr


def test_tail_says_why_an_unauthorized_key_gets_nothing(busy: BusPublisher, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    write_certificate(stranger, KeyPair.generate())
    r = _sva("alerts", "tail", *_conn(busy, tmp_path), "--client-key", f"{stranger}.key_secret", "--since", "0",
             "--timeout", "4")
    assert r.returncode == 0 and r.stdout == ""
    assert "refused this client's key (not authorized)" in r.stderr


def test_schema_command_prints_the_schema() -> None:
    r = _sva("alerts", "schema", "alert")
    assert r.returncode == 0 and json.loads(r.stdout)["properties"]["class_uid"] == {"const": 2004}
