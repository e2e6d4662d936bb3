"""The event envelope every bus message carries, and the topics events are published on.

A bus message is two frames, `[topic, json]`. The JSON is the envelope:

    {"schema_version": "1.1", "id": UUID, "seq": N, "time": RFC 3339 UTC,
     "type": "alert"|"health"|"sigs"|"heartbeat", "topic": same as frame 0, "payload": {...}}

Topics are dot-separated so ZeroMQ prefix subscriptions select a subtree:

    sva.alert.<severity>.<detector>     severity: informational|low|medium|high|critical
    sva.health.<component>
    sva.sigs.<event>
    sva.heartbeat

Subscribe with a trailing dot (`sva.alert.high.`) so `high` does not also match `highfoo`.
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson

from sva.errors import BusError

SCHEMA_VERSION = "1.1"
"""Envelope/payload schema version. Minor versions only add optional fields."""

TOPIC_ROOT = "sva."
HEARTBEAT_TOPIC = "sva.heartbeat"

# JSON is encoded and decoded with orjson (compact UTF-8, about 7x faster than json for an
# alert). datetimes and dataclasses are *not* serialised implicitly (as with json: payloads are
# plain JSON trees, times are epoch ms). What orjson refuses but json accepts (non-str keys,
# integers beyond 64 bits) goes through json, so the set of publishable payloads is unchanged;
# NaN/Infinity become null (json wrote NaN, which strict JSON parsers reject).
_ORJSON_OPTS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)  # fallback only
_SEGMENT_BAD = re.compile(r"[^a-z0-9_-]+")


class EventType(enum.StrEnum):
    ALERT = "alert"
    HEALTH = "health"
    SIGS = "sigs"
    HEARTBEAT = "heartbeat"


class Severity(enum.IntEnum):
    """OCSF severity_id values sva uses (OCSF also has 0 Unknown, 6 Fatal, 99 Other)."""

    INFORMATIONAL = 1
    LOW = 2
    MEDIUM = 3
    HIGH = 4
    CRITICAL = 5

    @property
    def label(self) -> str:
        """Lower-case name, as used in topics."""
        return self.name.lower()

    @property
    def caption(self) -> str:
        """OCSF caption: `High`."""
        return self.name.capitalize()

    @classmethod
    def parse(cls, value: str | int | Severity) -> Severity:
        """Accept 4, "high", "High", "info"/"informational"."""
        if isinstance(value, Severity):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            found = _SEVERITY_BY_ID.get(value)
            if found is None:
                raise BusError(f"severity id {value} is not one of 1..5")
            return found
        if isinstance(value, str):
            name = value.strip().lower()
            if name == "info":
                name = "informational"
            for s in cls:
                if s.label == name:
                    return s
        choices = ", ".join(s.label for s in cls)
        raise BusError(f"unknown severity {value!r} (one of {choices})")


_SEVERITY_BY_ID = {int(s): s for s in Severity}


@lru_cache(maxsize=4096)
def topic_segment(text: str) -> str:
    """One topic level: lower case, [a-z0-9_-] only, so a name never adds a level."""
    seg = _SEGMENT_BAD.sub("_", str(text).lower()).strip("_")
    return seg or "unknown"


def topic_for(event_type: EventType, payload: Mapping[str, Any]) -> str:
    """The topic an event is published on, from its type and payload."""
    if event_type is EventType.ALERT:
        sev = Severity.parse(payload.get("severity_id", 0) or 0)
        sva = (payload.get("unmapped") or {}).get("sva") or {}
        return f"sva.alert.{sev.label}.{topic_segment(sva.get('detector', 'unknown'))}"
    if event_type is EventType.HEALTH:
        return f"sva.health.{topic_segment(_required(payload, 'component', event_type))}"
    if event_type is EventType.SIGS:
        return f"sva.sigs.{topic_segment(_required(payload, 'event', event_type))}"
    return HEARTBEAT_TOPIC


def _required(payload: Mapping[str, Any], key: str, event_type: EventType) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value:
        raise BusError(f"{event_type.value} payload needs a non-empty string {key!r}")
    return value


_second_cache: tuple[int, str] = (-1, "")


def rfc3339(ts: float) -> str:
    """UTC time with microseconds and a Z: 2025-01-02T03:04:05.123456Z."""
    global _second_cache
    us = int(ts * 1_000_000)
    sec, frac = divmod(us, 1_000_000)
    cached_sec, prefix = _second_cache
    if cached_sec != sec:  # the date part changes once a second: format it once
        prefix = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second_cache = (sec, prefix)
    return f"{prefix}.{frac:06d}Z"


def new_uuid() -> str:
    """A random (version 4) UUID as text, without building a uuid.UUID object."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


def encode_json_bytes(obj: Any) -> bytes:
    """Compact JSON, UTF-8; raises BusError for values JSON cannot carry."""
    try:
        return orjson.dumps(obj, option=_ORJSON_OPTS)
    except TypeError:  # orjson.JSONEncodeError: maybe only orjson's limits (non-str keys, big ints)
        pass
    try:
        return _ENCODER.encode(obj).encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise BusError(f"event payload is not JSON-serialisable: {e}") from None


def encode_json(obj: Any) -> str:
    """Compact JSON text; raises BusError for values JSON cannot carry."""
    return encode_json_bytes(obj).decode()


def decode_json(body: bytes | str) -> Any:
    """Parse JSON (orjson; json for what only json reads: NaN from older journals, big integers)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    return json.loads(body)


_EVENT_TYPES = {t.value: t for t in EventType}


@dataclass(frozen=True, slots=True)
class Event:
    """One bus event: the envelope and its payload, exactly as published."""

    schema_version: str
    id: str
    seq: int
    time: str
    type: EventType
    topic: str
    payload: Mapping[str, Any]

    @classmethod
    def new(cls, seq: int, ts: float, event_type: EventType, topic: str, payload: Mapping[str, Any]) -> Event:
        return cls(SCHEMA_VERSION, new_uuid(), seq, rfc3339(ts), event_type, topic, payload)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "id": self.id,
            "seq": self.seq,
            "time": self.time,
            "type": self.type.value,
            "topic": self.topic,
            "payload": self.payload,
        }

    def encode(self) -> bytes:
        """The JSON frame, UTF-8."""
        return encode_json_bytes(self.to_json())

    @classmethod
    def decode(cls, body: bytes | str, topic: bytes | str | None = None) -> Event:
        """Parse a JSON frame; BusError if it is not an sva event (or its topic frame disagrees)."""
        try:
            d = decode_json(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise BusError(f"bus message is not JSON: {e}") from None
        if type(d) is not dict:
            raise BusError("bus message is not a JSON object")
        try:
            et = d["type"]
            ev = cls(
                str(d["schema_version"]),
                str(d["id"]),
                int(d["seq"]),
                str(d["time"]),
                _EVENT_TYPES.get(et) or EventType(et),
                str(d["topic"]),
                d["payload"],
            )
        except KeyError as e:
            raise BusError(f"bus message lacks envelope field {e.args[0]!r}") from None
        except (ValueError, TypeError) as e:
            raise BusError(f"bus message has a bad envelope field: {e}") from None
        if not isinstance(ev.payload, dict):
            raise BusError("bus message payload is not a JSON object")
        if not ev.schema_version.startswith("1."):
            raise BusError(f"bus message schema_version {ev.schema_version} is not supported (1.x)")
        if topic is not None:
            t = topic.decode(errors="replace") if isinstance(topic, bytes) else topic
            if t != ev.topic:
                raise BusError(f"bus message topic frame {t!r} differs from its envelope topic {ev.topic!r}")
        return ev
