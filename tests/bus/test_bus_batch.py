"""publish_many (one journal write per batch), the journal's append_many, and the JSON codec
(orjson, with json for what only json handles)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sva.bus import (
    BusPublisher,
    BusSubscriber,
    ClientSecurity,
    Event,
    EventType,
    alert_payload,
)
from sva.bus.event import decode_json, encode_json, encode_json_bytes
from sva.bus.journal import WRITE_BATCH, Journal
from sva.bus.publisher import PartialPublishError
from sva.bus.sink import JsonLinesSink, publish_many
from sva.bus.testing import sample_alert
from sva.errors import BusError

from .conftest import collect


def _items(n: int, start: int = 0) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    out: list[tuple[str, dict]] = []  # type: ignore[type-arg]
    for i in range(start, start + n):
        if i % 7 == 3:
            out.append(("health", {"component": "engine", "status": "ok", "message": f"cycle {i}"}))
        else:
            out.append(("alert", alert_payload(sample_alert(i))))
    return out


def test_publish_many_numbers_journals_and_sends_every_event_once(
    publisher: Callable[..., BusPublisher], subscriber: Callable[..., BusSubscriber], keys: ClientSecurity
) -> None:
    # Small segments: batches are split at rotations; more than WRITE_BATCH per call: split too.
    bus = publisher(segment_bytes=64 << 10)
    sub = subscriber(bus.endpoint, bus.replay_endpoint, since=0, security=keys)
    first = bus.publish("alert", alert_payload(sample_alert(0)))
    items = _items(WRITE_BATCH + 150, start=1)
    evs = bus.publish_many(items)
    last = bus.publish("health", {"component": "engine", "status": "ok", "message": "after"})
    assert [e.seq for e in evs] == list(range(2, 2 + len(items)))
    assert last.seq == len(items) + 2 == bus.latest_seq
    assert [(e.type.value, e.payload) for e in evs] == items
    assert len({e.id for e in [first, *evs, last]}) == len(items) + 2
    assert bus.publish_many([]) == []
    assert bus.journal.segment_count > 2
    got = collect(sub, len(items) + 2)
    assert [e.seq for e in got] == list(range(1, len(items) + 3))
    for sent, received in zip(evs, got[1:], strict=False):
        assert (received.id, received.topic, received.time, dict(received.payload)) == \
            (sent.id, sent.topic, sent.time, json.loads(json.dumps(sent.payload)))
    # The journal holds exactly what was sent, and reopens (index, framing) intact.
    res = bus.journal.read(0, max_events=10_000)
    assert [r.seq for r in res.records] == list(range(1, len(items) + 3)) and not res.missing
    assert [Event.decode(r.body, r.topic).id for r in res.records] == [e.id for e in got]


def test_publish_many_checks_every_payload_before_numbering_any(publisher: Callable[..., BusPublisher]) -> None:
    bus = publisher()
    bus.publish("alert", alert_payload(sample_alert(0)))
    items = _items(5)
    bad = [*items[:2], ("health", {"component": "x", "status": "ok", "message": object()}), *items[2:]]
    with pytest.raises(BusError, match="not JSON-serialisable"):
        bus.publish_many(bad)
    with pytest.raises(BusError, match="unknown event type"):
        bus.publish_many([*items, ("gossip", {})])
    assert bus.latest_seq == 1
    assert [e.seq for e in bus.publish_many(items)] == [2, 3, 4, 5, 6]


@pytest.fixture
def tmpfs(mount_tmpfs: Callable[[str], Path]) -> Path:
    return mount_tmpfs("512k")


def test_publish_many_on_a_full_disk_reports_what_was_published_and_leaves_no_hole(
    publisher: Callable[..., BusPublisher], subscriber: Callable[..., BusSubscriber], keys: ClientSecurity,
    tmpfs: Path
) -> None:
    ballast = tmpfs / "ballast"
    ballast.write_bytes(b"b" * (128 << 10))
    bus = publisher(journal=tmpfs / "journal", segment_bytes=64 << 10, retention_bytes=4 << 20)
    sub = subscriber(bus.endpoint, bus.replay_endpoint, since=0, security=keys)
    published: list[Event] = []
    with pytest.raises(BusError, match="not published") as exc:
        for _ in range(100):  # bounded: 512 KiB fill up long before
            published += bus.publish_many(_items(50))
    if isinstance(exc.value, PartialPublishError):
        published += exc.value.published
    assert published and bus.latest_seq == len(published) == published[-1].seq
    assert [e.seq for e in published] == list(range(1, len(published) + 1))
    ballast.unlink()
    more = bus.publish_many(_items(3))
    assert [e.seq for e in more] == [len(published) + 1, len(published) + 2, len(published) + 3]
    got = collect(sub, len(published) + 3)
    assert [e.seq for e in got] == list(range(1, len(published) + 4))
    assert [e.id for e in got] == [e.id for e in published + more]


def test_journal_append_many_fills_a_segment_then_stops(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", segment_bytes=8 << 10) as j:
        body = b"x" * 1000
        n = j.append_many(1, 5, [(b"sva.t", body)] * 20)
        assert 1 <= n < 20 and j.next_seq == n + 1 and j.segment_count == 1
        m = j.append_many(n + 1, 5, [(b"sva.t", body)] * 20)  # starts a new segment
        assert j.segment_count == 2 and j.next_seq == n + m + 1
        with pytest.raises(BusError, match="expected"):
            j.append_many(1, 5, [(b"sva.t", body)])
        big = j.append_many(j.next_seq, 5, [(b"sva.t", b"y" * (20 << 10))])  # bigger than a segment: alone
        assert big == 1
        k = j.append_many(j.next_seq, 5, [(b"sva.t", b"z")] * (WRITE_BATCH + 10))
        assert k <= WRITE_BATCH
        last = j.last_seq
    with Journal(tmp_path / "j", segment_bytes=8 << 10) as j:  # reopened: everything readable, in order
        assert j.last_seq == last
        res = j.read(0, max_events=10_000)
        assert [r.seq for r in res.records] == list(range(1, last + 1)) and not res.missing
        assert [r.seq for r in j.read(last - 3).records] == [last - 2, last - 1, last]


def test_sinks_publish_many_helper(tmp_path: Path, publisher: Callable[..., BusPublisher]) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(path)
    evs = publish_many(sink, _items(4))
    assert [e.seq for e in evs] == [1, 2, 3, 4]
    sink.close()
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]

    class OneByOne:  # a sink without publish_many
        def __init__(self) -> None:
            self.n = 0

        def publish(self, event_type: str, payload: dict) -> Event:  # type: ignore[type-arg]
            self.n += 1
            return Event.new(self.n, 0.0, EventType.ALERT, "sva.alert.x", payload)

        def close(self) -> None:
            pass

    assert [e.seq for e in publish_many(OneByOne(), _items(3))] == [1, 2, 3]  # type: ignore[arg-type]
    bus = publisher()
    assert [e.seq for e in publish_many(bus, _items(3))] == [1, 2, 3]


# ---- the JSON codec --------------------------------------------------------------------


def test_encode_matches_json_for_plain_trees_and_falls_back_for_what_orjson_refuses() -> None:
    p = alert_payload(sample_alert(3))
    assert json.loads(encode_json_bytes(p)) == json.loads(json.dumps(p))
    assert encode_json_bytes({"a": [1, 2.5, None, True], "b": "x"}) == b'{"a":[1,2.5,null,true],"b":"x"}'
    assert encode_json(("t", 1)) == '["t",1]'
    # json-only cases: non-string keys, integers beyond 64 bits (orjson refuses both).
    assert json.loads(encode_json_bytes({1: "a", "k": 2**70})) == {"1": "a", "k": 2**70}
    # Non-ASCII goes out as UTF-8 and comes back unchanged.
    s = {"comm": "évil\u2028💥"}
    assert decode_json(encode_json_bytes(s)) == s
    # NaN is not JSON: null rather than a token strict parsers reject.
    assert json.loads(encode_json_bytes({"x": math.nan})) == {"x": None}
    for bad in ({"t": datetime.now(UTC)}, {"o": object()}, {"s": {1, 2}}):
        with pytest.raises(BusError, match="not JSON-serialisable"):
            encode_json_bytes(bad)


def test_decode_reads_what_older_json_encoded_journals_hold() -> None:
    ev = Event.new(7, 0.0, EventType.HEALTH, "sva.health.engine",
                   {"component": "engine", "status": "ok", "message": "m", "details": {"x": 1}})
    legacy = json.dumps(ev.to_json(), separators=(",", ":")).replace('"x":1', '"x":NaN,"big":' + str(2**70))
    got = Event.decode(legacy.encode(), b"sva.health.engine")
    assert math.isnan(got.payload["details"]["x"]) and got.payload["details"]["big"] == 2**70
    assert Event.decode(ev.encode()) == ev
    for body, msg in ((b"\xff\xfe", "not JSON"), (b"[1]", "not a JSON object"), (b"{", "not JSON")):
        with pytest.raises(BusError, match=msg):
            Event.decode(body)
