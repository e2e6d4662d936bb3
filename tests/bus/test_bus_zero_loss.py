"""Zero loss: floods, SIGKILL, retention, malformed replay requests, a full disk."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from sva.bus import BusPublisher, BusSubscriber, ClientSecurity, Event, alert_payload
from sva.bus.journal import Journal
from sva.bus.replay import END_TOPIC, ERROR_TOPIC, REQUEST_TOPIC
from sva.bus.testing import sample_alert
from sva.errors import BusError

from .conftest import ChildPublisher, collect


def _check_exactly_once(events: list[Event], last: int) -> None:
    seqs = [e.seq for e in events]
    if seqs != list(range(1, last + 1)):
        bad = next((i for i, s in enumerate(seqs) if s != i + 1), len(seqs))
        raise AssertionError(f"{len(seqs)} events, expected {last}; first wrong at index {bad}: {seqs[bad:bad + 5]}")
    assert len({e.id for e in events}) == len(events)


def test_flood_of_100k_with_a_slow_subscriber_ends_with_every_seq_once(
    child_publisher: Callable[..., ChildPublisher], subscriber: Callable[..., BusSubscriber], keys: ClientSecurity
) -> None:
    n = 100_000
    pub = child_publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--count", "0", "--sndhwm", "1000")
    sub = subscriber(pub.endpoint, pub.replay_endpoint, since=0, security=keys, rcvhwm=500)
    # Start the flood only once the subscriber is connected, so it sees (and loses) live traffic.
    deadline = time.monotonic() + 30
    while sub.last_heartbeat is None and time.monotonic() < deadline:
        sub.recv(timeout=0.2)
    assert sub.last_heartbeat is not None
    pub.stop()
    pub = child_publisher(pub.endpoint, pub.replay_endpoint, "--count", str(n), "--sndhwm", "1000")
    received: list[Event] = []

    def slow(ev: Event) -> None:
        if len(received) % 250 == 0:
            time.sleep(0.005)  # the deliberately slow consumer

    got = collect(sub, n, limit_s=240, on_event=lambda ev: (received.append(ev), slow(ev)))
    pub.read_line("done", limit_s=60)
    _check_exactly_once(got, n)
    assert sub.lost == []
    # The flood really overran the subscriber and the gaps were filled by replay.
    assert sub.stats.replayed > 0 and sub.stats.replay_requests > 0
    assert sub.stats.live + sub.stats.replayed == n


def test_sigkill_mid_stream_and_restart_loses_and_reuses_no_seq(
    child_publisher: Callable[..., ChildPublisher], subscriber: Callable[..., BusSubscriber], keys: ClientSecurity,
    tmp_path: Path
) -> None:
    ep, rep = f"ipc://{tmp_path}/bus.pub", f"ipc://{tmp_path}/bus.replay"
    first = child_publisher(ep, rep, "--count", "1000000", "--rate", "20000", "--run-tag", "run1")
    sub = subscriber(ep, rep, since=0, security=keys, replay_timeout=1.0, retry_s=0.2)
    before = collect(sub, 3000, limit_s=120)
    assert len(before) == 3000
    first.kill()  # SIGKILL, mid-stream
    second = child_publisher(ep, rep, "--count", "2000", "--run-tag", "run2")
    killed_at = second.first_seq - 1  # what the dead publisher had journaled
    assert killed_at >= 3000
    last = killed_at + 2000
    after = collect(sub, last - 3000, limit_s=120)
    events = before + after
    _check_exactly_once(events, last)
    assert sub.lost == []
    tags = [e.payload["unmapped"]["sva"]["evidence"]["tag"] for e in events]
    assert tags == ["run1"] * killed_at + ["run2"] * 2000
    second.stop()
    with Journal(tmp_path / "journal") as j:
        seqs: list[int] = []
        since = 0
        while since < j.last_seq:
            r = j.read(since)
            assert r.missing == []
            seqs += [x.seq for x in r.records]
            since = r.through
        assert seqs == list(range(1, last + 1))


def test_retention_drops_are_announced_and_reported_to_late_subscribers(
    publisher: Callable[..., BusPublisher], subscriber: Callable[..., BusSubscriber], keys: ClientSecurity
) -> None:
    bus = publisher(segment_bytes=8192, retention_bytes=3 * 8192)
    for i in range(200):
        bus.publish("alert", alert_payload(sample_alert(i)))
    deadline = time.monotonic() + 30
    while bus.journal.first_seq == 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # retention runs in the publisher's service thread
    assert bus.journal.first_seq > 1
    lost: list[object] = []
    sub = subscriber(bus.endpoint, bus.replay_endpoint, since=0, security=keys, on_lost=lost.append)
    health: list[Event] = []
    deadline = time.monotonic() + 30
    while not health and time.monotonic() < deadline:
        ev = sub.recv(timeout=0.5)
        if ev is not None and ev.topic == "sva.health.bus":
            health.append(ev)
    assert health, "no retention health event"
    details = health[0].payload["details"]
    assert details["reason"] == "retention" and details["cause"] == "size" and details["first_seq"] == 1
    assert health[0].payload["status"] == "warning"
    assert sub.lost and sub.lost[0].first == 1 and sub.lost[0].reason == "retention"
    assert sub.lost[0].last >= details["last_seq"]
    assert lost == sub.lost


def _dealer(ctx: zmq.Context, endpoint: str, keys: ClientSecurity) -> zmq.Socket:  # type: ignore[type-arg]
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    keys.apply(s)
    s.connect(endpoint)
    return s


def _reply(sock: zmq.Socket) -> list[list[bytes]]:  # type: ignore[type-arg]
    msgs: list[list[bytes]] = []
    while sock.poll(10_000):
        m = sock.recv_multipart()
        msgs.append(m)
        if m[0] in (END_TOPIC, ERROR_TOPIC):
            return msgs
    raise AssertionError(f"no complete reply; got {msgs}")


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([REQUEST_TOPIC], "must be 2 frames"),
        ([REQUEST_TOPIC, b"{}", b"extra"], "must be 2 frames"),
        ([b"gimme", b'{"since": 0}'], "must be 2 frames"),
        ([REQUEST_TOPIC, b"\xff\xfe garbage"], "not JSON"),
        ([REQUEST_TOPIC, b"[0]"], "must be a JSON object"),
        ([REQUEST_TOPIC, b'{"max": 5}'], "lacks 'since'"),
        ([REQUEST_TOPIC, b'{"since": -1, "req": 7}'], "'since' must be an integer >= 0"),
        ([REQUEST_TOPIC, b'{"since": "0"}'], "'since' must be an integer"),
        ([REQUEST_TOPIC, b'{"since": true}'], "'since' must be an integer"),
        ([REQUEST_TOPIC, b'{"since": 0, "max": 0}'], "'max' must be an integer >= 1"),
        ([REQUEST_TOPIC, b'{"since": 0, "topics": "sva."}'], "'topics' must be a list"),
        ([REQUEST_TOPIC, b'{"since": 0, "drop": "tables"}'], "unknown field"),
        ([REQUEST_TOPIC, b'{"since": 0, "req": [1]}'], "'req' must be"),
    ],
)
def test_malformed_replay_requests_get_an_error_reply_and_break_nothing(
    publisher: Callable[..., BusPublisher], keys: ClientSecurity, frames: list[bytes], message: str
) -> None:
    bus = publisher()
    for i in range(3):
        bus.publish("alert", alert_payload(sample_alert(i)))
    ctx = zmq.Context()
    sock = _dealer(ctx, bus.replay_endpoint, keys)
    try:
        sock.send_multipart(frames)
        reply = _reply(sock)
        assert len(reply) == 1 and reply[0][0] == ERROR_TOPIC
        err = json.loads(reply[0][1])
        assert message in err["error"]
        if b'"req": 7' in frames[-1]:
            assert err["req"] == 7
        # The endpoint still serves good requests, and publishing goes on.
        sock.send_multipart([REQUEST_TOPIC, b'{"since": 1, "req": "ok"}'])
        reply = _reply(sock)
        assert [Event.decode(m[1], m[0]).seq for m in reply[:-1]] == [2, 3]
        end = json.loads(reply[-1][1])
        assert (end["req"], end["through"], end["latest"], end["more"], end["missing"]) == ("ok", 3, 3, False, [])
        assert bus.publish("alert", alert_payload(sample_alert(9))).seq == 4
    finally:
        sock.close(0)
        ctx.term()


def test_replay_is_chunked_and_filtered_by_topic(
    publisher: Callable[..., BusPublisher], keys: ClientSecurity
) -> None:
    bus = publisher()
    for i in range(30):
        bus.publish("alert", alert_payload(sample_alert(i, severity="high" if i % 3 == 0 else "low")))
    ctx = zmq.Context()
    sock = _dealer(ctx, bus.replay_endpoint, keys)
    try:
        sock.send_multipart([REQUEST_TOPIC, b'{"since": 0, "max": 4}'])
        reply = _reply(sock)
        end = json.loads(reply[-1][1])
        assert len(reply) == 5 and end["through"] == 4 and end["more"] is True
        sock.send_multipart([REQUEST_TOPIC, b'{"since": 0, "topics": ["sva.alert.high."]}'])
        reply = _reply(sock)
        assert [Event.decode(m[1], m[0]).seq for m in reply[:-1]] == list(range(1, 31, 3))
        assert json.loads(reply[-1][1])["through"] == 30
    finally:
        sock.close(0)
        ctx.term()


@pytest.fixture
def tmpfs_journal(mount_tmpfs: Callable[[str], Path]) -> Path:
    return mount_tmpfs("512k")


def test_full_disk_refuses_alerts_loudly_and_resumes_without_a_hole(
    publisher: Callable[..., BusPublisher], subscriber: Callable[..., BusSubscriber], keys: ClientSecurity,
    tmpfs_journal: Path
) -> None:
    ballast = tmpfs_journal / "ballast"
    ballast.write_bytes(b"b" * (128 << 10))
    bus = publisher(journal=tmpfs_journal / "journal", segment_bytes=1 << 20, retention_bytes=4 << 20)
    sub = subscriber(bus.endpoint, bus.replay_endpoint, since=0, security=keys)
    published = 0
    with pytest.raises(BusError, match="not published"):
        for i in range(5000):  # bounded: 512 KiB fill up long before
            bus.publish("alert", alert_payload(sample_alert(i)))
            published += 1
    assert published > 0 and bus.latest_seq == published
    with pytest.raises(BusError, match="No space left|short write"):
        bus.publish("alert", alert_payload(sample_alert(0)))
    # Subscribers are told by the heartbeat that the journal is failing.
    deadline = time.monotonic() + 30
    got = collect(sub, published)
    while time.monotonic() < deadline:
        sub.recv(timeout=0.3)
        hb = sub.last_heartbeat
        if hb is not None and hb.payload["journal"]["ok"] is False:
            break
    assert sub.last_heartbeat is not None and sub.last_heartbeat.payload["journal"]["ok"] is False
    assert "No space left" in sub.last_heartbeat.payload["journal"]["error"] or \
        "short write" in sub.last_heartbeat.payload["journal"]["error"]
    ballast.unlink()
    ev = bus.publish("alert", alert_payload(sample_alert(1)))
    assert ev.seq == published + 1  # the refused attempts consumed no number
    got += collect(sub, 1)
    _check_exactly_once(got, published + 1)


def test_live_only_start_and_a_replaced_journal(
    subscriber: Callable[..., BusSubscriber], keys: ClientSecurity, tmp_path: Path
) -> None:
    from sva.bus.testing import local_config

    old = BusPublisher(local_config(tmp_path, ipc=True, journal=tmp_path / "j1"))
    try:
        for i in range(5):
            old.publish("alert", alert_payload(sample_alert(i)))
        sub = subscriber(old.endpoint, old.replay_endpoint, security=keys)  # no since: new events only
        deadline = time.monotonic() + 30
        while sub.next_seq is None and time.monotonic() < deadline:
            sub.recv(timeout=0.2)
        assert sub.next_seq == 6
        for i in range(5):
            old.publish("alert", alert_payload(sample_alert(i)))
        assert [e.seq for e in collect(sub, 5)] == [6, 7, 8, 9, 10]
    finally:
        old.close()
    # A new journal behind the same endpoints: numbering restarts, the stream id changes.
    new = BusPublisher(local_config(tmp_path, ipc=True, journal=tmp_path / "j2"))
    try:
        for i in range(3):
            new.publish("alert", alert_payload(sample_alert(i, tag="new")))
        got = collect(sub, 3)
        assert [e.seq for e in got] == [1, 2, 3]
        assert {e.payload["unmapped"]["sva"]["evidence"]["tag"] for e in got} == {"new"}
        assert sub.stats.stream_changes == 1 and sub.stream == new.stream
    finally:
        new.close()
