"""The replay protocol ("all events since N"), spoken over ROUTER (publisher) / DEALER (client).

Request, two frames:

    [b"sva.replay", {"since": N, "until": M?, "max": K?, "topics": ["sva.alert."]?, "req": ID?}]

Reply: up to K events, each exactly as published (`[topic, event-json]`), then one

    [b"sva.replay.end", {"req": ID, "since": N, "through": T, "latest": L, "oldest": O,
                         "stream": S, "missing": [[first, last, reason], …], "count": n, "more": bool}]

Every seq in (N, T] was either sent or is listed in `missing` (reason `retention`,
`corrupt` or `lost`), unless it was left out by `topics`. `more` is true when T < L:
ask again with since=T. A bad request gets `[b"sva.replay.error", {"req": ID?, "error": …}]`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from sva.bus.event import Event, encode_json
from sva.errors import BusError

REQUEST_TOPIC = b"sva.replay"
END_TOPIC = b"sva.replay.end"
ERROR_TOPIC = b"sva.replay.error"
DEFAULT_MAX = 1000
MAX_MAX = 10_000


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    since: int
    until: int | None = None
    max: int = DEFAULT_MAX
    topics: tuple[str, ...] = ()
    req: Any = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"since": self.since, "max": self.max}
        if self.until is not None:
            d["until"] = self.until
        if self.topics:
            d["topics"] = list(self.topics)
        if self.req is not None:
            d["req"] = self.req
        return d


def parse_request(frames: Sequence[bytes]) -> ReplayRequest:
    """Validate a request's frames (identity already removed); BusError says what is wrong."""
    if len(frames) != 2 or frames[0] != REQUEST_TOPIC:
        raise BusError(f"replay request must be 2 frames [b'sva.replay', JSON], got {len(frames)} frame(s)")
    try:
        d = json.loads(frames[1])
    except (ValueError, UnicodeDecodeError) as e:
        raise BusError(f"replay request is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise BusError("replay request must be a JSON object")
    unknown = set(d) - {"since", "until", "max", "topics", "req"}
    if unknown:
        raise BusError(f"replay request has unknown field(s) {sorted(unknown)}")

    def _int(name: str, low: int, default: int | None) -> int | None:
        v = d.get(name, default)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise BusError(f"replay request field {name!r} must be an integer >= {low}, got {v!r}")
        return v

    since = _int("since", 0, None)
    if since is None:
        raise BusError("replay request lacks 'since'")
    until = _int("until", 0, None)
    mx = _int("max", 1, DEFAULT_MAX)
    topics = d.get("topics", [])
    if not isinstance(topics, list) or not all(isinstance(t, str) and t for t in topics) or len(topics) > 32:
        raise BusError("replay request field 'topics' must be a list of at most 32 non-empty strings")
    req = d.get("req")
    if (req is not None and not isinstance(req, str | int)) or isinstance(req, bool):
        raise BusError("replay request field 'req' must be a string or an integer")
    return ReplayRequest(since, until, min(mx or DEFAULT_MAX, MAX_MAX), tuple(topics), req)


def error_reply(message: str, req: Any = None) -> list[bytes]:
    return [ERROR_TOPIC, encode_json({"req": req, "error": message}).encode()]


def request_id_of(frames: Sequence[bytes]) -> Any:
    """Best-effort `req` of a request that failed validation, to echo in the error."""
    try:
        d = json.loads(frames[-1])
        r = d.get("req") if isinstance(d, dict) else None
        return r if isinstance(r, str | int) and not isinstance(r, bool) else None
    except (ValueError, UnicodeDecodeError, IndexError):
        return None


@dataclass(frozen=True, slots=True)
class ReplayEnd:
    since: int
    through: int
    latest: int
    oldest: int
    stream: str
    missing: tuple[tuple[int, int, str], ...]
    more: bool
    count: int

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ReplayEnd:
        try:
            return cls(
                int(d["since"]), int(d["through"]), int(d["latest"]), int(d["oldest"]), str(d["stream"]),
                tuple((int(a), int(b), str(r)) for a, b, r in d.get("missing", [])),
                bool(d["more"]), int(d["count"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BusError(f"malformed replay end marker: {e}") from None


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """How a client authenticates: CURVE (server public key + client keypair) or plaintext."""

    server_key: str | None
    client_public: str = ""
    client_secret: str = ""

    @property
    def plaintext(self) -> bool:
        return self.server_key is None

    def apply(self, sock: zmq.Socket) -> None:  # type: ignore[type-arg]
        if self.server_key is None:
            return
        sock.curve_serverkey = self.server_key.encode()
        sock.curve_publickey = self.client_public.encode()
        sock.curve_secretkey = self.client_secret.encode()


class ReplayClient:
    """Ask the publisher's replay endpoint for events.

    Blocking (`fetch`) or split in two for an event loop (`request`, then `poll_reply`
    when `socket` is readable, and `expired` to time out). Lazy Pirate: a request that
    gets no answer in time costs the socket, and the next request uses a fresh one.
    """

    def __init__(
        self,
        context: zmq.Context,  # type: ignore[type-arg]
        endpoint: str,
        security: ClientSecurity,
        timeout: float = 3.0,
    ) -> None:
        self.ctx = context
        self.endpoint = endpoint
        self.security = security
        self.timeout = timeout
        self._sock: zmq.Socket | None = None  # type: ignore[type-arg]
        self._req = 0
        self._pending = False
        self._deadline = 0.0
        self._events: list[tuple[bytes, bytes]] = []

    @property
    def socket(self) -> zmq.Socket:  # type: ignore[type-arg]
        if self._sock is None:
            s = self.ctx.socket(zmq.DEALER)
            s.linger = 0
            s.rcvhwm = 0
            self.security.apply(s)
            try:
                s.connect(self.endpoint)
            except zmq.ZMQError as e:
                s.close(0)
                raise BusError(f"replay endpoint {self.endpoint}: {e}") from None
            self._sock = s
        return self._sock

    @property
    def pending(self) -> bool:
        return self._pending

    @property
    def deadline(self) -> float:
        """time.monotonic() by which the pending request must be answered."""
        return self._deadline

    def _reset(self) -> None:
        self._pending = False
        self._events = []
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def request(
        self, since: int, until: int | None = None, max_events: int = DEFAULT_MAX, topics: Sequence[str] = ()
    ) -> None:
        """Send one request (abandoning any unanswered one)."""
        if self._pending:
            self._reset()
        self._req += 1
        req = ReplayRequest(since, until, max_events, tuple(topics), self._req)
        try:
            # Never block: a DEALER with no live peer (endpoint down, CURVE handshake
            # refused) blocks a plain send forever. Unsent counts as unanswered, so the
            # request expires at its deadline like any lost one and is retried.
            self.socket.send_multipart([REQUEST_TOPIC, encode_json(req.to_json()).encode()], zmq.NOBLOCK)
        except zmq.Again:
            pass
        self._pending = True
        self._events = []
        self._deadline = time.monotonic() + self.timeout

    def expired(self, now: float | None = None) -> bool:
        """True (and the socket dropped) if the pending request is past its deadline."""
        if self._pending and (time.monotonic() if now is None else now) >= self._deadline:
            self._reset()
            return True
        return False

    def timeout_error(self) -> BusError:
        return BusError(
            f"replay endpoint {self.endpoint} did not answer within {self.timeout:g}s "
            f"(publisher down, wrong server key, or this client key is not authorized)"
        )

    def poll_reply(self) -> tuple[list[tuple[bytes, bytes]], ReplayEnd] | None:
        """Read what has arrived; the complete reply once its end marker is in, else None."""
        if self._sock is None or not self._pending:
            return None
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            if len(frames) != 2:
                continue
            topic, body = frames
            if topic not in (END_TOPIC, ERROR_TOPIC):
                self._events.append((topic, body))
                continue
            try:
                d = json.loads(body)
            except ValueError:
                self._reset()
                raise BusError(f"replay endpoint {self.endpoint} sent a malformed {topic.decode()}") from None
            if not isinstance(d, dict) or d.get("req") != self._req:
                self._events = []  # the tail of an abandoned request
                continue
            events, self._events, self._pending = self._events, [], False
            if topic == ERROR_TOPIC:
                raise BusError(f"replay endpoint {self.endpoint} refused the request: {d.get('error')}")
            return events, ReplayEnd.from_json(d)

    def fetch(
        self, since: int, until: int | None = None, max_events: int = DEFAULT_MAX, topics: Sequence[str] = ()
    ) -> tuple[list[tuple[bytes, bytes]], ReplayEnd]:
        """One request, blocking: ([(topic, event-json)…], end marker). BusError on timeout or refusal."""
        self.request(since, until, max_events, topics)
        while True:
            left = self._deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(int(left * 1000) + 1):
                if self.expired():
                    raise self.timeout_error()
                continue
            reply = self.poll_reply()
            if reply is not None:
                return reply

    def fetch_events(self, since: int, **kw: Any) -> tuple[list[Event], ReplayEnd]:
        raw, end = self.fetch(since, **kw)
        return [Event.decode(body, topic) for topic, body in raw], end

    def close(self) -> None:
        self._reset()
