"""Where the engine's events go.

The `Sink` protocol and `JsonLinesSink` are the bus's (`sva.bus.sink`): the engine
publishes `alert` events (payload `Alert.to_event_payload()`, an OCSF Detection Finding)
and `health` events (`HealthEvent.to_payload()`), and does not care whether the sink is
the ZeroMQ `BusPublisher`, a file of JSON lines or stdout. `MemorySink` keeps events in
a list, for tests and for one-shot scans that print a report afterwards.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sva.bus.event import Event, EventType, encode_json, topic_for
from sva.bus.sink import JsonLinesSink, Sink, parse_event_type
from sva.errors import BusError

__all__ = ["JsonLinesSink", "MemorySink", "Sink", "jsonl_sink", "stdout_sink"]


def stdout_sink() -> JsonLinesSink:
    """One event envelope per line on stdout (not closed by close())."""
    return JsonLinesSink(sys.stdout)


def jsonl_sink(path: str | Path) -> JsonLinesSink:
    """One event envelope per line, appended to `path`."""
    return JsonLinesSink(path)


class MemorySink:
    """Keeps every published event, numbered from 1, in `events`."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.closed = False
        self._lock = threading.Lock()

    def publish(self, event_type: EventType | str, payload: Mapping[str, Any]) -> Event:
        et = parse_event_type(event_type)
        topic = topic_for(et, payload)
        encode_json(payload)  # the same check as the real sinks
        with self._lock:
            if self.closed:
                raise BusError("sink is closed")
            ev = Event.new(len(self.events) + 1, time.time(), et, topic, payload)
            self.events.append(ev)
        return ev

    def of_type(self, event_type: EventType | str) -> list[Event]:
        et = parse_event_type(event_type)
        return [e for e in self.events if e.type is et]

    def close(self) -> None:
        self.closed = True
