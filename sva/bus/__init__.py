"""The alert bus: sva's events, journaled, numbered and published over ZeroMQ.

- `event`: the `Event` envelope, event types, severities and topics.
- `ocsf`: alert mapping → OCSF Detection Finding payload (`alert_payload`).
- `sink`: the `Sink` protocol the engine publishes through; `JsonLinesSink`; `publish_many`.
- `publisher`: `BusPublisher`, the CURVE-protected PUB + replay endpoint + journal.
- `subscriber`: `BusSubscriber`, gap-free delivery for integrators.
- `journal`, `replay`, `keys`, `config`, `schema`: the parts underneath.

docs/bus.md is the integrator's guide.
"""

from sva.bus.config import BusConfig
from sva.bus.event import SCHEMA_VERSION, Event, EventType, Severity
from sva.bus.ocsf import alert_payload
from sva.bus.publisher import BusPublisher, PartialPublishError
from sva.bus.replay import ClientSecurity
from sva.bus.sink import JsonLinesSink, Sink, publish_many
from sva.bus.subscriber import BusSubscriber, Lost, security_from_keys_dir

__all__ = [
    "SCHEMA_VERSION",
    "BusConfig",
    "BusPublisher",
    "BusSubscriber",
    "ClientSecurity",
    "Event",
    "EventType",
    "JsonLinesSink",
    "Lost",
    "PartialPublishError",
    "Severity",
    "Sink",
    "alert_payload",
    "publish_many",
    "security_from_keys_dir",
]
