"""Where events go: the `Sink` protocol, and `JsonLinesSink` for tests and pipelines.

The engine publishes through a Sink and does not care whether it is the ZeroMQ bus
(`sva.bus.publisher.BusPublisher`) or a file of JSON lines:

    event = sink.publish("alert", alert_payload(alert))   # -> Event (seq, id, topic …)
    events = publish_many(sink, [("alert", p) for p in payloads])   # a cycle's alerts at once
    sink.close()

`publish_many` uses the sink's own `publish_many` when it has one (`BusPublisher`: one
journal write and one lock per batch; `JsonLinesSink`) and calls `publish` in a loop otherwise.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from sva.bus.event import Event, EventType, encode_json, topic_for
from sva.errors import BusError


@runtime_checkable
class Sink(Protocol):
    def publish(self, event_type: EventType | str, payload: Mapping[str, Any]) -> Event:
        """Number, record and send one event; raise BusError if it could not be recorded."""
        ...

    def close(self) -> None: ...


def publish_many(sink: Sink, events: Iterable[tuple[EventType | str, Mapping[str, Any]]]) -> list[Event]:
    """Publish (event_type, payload) pairs in order through any Sink (batched if it can)."""
    many = getattr(sink, "publish_many", None)
    if many is not None:
        return many(events)  # type: ignore[no-any-return]
    return [sink.publish(et, payload) for et, payload in events]


_PUBLISHABLE = {t.value: t for t in EventType if t is not EventType.HEARTBEAT}


def parse_event_type(event_type: EventType | str) -> EventType:
    found = _PUBLISHABLE.get(event_type)  # EventType is a StrEnum: members hash as their value
    if found is not None:
        return found
    try:
        et = EventType(event_type)
    except ValueError:
        raise BusError(f"unknown event type {event_type!r} (one of {', '.join(t.value for t in EventType)})") from None
    if et is EventType.HEARTBEAT:
        raise BusError("heartbeat events are sent by the publisher itself, not published")
    return et


class JsonLinesSink:
    """One event envelope per line, to a file (appended) or a stream such as stdout.

    Sequence numbers start at `first_seq` and live only as long as the sink: this is for
    tests and for piping into other tools, not a journal.
    """

    def __init__(self, target: str | Path | IO[str] | None = None, first_seq: int = 1) -> None:
        self._own = False
        if target is None:
            self._out: IO[str] = sys.stdout
        elif isinstance(target, str | Path):
            try:
                self._out = open(target, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            except OSError as e:
                raise BusError(f"{target}: cannot open for events: {e.strerror}") from None
            self._own = True
        else:
            self._out = target
        self._next = first_seq
        self._lock = threading.Lock()
        self._closed = False

    def publish(self, event_type: EventType | str, payload: Mapping[str, Any]) -> Event:
        et = parse_event_type(event_type)
        topic = topic_for(et, payload)
        encode_json(payload)  # fail before taking a sequence number
        with self._lock:
            if self._closed:
                raise BusError("sink is closed")
            ev = Event.new(self._next, time.time(), et, topic, payload)
            line = ev.encode().decode()
            try:
                self._out.write(line + "\n")
                self._out.flush()
            except OSError as e:
                raise BusError(f"cannot write event seq {ev.seq}: {e.strerror}") from None
            self._next += 1
        return ev

    def publish_many(self, events: Iterable[tuple[EventType | str, Mapping[str, Any]]]) -> list[Event]:
        """`publish` each pair in order (every payload checked before any is written)."""
        items = [(parse_event_type(et), payload) for et, payload in events]
        for _et, payload in items:
            encode_json(payload)
        return [self.publish(et, payload) for et, payload in items]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._own:
                self._out.close()
