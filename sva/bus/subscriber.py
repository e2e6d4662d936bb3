"""`BusSubscriber`: every event exactly once, in sequence order, for integrators.

    sub = BusSubscriber("tcp://sva:7755", security=security_from_keys_dir("/etc/sva/keys"),
                        since=0, topics=["sva.alert."])
    for event in sub:              # or sub.recv(timeout=1.0) -> Event | None
        handle(event)

How (the "Clone" pattern of the ZeroMQ guide, with sequence numbers):
- The SUB socket takes the whole `sva.` stream, so every sequence number is seen; the
  `topics` filter is applied here, after gap detection.
- An event is delivered only when its seq is the next expected one. A higher seq, or a
  heartbeat whose `latest_seq` is ahead, reveals a gap; the gap is fetched from the
  replay endpoint in chunks, and live events are dropped until the gap is closed (they
  are in the journal; replay returns them in order).
- Sequence numbers the publisher can no longer supply (retention, a damaged journal) are
  not silently skipped: each range goes to `lost` and to the `on_lost` callback.
- If the replay endpoint does not answer (publisher restarting), the subscriber keeps the
  live socket, backs off and asks again; ZeroMQ reconnects both sockets by itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from sva.bus.config import default_replay_endpoint
from sva.bus.event import TOPIC_ROOT, Event, EventType
from sva.bus.keys import default_keys_dir, load_certificate
from sva.bus.replay import ClientSecurity, ReplayClient, ReplayEnd
from sva.errors import BusError

log = logging.getLogger(__name__)

_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: pyzmq's flag enums cost a call per use
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
)


def security_from_keys_dir(
    keys_dir: str | os.PathLike[str] | None = None,
    client: str = "client",
    server_key_file: str | os.PathLike[str] | None = None,
    client_cert: str | os.PathLike[str] | None = None,
) -> ClientSecurity:
    """CURVE settings from a key directory laid out by `sva keys gen` (see sva.bus.keys)."""
    d = Path(keys_dir) if keys_dir is not None else default_keys_dir()
    server = load_certificate(server_key_file or d / "server.key")
    me = load_certificate(client_cert or d / "clients" / f"{client}.key_secret", need_secret=True)
    return ClientSecurity(server.public, me.public, me.secret)


@dataclass(frozen=True, slots=True)
class Lost:
    """Sequence numbers first..last that will never be delivered, and why."""

    first: int
    last: int
    reason: str


@dataclass
class SubscriberStats:
    live: int = 0  # delivered straight from the PUB stream
    replayed: int = 0  # delivered from the replay endpoint
    duplicates: int = 0  # already delivered, dropped
    out_of_order: int = 0  # ahead of a gap, dropped (fetched again by replay)
    heartbeats: int = 0
    malformed: int = 0
    replay_requests: int = 0
    replay_failures: int = 0
    stream_changes: int = 0
    handshake_failures: int = 0
    lost_events: int = 0
    filtered: int = 0
    last_handshake_error: str = ""


_HANDSHAKE_TEXT: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the publisher refused this client's key (not authorized)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "security handshake failed (CURVE/plaintext mismatch or wrong server key)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "security handshake failed (wrong server key?)",
}


class BusSubscriber:
    """Every event of one publisher exactly once, in order (see the module docstring).

    `since`: deliver events with seq > since (0: everything still journaled); None: only
    events published from now on. `topics`: prefixes to deliver (default all). `on_lost`:
    called with each range that can never be delivered (also kept in `lost`).
    """

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        *,
        security: ClientSecurity,
        since: int | None = None,
        topics: Sequence[str] = (),
        rcvhwm: int = 100_000,
        chunk: int = 2000,
        replay_timeout: float = 3.0,
        retry_s: float = 0.5,
        on_lost: Callable[[Lost], None] | None = None,
        context: zmq.Context | None = None,  # type: ignore[type-arg]
    ) -> None:
        if since is not None and since < 0:
            raise BusError(f"since must be >= 0, got {since}")
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint or default_replay_endpoint(endpoint)
        self.security = security
        self.topics = tuple(topics)
        self.chunk = chunk
        self.retry_s = retry_s
        self.on_lost = on_lost
        self.stats = SubscriberStats()
        self.lost: list[Lost] = []
        self.stream: str | None = None
        self.last_heartbeat: Event | None = None
        self.last_heartbeat_at: float | None = None  # time.monotonic() of the last heartbeat
        self._next: int | None = None if since is None else since + 1
        self._latest = -1 if since is None else since
        self._ready: deque[Event] = deque()
        self._retry_at = 0.0
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self._sub = self.ctx.socket(zmq.SUB)
        self._sub.linger = 0
        self._sub.rcvhwm = rcvhwm
        security.apply(self._sub)
        self._sub.setsockopt(zmq.SUBSCRIBE, TOPIC_ROOT.encode())
        self._monitor = self._sub.get_monitor_socket(_HANDSHAKE_EVENTS)
        try:
            self._sub.connect(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise BusError(f"bus endpoint {endpoint}: {e}") from None
        self._replay = ReplayClient(self.ctx, self.replay_endpoint, security, timeout=replay_timeout)
        self._live_poller = zmq.Poller()
        self._live_poller.register(self._sub, zmq.POLLIN)
        self._live_poller.register(self._monitor, zmq.POLLIN)
        if since is not None:
            self._latest = since + 1  # ask the journal straight away: it knows what is there

    # ---- state ---------------------------------------------------------------------

    @property
    def next_seq(self) -> int | None:
        """The sequence number the next delivered event will have (None until the stream is seen)."""
        return self._next

    @property
    def latest_seq(self) -> int:
        """The highest sequence number known to exist."""
        return self._latest

    @property
    def caught_up(self) -> bool:
        return self._next is not None and self._next > self._latest and not self._ready

    # ---- receiving -----------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> Event | None:
        """The next event in sequence order, or None when `timeout` seconds pass without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        polled = False
        while True:
            if self._ready:
                return self._ready.popleft()
            now = time.monotonic()
            rep = self._replay
            if rep.expired(now):
                self._fill_failed(rep.timeout_error())
            gap = self._next is not None and self._latest >= self._next
            if self._next is not None and gap and not rep.pending and now >= self._retry_at:
                self.stats.replay_requests += 1
                rep.request(self._next - 1, max_events=self.chunk)
            if not gap and not rep.pending and (deadline is None or now < deadline) and self._drain_live():
                continue  # fast path while keeping up: no poller until the socket runs dry
            if deadline is not None and now >= deadline and polled:
                return None
            polled = True
            wait = 0.25 if deadline is None else deadline - now
            if rep.pending:
                wait = min(wait, rep.deadline - now)
            elif gap:
                wait = min(wait, self._retry_at - now)
            if rep.pending:
                poller = zmq.Poller()
                poller.register(self._sub, zmq.POLLIN)
                poller.register(self._monitor, zmq.POLLIN)
                poller.register(rep.socket, zmq.POLLIN)
            else:
                poller = self._live_poller
            events = dict(poller.poll(max(0, int(wait * 1000))))
            if self._monitor in events:
                self._drain_monitor()
            if rep.pending and rep.socket in events:
                try:
                    reply = rep.poll_reply()
                except BusError as e:
                    self._fill_failed(e)
                    reply = None
                if reply is not None:
                    self._apply(*reply)
                    continue  # deliver what the replay brought before reading more live events
            if self._sub in events:
                for _ in range(1000):
                    try:
                        frames = self._sub.recv_multipart(_NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_live(frames)

    def _drain_live(self) -> bool:
        """Read what the SUB socket already holds without polling; True if anything came."""
        recv = self._sub.recv_multipart
        got = 0
        for _ in range(1000):
            try:
                frames = recv(_NOBLOCK)
            except zmq.Again:
                break
            self._on_live(frames)
            got += 1
        if got:
            self._drain_monitor()  # handshake news still gets seen while events flow
        return got > 0

    def _fill_failed(self, error: BusError) -> None:
        self.stats.replay_failures += 1
        if self.stats.replay_failures == 1 or self.stats.replay_failures % 20 == 0:
            log.warning("bus subscriber: gap %s..%d not filled yet: %s", self._next, self._latest, error)
        self._retry_at = time.monotonic() + self.retry_s

    def __iter__(self) -> Iterator[Event]:
        while True:
            ev = self.recv()
            if ev is not None:
                yield ev

    def _deliver(self, ev: Event, live: bool) -> None:
        assert self._next is not None
        self._next = ev.seq + 1
        if self.topics and not ev.topic.startswith(self.topics):
            self.stats.filtered += 1
            return
        if live:
            self.stats.live += 1
        else:
            self.stats.replayed += 1
        self._ready.append(ev)

    def _on_live(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.stats.malformed += 1
            return
        try:
            ev = Event.decode(frames[1], frames[0])
        except BusError as e:
            self.stats.malformed += 1
            log.warning("bus subscriber: dropping a malformed message: %s", e)
            return
        if ev.type is EventType.HEARTBEAT:
            self._on_heartbeat(ev)
            return
        if self._next is None:
            self._next = ev.seq  # live-only start: begin with the first event seen
        self._latest = max(self._latest, ev.seq)
        if ev.seq == self._next:
            self._deliver(ev, live=True)
        elif ev.seq < self._next:
            self.stats.duplicates += 1
        else:
            self.stats.out_of_order += 1

    def _on_heartbeat(self, ev: Event) -> None:
        self.stats.heartbeats += 1
        self.last_heartbeat = ev
        self.last_heartbeat_at = time.monotonic()
        p = ev.payload
        try:
            latest = int(p["latest_seq"])
            stream = str(p["stream"])
        except (KeyError, TypeError, ValueError):
            self.stats.malformed += 1
            return
        self._check_stream(stream, latest)
        if self._next is None:
            self._next = latest + 1  # live-only start: everything after now
        self._latest = max(self._latest, latest)

    def _check_stream(self, stream: str, latest: int) -> None:
        if self.stream is None:
            self.stream = stream
            return
        if stream == self.stream:
            return
        self.stats.stream_changes += 1
        log.warning("bus subscriber: the publisher's journal changed (stream %s -> %s)", self.stream, stream)
        self.stream = stream
        if self._next is not None and latest + 1 < self._next:
            # Numbering restarted below what we delivered: a new journal. Take it from its start.
            self._next = 1
            self._latest = latest

    def _drain_monitor(self) -> None:
        while True:
            try:
                msg = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            text = _HANDSHAKE_TEXT.get(int(msg["event"]))
            if text:
                self.stats.handshake_failures += 1
                if text != self.stats.last_handshake_error:
                    log.warning("bus subscriber %s: %s", self.endpoint, text)
                self.stats.last_handshake_error = text
            elif msg["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.stats.last_handshake_error = ""

    # ---- gap filling ---------------------------------------------------------------

    def _apply(self, raw: list[tuple[bytes, bytes]], end: ReplayEnd) -> None:
        assert self._next is not None
        self._check_stream(end.stream, end.latest)
        events: list[tuple[int, Event | None, tuple[int, int, str] | None]] = []
        for topic, body in raw:
            try:
                decoded = Event.decode(body, topic)
            except BusError as e:
                self.stats.malformed += 1
                log.error("bus subscriber: malformed event in replay: %s", e)
                continue
            events.append((decoded.seq, decoded, None))
        events.extend((m[0], None, m) for m in end.missing)
        events.sort(key=lambda x: x[0])
        for seq, ev, miss in events:
            if ev is not None:
                if seq < self._next:
                    self.stats.duplicates += 1
                    continue
                if seq > self._next:
                    self._lose(self._next, seq - 1, "unexplained")
                self._deliver(ev, live=False)
            elif miss is not None and miss[1] >= self._next:
                self._lose(max(miss[0], self._next), miss[1], miss[2])
                self._next = miss[1] + 1
        if end.through >= self._next:
            # Everything up to `through` is accounted for: the rest was filtered by topic (not used here).
            self._lose(self._next, end.through, "unexplained")
            self._next = end.through + 1
        # The publisher journals before it publishes, and the SUB socket is not read during a
        # fetch, so nothing we have seen is newer than end.latest: it is the truth about the gap.
        self._latest = end.latest

    def _lose(self, first: int, last: int, reason: str) -> None:
        if last < first:
            return
        lost = Lost(first, last, reason)
        self.lost.append(lost)
        self.stats.lost_events += last - first + 1
        log.error("bus subscriber: seq %d..%d cannot be recovered (%s)", first, last, reason)
        if self.on_lost is not None:
            self.on_lost(lost)
        self._next = max(self._next or 0, last + 1)

    # ---- closing -------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_replay", None) is not None:
            self._replay.close()
        for sock in (getattr(self, "_monitor", None), getattr(self, "_sub", None)):
            if sock is not None and not sock.closed:
                if sock is self._sub:
                    with contextlib.suppress(zmq.ZMQError):
                        sock.disable_monitor()
                sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> BusSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


