"""CURVE + ZAP: authorized clients get everything, everyone else nothing; key handling."""

from __future__ import annotations

import logging
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from sva.bus import BusPublisher, BusSubscriber, ClientSecurity, alert_payload
from sva.bus.keys import KeyPair, authorize, generate, load_certificate
from sva.bus.replay import REQUEST_TOPIC, ReplayClient
from sva.bus.testing import local_config, sample_alert
from sva.errors import BusError

from .conftest import REPO, child_env, collect


def _publish_mix(bus: BusPublisher, n: int) -> None:
    for i in range(n):
        if i % 10 == 3:
            bus.publish("health", {"component": "engine", "status": "ok", "message": f"cycle {i}"})
        elif i % 10 == 7:
            bus.publish("sigs", {"event": "updated", "message": f"bundle {i}", "bundle_version": str(i)})
        else:
            bus.publish("alert", alert_payload(sample_alert(i)))


def _wait_handshake_failure(sub: BusSubscriber, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while sub.stats.handshake_failures == 0 and time.monotonic() < deadline:
        assert sub.recv(timeout=0.2) is None


def test_authorized_key_gets_everything_unknown_or_no_key_nothing(
    publisher: Callable[..., BusPublisher], subscriber: Callable[..., BusSubscriber], keys: ClientSecurity
) -> None:
    bus = publisher()
    stranger = KeyPair.generate()
    unknown = subscriber(bus.endpoint, bus.replay_endpoint, since=0,
                         security=ClientSecurity(keys.server_key, stranger.public, stranger.secret))
    wrong_server = KeyPair.generate()
    impostor_view = subscriber(bus.endpoint, bus.replay_endpoint, since=0,
                               security=ClientSecurity(wrong_server.public, keys.client_public, keys.client_secret))
    ctx = zmq.Context.instance()
    plain_sub = ctx.socket(zmq.SUB)
    plain_sub.linger = 0
    plain_sub.setsockopt(zmq.SUBSCRIBE, b"")
    plain_sub.connect(bus.endpoint)
    plain_dealer = ctx.socket(zmq.DEALER)
    plain_dealer.linger = 0
    plain_dealer.connect(bus.replay_endpoint)
    plain_dealer.send_multipart([REQUEST_TOPIC, b'{"since": 0}'])
    try:
        _wait_handshake_failure(unknown)
        assert "not authorized" in unknown.stats.last_handshake_error
        good = subscriber(bus.endpoint, bus.replay_endpoint, since=0, security=keys)
        _publish_mix(bus, 300)
        got = collect(good, 300)
        assert [e.seq for e in got] == list(range(1, 301))
        assert len({e.id for e in got}) == 300
        assert {e.type.value for e in got} == {"alert", "health", "sigs"}
        # Give the others the same chance, and a little more: still nothing at all.
        for _ in range(4):
            assert unknown.recv(timeout=0.25) is None
            assert impostor_view.recv(timeout=0.25) is None
        assert plain_sub.poll(500) == 0 and plain_dealer.poll(100) == 0
        for s in (unknown, impostor_view):
            assert (s.stats.live, s.stats.replayed, s.stats.heartbeats) == (0, 0, 0)
        assert unknown.stats.handshake_failures > 0
        # The replay endpoint refuses them too.
        rc = ReplayClient(ctx, bus.replay_endpoint, ClientSecurity(keys.server_key, stranger.public, stranger.secret),
                          timeout=1.0)
        with pytest.raises(BusError, match="did not answer.*not authorized"):
            rc.fetch(0)
        rc.close()
    finally:
        plain_sub.close(0)
        plain_dealer.close(0)


def test_authorizing_a_key_applies_to_the_next_connection(
    publisher: Callable[..., BusPublisher], subscriber: Callable[..., BusSubscriber], keys: ClientSecurity,
    tmp_path: Path
) -> None:
    bus = publisher()
    newcomer = KeyPair.generate()
    sub = subscriber(bus.endpoint, bus.replay_endpoint, since=0,
                     security=ClientSecurity(keys.server_key, newcomer.public, newcomer.secret))
    _wait_handshake_failure(sub)
    _publish_mix(bus, 20)
    assert sub.recv(timeout=0.5) is None
    authorize(tmp_path / "keys", newcomer.public, "newcomer")
    got = collect(sub, 20)  # ZeroMQ retries the handshake by itself; now it is accepted
    assert [e.seq for e in got] == list(range(1, 21))


def test_keys_gen_writes_secrets_0600_and_authorizes_the_client(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    r = subprocess.run([sys.executable, "-m", "sva", "keys", "gen", "--dir", str(d), "--client", "siem", "--json"],
                       capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    for secret in (d / "server.key_secret", d / "clients" / "siem.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        load_certificate(secret, need_secret=True)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "clients").stat().st_mode) == 0o700
    assert load_certificate(d / "authorized" / "siem.key").public == load_certificate(d / "clients" / "siem.key").public
    # Again: the server keypair is kept, a second client name is added, a repeated name refused.
    server_before = (d / "server.key_secret").read_text()
    assert generate(d, client="second").server_created is False
    assert (d / "server.key_secret").read_text() == server_before
    with pytest.raises(BusError, match="exists"):
        generate(d, client="second")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "authorize", "tooshort"], "a CURVE key is 40 Z85 characters, got 8"),
        (["keys", "authorize", "~" * 40], "not a Z85-encoded CURVE key"),
        (["keys", "authorize", "/nonexistent/client.key"], "does not exist"),
        (["keys", "authorize", "x" * 40, "--name", "../evil"], "use letters, digits"),
        (["alerts", "tail", "--endpoint", "tcp://127.0.0.1:1", "--dir", "/nonexistent"], "does not exist"),
        (["alerts", "replay", "--since", "-1", "--plaintext"], "--since must be >= 0"),
        (["alerts", "tail", "--endpoint", "carrier-pigeon://x", "--plaintext"], "expected tcp://HOST:PORT"),
    ],
)
def test_bad_keys_and_arguments_are_one_clear_line(tmp_path: Path, argv: list[str], message: str) -> None:
    generate(tmp_path / "keys")
    if "--dir" not in argv and argv[0] == "keys":
        argv = [*argv, "--dir", str(tmp_path / "keys")]
    r = subprocess.run([sys.executable, "-m", "sva", *argv], capture_output=True, text=True, env=child_env(),
                       cwd=REPO, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_publisher_refuses_bad_server_keys(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    with pytest.raises(BusError, match="does not exist .create keys with `sva keys gen`"):
        BusPublisher(local_config(tmp_path))
    generate(d)
    secret = d / "server.key_secret"
    good = secret.read_text()
    secret.write_text(good.replace("secret-key", "secret-kex"))
    with pytest.raises(BusError, match="holds no secret key"):
        BusPublisher(local_config(tmp_path))
    other = KeyPair.generate()
    secret.write_text(good.split("secret-key")[0] + f'secret-key = "{other.secret}"\n')
    with pytest.raises(BusError, match="does not belong to its public key"):
        BusPublisher(local_config(tmp_path))
    secret.write_text("garbage\x00\x01")
    with pytest.raises(BusError, match="server.key_secret"):
        BusPublisher(local_config(tmp_path))
    # After all those refusals the journal is not left locked.
    secret.write_text(good)
    BusPublisher(local_config(tmp_path)).close()


def test_a_garbage_authorized_file_is_skipped_not_fatal(
    publisher: Callable[..., BusPublisher], subscriber: Callable[..., BusSubscriber], keys: ClientSecurity,
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "keys" / "authorized" / "broken.key").write_text("public-key = \"nope\"\n")
    bus = publisher()
    sub = subscriber(bus.endpoint, bus.replay_endpoint, since=0, security=keys)
    _publish_mix(bus, 5)
    assert [e.seq for e in collect(sub, 5)] == [1, 2, 3, 4, 5]
    assert any("broken.key" in r.getMessage() for r in caplog.records)


def test_plaintext_only_when_configured_and_loudly(
    publisher: Callable[..., BusPublisher], subscriber: Callable[..., BusSubscriber], keys: ClientSecurity,
    caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sva.bus.publisher"):
        bus = publisher(plaintext=True)
    assert any("CURVE IS OFF" in r.getMessage() for r in caplog.records)
    plain = subscriber(bus.endpoint, bus.replay_endpoint, since=0, security=ClientSecurity(None))
    curve = subscriber(bus.endpoint, bus.replay_endpoint, since=0, security=keys)
    _publish_mix(bus, 10)
    assert [e.seq for e in collect(plain, 10)] == list(range(1, 11))
    assert plain.last_heartbeat is not None or plain.recv(timeout=1.0) is None
    deadline = time.monotonic() + 10
    while plain.last_heartbeat is None and time.monotonic() < deadline:
        plain.recv(timeout=0.2)
    assert plain.last_heartbeat is not None and plain.last_heartbeat.payload["security"] == "plaintext"
    assert curve.recv(timeout=1.0) is None  # a CURVE client does not talk to a plaintext server
