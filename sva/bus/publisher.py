"""`BusPublisher`: journal every event, then publish it on a CURVE-protected PUB socket.

    with BusPublisher(BusConfig(...)) as bus:
        ev = bus.publish("alert", alert_payload(alert))
        evs = bus.publish_many([("alert", p) for p in payloads])   # a cycle's alerts: cheaper

`publish` is synchronous and thread-safe: when it returns, the event has its sequence
number, is in the journal (see `sva.bus.journal` for what survives which crash) and has
been handed to ZeroMQ. If the journal cannot take it (disk full, I/O error) it raises
BusError and the event is neither numbered nor sent.

A service thread owns the ROUTER replay endpoint (`sva.bus.replay`), sends a heartbeat
every `heartbeat_s` carrying the latest sequence number, fsyncs the journal on the
configured interval, applies retention and reports what retention drops as a
`sva.health.bus` event.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from sva.bus.config import BusConfig
from sva.bus.event import (
    HEARTBEAT_TOPIC,
    SCHEMA_VERSION,
    Event,
    EventType,
    encode_json,
    encode_json_bytes,
    new_uuid,
    rfc3339,
    topic_for,
)
from sva.bus.journal import WRITE_BATCH, Dropped, Journal
from sva.bus.keys import AuthorizedKeys, KeyPair, load_certificate
from sva.bus.replay import END_TOPIC, error_reply, parse_request, request_id_of
from sva.bus.sink import parse_event_type
from sva.errors import BusError

log = logging.getLogger(__name__)

ZAP_DOMAIN = b"sva"
PLAINTEXT_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!!  sva bus: CURVE IS OFF (plaintext = true). Anyone who can reach {endpoints}\n"
    "!!  can read every alert and replay the whole journal. Local development only.\n" + "!" * 78
)
_RETENTION_EVERY_S = 0.5
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)  # plain ints: or-ing pyzmq's flag enums per send is measurable
_LAST = int(zmq.NOBLOCK)
_MAX_REQUESTS_PER_TICK = 64
_ZERO_COPY_MIN = 64 << 10  # below this, copying into a zmq message is cheaper than tracking a Frame
_HEAD = (f'{{"schema_version":"{SCHEMA_VERSION}","id":"%s","seq":%d,"time":"%s","type":"%s","topic":"%s",'
         f'"payload":').encode()  # the envelope before the payload; topics and types need no escaping
_ETYPE_BYTES = {t: t.value.encode() for t in EventType}
_TOPICS: dict[str, bytes] = {}


def _topic_bytes(topic: str) -> bytes:
    b = _TOPICS.get(topic)
    if b is None:
        b = topic.encode()
        if len(_TOPICS) < 4096:
            _TOPICS[topic] = b
    return b


class PartialPublishError(BusError):
    """`publish_many` stopped part way; `published` holds the events that were published."""

    def __init__(self, message: str, published: list[Event]) -> None:
        super().__init__(message)
        self.published = published


class BusPublisher:
    """The alert bus publisher; implements `sva.bus.sink.Sink`."""

    def __init__(self, config: BusConfig, *, server_keys: KeyPair | None = None) -> None:
        self.config = config
        self.started = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._journal_error: str | None = None
        self.published = 0
        self.send_errors = 0
        self._journal = Journal(
            config.journal,
            segment_bytes=config.segment_bytes,
            max_bytes=config.retention_bytes,
            max_age_s=config.retention_age_s,
            fsync=config.fsync,
        )
        self._ctx: zmq.Context = zmq.Context()  # type: ignore[type-arg]
        self._auth: ThreadAuthenticator | None = None
        try:
            self._pub, self._router = self._bind(server_keys)
        except BaseException:
            self._teardown()
            raise
        self.endpoint: str = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        if config.plaintext:
            log.warning(PLAINTEXT_WARNING.format(endpoints=f"{self.endpoint} and {self.replay_endpoint}"))
        self._thread = threading.Thread(target=self._service, name="sva-bus", daemon=True)
        self._thread.start()
        for rec in self._journal.recoveries:
            status = "error" if rec.lost else "warning"
            details: dict[str, Any] = {"reason": "journal-recovery"}
            if rec.lost:
                details.update(first_seq=rec.lost.first, last_seq=rec.lost.last, lost=rec.lost.reason.value)
            self._health(status, rec.message, details)

    # ---- sockets -------------------------------------------------------------------

    def _bind(self, server_keys: KeyPair | None) -> tuple[zmq.Socket, zmq.Socket]:  # type: ignore[type-arg]
        cfg = self.config
        keys: KeyPair | None = None
        if not cfg.plaintext:
            keys = server_keys or load_certificate(cfg.keys_dir / "server.key_secret", need_secret=True)
            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("sva.bus.zap"))
            self._auth.start()
            self._auth.configure_curve_callback(
                ZAP_DOMAIN.decode(), credentials_provider=AuthorizedKeys(cfg.keys_dir / "authorized")
            )
        pub = self._ctx.socket(zmq.PUB)
        router = self._ctx.socket(zmq.ROUTER)
        for sock in (pub, router):
            sock.linger = 0
            if keys is not None:
                sock.curve_server = True
                sock.curve_secretkey = keys.secret.encode()
                sock.zap_domain = ZAP_DOMAIN
        pub.sndhwm = cfg.sndhwm
        router.sndhwm = 100_000
        router.router_mandatory = True
        binds = ((pub, cfg.endpoint, "bus.endpoint"), (router, cfg.replay_endpoint, "bus.replay_endpoint"))
        for sock, ep, key in binds:
            try:
                sock.bind(ep)
            except zmq.ZMQError as e:
                pub.close(0)
                router.close(0)
                raise BusError(f"{key} {ep}: cannot bind: {e}") from None
        return pub, router

    # ---- publishing ----------------------------------------------------------------

    def publish(self, event_type: EventType | str, payload: Mapping[str, Any]) -> Event:
        et = parse_event_type(event_type)
        topic = topic_for(et, payload)
        payload_json = encode_json_bytes(payload)  # outside the lock: the costly part
        topic_b = _topic_bytes(topic)
        ev_id = new_uuid()
        with self._lock:
            if self._closed:
                raise BusError("bus publisher is closed")
            seq = self._journal.next_seq
            ts = time.time()
            when = rfc3339(ts)
            body = b"".join((_HEAD % (ev_id.encode(), seq, when.encode(), _ETYPE_BYTES[et], topic_b),
                             payload_json, b"}"))
            try:
                self._journal.append(seq, int(ts * 1000), topic_b, body)
            except BusError as e:
                self._journal_error = str(e)
                raise
            self._journal_error = None
            self._send(topic_b, body)
            self.published += 1
        return Event(SCHEMA_VERSION, ev_id, seq, when, et, topic, payload)

    def publish_many(self, events: Iterable[tuple[EventType | str, Mapping[str, Any]]]) -> list[Event]:
        """Publish (event_type, payload) pairs in order, with contiguous sequence numbers.

        The same guarantees as `publish` for every event (journaled before it is sent), at a
        fraction of the cost: one journal write per batch of up to 256 events, the lock taken
        once per batch. Every payload is checked first: if one is not publishable, BusError
        and nothing is published. If the journal fails part way (disk full), a
        `PartialPublishError` (a BusError) carries the events published before the failure
        in `.published`; the rest were neither numbered nor sent.
        """
        prepared = []
        for event_type, payload in events:
            et = parse_event_type(event_type)
            topic = topic_for(et, payload)
            prepared.append((et, topic, _topic_bytes(topic), payload, encode_json_bytes(payload), new_uuid()))
        out: list[Event] = []
        i = 0
        while i < len(prepared):
            with self._lock:
                if self._closed:
                    raise PartialPublishError("bus publisher is closed", out)
                j = self._journal
                seq = j.next_seq
                ts = time.time()
                when = rfc3339(ts)
                when_b = when.encode()
                chunk = prepared[i:i + WRITE_BATCH]
                records = []
                for k, (et, _topic, topic_b, _payload, payload_json, ev_id) in enumerate(chunk):
                    head = _HEAD % (ev_id.encode(), seq + k, when_b, _ETYPE_BYTES[et], topic_b)
                    records.append((topic_b, b"".join((head, payload_json, b"}"))))
                try:
                    n = j.append_many(seq, int(ts * 1000), records)
                except BusError as e:
                    self._journal_error = str(e)
                    if not out:
                        raise
                    raise PartialPublishError(str(e), out) from None
                self._journal_error = None
                for topic_b, body in records[:n]:
                    self._send(topic_b, body)
                self.published += n
            for k in range(n):
                et, topic, _tb, payload, _pj, ev_id = chunk[k]
                out.append(Event(SCHEMA_VERSION, ev_id, seq + k, when, et, topic, payload))
            i += n
        return out

    def _send(self, topic: bytes, body: bytes) -> None:
        try:
            self._pub.send(topic, _MORE)
            if len(body) < _ZERO_COPY_MIN:
                self._pub.send(body, _LAST)
            else:  # large frame: let ZeroMQ reference the bytes instead of copying them
                self._pub.send(body, _LAST, copy=False)
        except zmq.ZMQError as e:
            # Journaled already: subscribers get it by replay. Never lose it silently here.
            self.send_errors += 1
            log.error("bus: PUB send failed (%s); subscribers will fetch the event by replay", e)

    def _health(self, status: str, message: str, details: Mapping[str, Any]) -> None:
        log.log(logging.INFO if status == "ok" else logging.WARNING, "bus health: %s", message)
        try:
            self.publish(EventType.HEALTH, {"component": "bus", "status": status, "message": message,
                                            "details": dict(details)})
        except BusError as e:
            log.error("bus: cannot publish a health event (%s): %s", e, message)

    def heartbeat_payload(self) -> dict[str, Any]:
        j = self._journal
        return {
            "latest_seq": j.last_seq,
            "oldest_seq": j.first_seq,
            "stream": j.stream,
            "interval_s": self.config.heartbeat_s,
            "replay_endpoint": self.replay_endpoint,
            "security": "plaintext" if self.config.plaintext else "curve",
            "started": rfc3339(self.started),
            "pid": os.getpid(),
            "journal": {
                "ok": self._journal_error is None,
                "error": self._journal_error,
                "bytes": j.nbytes,
                "segments": j.segment_count,
                "fsync": j.fsync.value,
            },
        }

    def _heartbeat(self) -> None:
        with self._lock:
            if self._closed:
                return
            payload = self.heartbeat_payload()
            ev = Event.new(payload["latest_seq"], time.time(), EventType.HEARTBEAT, HEARTBEAT_TOPIC, payload)
            self._send(HEARTBEAT_TOPIC.encode(), ev.encode())

    # ---- service thread ------------------------------------------------------------

    def _service(self) -> None:
        cfg = self.config
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        now = time.monotonic()
        next_hb = now
        next_sync = now + cfg.fsync_interval_s
        next_retention = now
        while not self._stop.is_set():
            wait = max(0.0, min(next_hb, next_sync, next_retention, now + 0.1) - now)
            try:
                if poller.poll(int(wait * 1000) + 1):
                    for _ in range(_MAX_REQUESTS_PER_TICK):
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._serve(frames)
                now = time.monotonic()
                if now >= next_hb:
                    self._heartbeat()
                    next_hb = now + cfg.heartbeat_s
                if now >= next_sync:
                    self._journal.sync()
                    next_sync = now + cfg.fsync_interval_s
                if now >= next_retention:
                    self._retention()
                    next_retention = now + _RETENTION_EVERY_S
            except zmq.ContextTerminated:
                return
            except Exception:  # one bad tick must not stop replay and heartbeats for good
                if self._stop.is_set():
                    return
                log.exception("bus service thread: unexpected error (continuing)")
                time.sleep(0.1)
                now = time.monotonic()

    def _serve(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        ident, rest = frames[0], frames[1:]
        try:
            req = parse_request(rest)
        except BusError as e:
            log.warning("bus: malformed replay request: %s", e)
            self._reply(ident, [error_reply(str(e), request_id_of(rest))])
            return
        res = self._journal.read(
            req.since, until=req.until, max_events=req.max, topics=[t.encode() for t in req.topics]
        )
        latest = self._journal.last_seq
        end = {
            "req": req.req,
            "since": req.since,
            "through": res.through,
            "latest": latest,
            "oldest": self._journal.first_seq,
            "stream": self._journal.stream,
            "missing": [m.to_json() for m in res.missing],
            "count": len(res.records),
            "more": res.through < (latest if req.until is None else min(req.until, latest)),
        }
        msgs = [[r.topic, r.body] for r in res.records]
        msgs.append([END_TOPIC, encode_json(end).encode()])
        self._reply(ident, msgs)

    def _reply(self, ident: bytes, msgs: list[list[bytes]]) -> None:
        try:
            for m in msgs:
                self._router.send_multipart([ident, *m], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            # Client gone (EHOSTUNREACH) or not reading (EAGAIN): it will time out and ask again.
            log.info("bus: replay reply abandoned: %s", e)

    def _retention(self) -> None:
        dropped = self._journal.enforce_retention()
        if not dropped:
            return
        for d in _merge(dropped):
            limit = (f"size limit {self.config.retention_bytes} bytes" if d.reason == "size"
                     else f"age limit {self.config.retention_age_s:g} s")
            self._health("warning", f"retention dropped seq {d.first}..{d.last} ({d.nbytes} bytes): {limit}",
                         {"reason": "retention", "cause": d.reason, "first_seq": d.first, "last_seq": d.last,
                          "bytes": d.nbytes})

    # ---- lifecycle -----------------------------------------------------------------

    @property
    def latest_seq(self) -> int:
        return self._journal.last_seq

    @property
    def stream(self) -> str:
        return self._journal.stream

    @property
    def journal(self) -> Journal:
        return self._journal

    def flush(self) -> None:
        """fsync the journal now (publish already waits for the kernel, see FsyncPolicy)."""
        self._journal.sync()

    def close(self) -> None:
        """Stop serving, close sockets, fsync and close the journal. Idempotent."""
        if self._closed:
            return
        self._stop.set()
        if getattr(self, "_thread", None) is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._closed = True
        self._teardown()

    def _teardown(self) -> None:
        for name in ("_pub", "_router"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._ctx.term()
        self._journal.close()

    def __enter__(self) -> BusPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _merge(dropped: list[Dropped]) -> list[Dropped]:
    out: list[Dropped] = []
    for d in dropped:
        if out and out[-1].reason == d.reason and out[-1].last + 1 == d.first:
            p = out[-1]
            out[-1] = Dropped(p.first, d.last, p.nbytes + d.nbytes, d.reason)
        else:
            out.append(d)
    return out
