"""The durable event journal: append-only segment files with a checksum per record.

Every event is written here, with one `writev(2)` (one per batch of up to 256 events for
`BusPublisher.publish_many`), *before* it is published; replay
requests are served from here. Layout of a journal directory:

    lock                          flock'ed by the one publisher that owns the journal
    state.json                    stream id, clean-shutdown flag, boot id, reserved seq
    00000000000000000001.seg      segments, named by the first seq they hold

A segment starts with the 8-byte magic `SVAJRNL1`, then records:

    crc32 u32 | size u32 | seq u64 | time_ms i64 | topic_len u16 | topic | body
    (little endian; size counts the bytes after itself; crc32 covers seq..body)

Sequence numbers are contiguous inside a segment; a jump in numbering always starts a
new segment, so a hole is visible between segments and is reported, never papered over.

Fsync policy (`FsyncPolicy`):
- `always`: fsync after every record. Survives power loss; costs a disk flush per event.
- `interval` (default): records reach the kernel before they are published, and the file
  is fsynced every `fsync_interval` seconds, on segment rotation and on close. Survives a
  crash or SIGKILL of the publisher with nothing lost; a power loss or kernel crash can
  lose the last interval. Sequence numbers are reserved ahead in `state.json` (fsynced),
  so after such a crash numbering resumes past every number that may have been
  published, and the lost range is reported instead of being reused.
- `never`: the kernel writes back when it likes (tests, throw-away setups).

Retention drops whole segments, oldest first, when the journal exceeds `max_bytes` or a
segment's newest record is older than `max_age_s`; the segment being written is never
dropped. `Journal.read` reports every sequence number it cannot return (retention,
corruption, a crash-time hole) as a `Missing` range.
"""

from __future__ import annotations

import enum
import fcntl
import json
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sva.errors import BusError

log = logging.getLogger(__name__)

MAGIC = b"SVAJRNL1"
_HDR = struct.Struct("<IIQqH")  # crc32, size, seq, time_ms, topic_len
_PREFIX = struct.Struct("<II")
_TAIL = struct.Struct("<QqH")
_CRC_FROM = 8  # crc covers the record from seq onward
_FIXED = _HDR.size - _CRC_FROM  # bytes counted by `size` before topic+body
MAX_RECORD = 16 << 20
INDEX_EVERY = 64
WRITE_BATCH = 256  # records per writev (2 iovecs each; IOV_MAX is 1024)
RESERVE = 100_000
_STATE_FORMAT = 1


class FsyncPolicy(enum.StrEnum):
    ALWAYS = "always"
    INTERVAL = "interval"
    NEVER = "never"


class MissingReason(enum.StrEnum):
    RETENTION = "retention"  # dropped by size/age retention
    CORRUPT = "corrupt"  # unreadable: checksum or framing error in a segment
    LOST = "lost"  # never journaled durably (host crash with fsync=interval)


@dataclass(frozen=True, slots=True)
class Missing:
    first: int
    last: int
    reason: MissingReason

    def to_json(self) -> list[int | str]:
        return [self.first, self.last, self.reason.value]


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    time_ms: int
    topic: bytes
    body: bytes


@dataclass(frozen=True, slots=True)
class ReadResult:
    records: list[Record]
    missing: list[Missing]
    through: int  # every seq in (since, through] is in records or missing


@dataclass(frozen=True, slots=True)
class Dropped:
    """Segments removed by retention: sequence numbers first..last, and why."""

    first: int
    last: int
    nbytes: int
    reason: str  # "size" | "age"


@dataclass(frozen=True, slots=True)
class Recovery:
    """Something start-up repaired or found, for a health event."""

    message: str
    lost: Missing | None = None


@dataclass
class _Segment:
    first_seq: int
    path: Path
    size: int  # valid bytes (records fully written)
    last_seq: int  # first_seq - 1 when empty
    last_time_ms: int
    index: list[tuple[int, int]] = field(default_factory=list)  # sparse (seq, offset)
    indexed: bool = False  # index covers the whole segment and CRCs were checked
    corrupt_at: tuple[int, int] | None = None  # (offset, last good seq before it)


class _Unreadable(Exception):
    def __init__(self, why: str, reason: MissingReason = MissingReason.CORRUPT) -> None:
        super().__init__(why)
        self.why = why
        self.reason = reason


class _Corrupt(Exception):
    def __init__(self, offset: int, why: str) -> None:
        super().__init__(why)
        self.offset = offset
        self.why = why


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _iter_records(f: BinaryIO, start: int, end: int):  # type: ignore[no-untyped-def]
    """Yield (offset, next_offset, seq, time_ms, topic, body) for records in [start, end).

    Raises _Corrupt at the first damaged record.
    """
    f.seek(start)
    pos = start
    hdr_size = _HDR.size
    while pos < end:
        if end - pos < hdr_size:
            raise _Corrupt(pos, f"{end - pos} stray bytes where a record header should be")
        hdr = f.read(hdr_size)
        if len(hdr) < hdr_size:
            raise _Corrupt(pos, "file shorter than expected")
        crc, size, seq, time_ms, topic_len = _HDR.unpack(hdr)
        if size < _FIXED + topic_len or size > MAX_RECORD:
            raise _Corrupt(pos, f"impossible record size {size}")
        total = 8 + size
        if pos + total > end:
            raise _Corrupt(pos, f"record of {total} bytes runs past the end of the segment")
        rest = f.read(size - _FIXED)
        if len(rest) < size - _FIXED:
            raise _Corrupt(pos, "file shorter than expected")
        if zlib.crc32(rest, zlib.crc32(hdr[_CRC_FROM:])) != crc:
            raise _Corrupt(pos, f"checksum mismatch in the record claiming seq {seq}")
        yield pos, pos + total, seq, time_ms, rest[:topic_len], rest[topic_len:]
        pos += total


class Journal:
    """One publisher's durable, append-only event journal (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = 16 << 20,
        max_bytes: int = 1 << 30,
        max_age_s: float = 30 * 86400,
        fsync: FsyncPolicy | str = FsyncPolicy.INTERVAL,
    ) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.fsync = FsyncPolicy(fsync)
        self.recoveries: list[Recovery] = []
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._fd = -1
        self._lock_fd = -1
        self._since_index = 0
        self._dirty = False
        self._closed = False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BusError(f"journal {self.dir}: cannot create: {e.strerror}") from None
        self._take_lock()
        try:
            self._open()
        except BaseException:
            self._release_lock()
            raise

    # ---- opening -------------------------------------------------------------------

    def _take_lock(self) -> None:
        try:
            self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise BusError(f"journal {self.dir} is in use by another publisher") from None
        except OSError as e:
            raise BusError(f"journal {self.dir}: cannot lock: {e.strerror}") from None

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _open(self) -> None:
        state = self._read_state()
        names = sorted(p for p in self.dir.iterdir() if p.suffix == ".seg")
        for p in names:
            try:
                first = int(p.stem)
            except ValueError:
                raise BusError(f"journal {self.dir}: unexpected segment name {p.name}") from None
            if first < 1 or len(p.stem) != 20:
                raise BusError(f"journal {self.dir}: unexpected segment name {p.name}")
            st = p.stat()
            self._segments.append(_Segment(first, p, st.st_size, first - 1, int(st.st_mtime * 1000)))
        for i, seg in enumerate(self._segments):
            self._check_magic(seg, is_last=i == len(self._segments) - 1)
        for a, b in zip(self._segments, self._segments[1:], strict=False):
            a.last_seq = b.first_seq - 1  # provisional until the segment is scanned
        if self._segments:
            self._recover_last(self._segments[-1])
        last = self._segments[-1].last_seq if self._segments else 0
        if state is None:
            self.stream = str(uuid.uuid4())
            self.created = time.time()
            reserved = last
        else:
            self.stream = str(state.get("stream") or uuid.uuid4())
            self.created = float(state.get("created") or time.time())
            reserved = int(state.get("reserved") or 0)
            closed_at = int(state.get("last") or 0)
            if closed_at > last:
                lost = Missing(last + 1, closed_at, MissingReason.LOST)
                self.recoveries.append(Recovery(
                    f"journal {self.dir}: segments holding seq {lost.first}..{lost.last} have disappeared "
                    f"(deleted by hand?); numbering resumes at {closed_at + 1}", lost))
                last = closed_at
        self._next = last + 1
        crashed_host = (
            state is not None
            and not state.get("clean", False)
            and state.get("boot_id") != _boot_id()
            and self.fsync is not FsyncPolicy.ALWAYS
        )
        if crashed_host and reserved > last:
            lost = Missing(last + 1, reserved, MissingReason.LOST)
            self.recoveries.append(Recovery(
                f"journal {self.dir}: the host went down while the publisher ran (fsync={self.fsync.value}); "
                f"seq {lost.first}..{lost.last} may have been published but were not on disk; numbering resumes "
                f"at {reserved + 1}", lost))
            self._next = reserved + 1
        self._reserved = max(reserved, self._next - 1)
        self._reserve(self._next + RESERVE - 1, clean=False)
        self._open_active()

    def _check_magic(self, seg: _Segment, is_last: bool) -> None:
        try:
            with open(seg.path, "rb") as f:
                head = f.read(len(MAGIC))
        except OSError as e:
            raise BusError(f"journal segment {seg.path}: cannot read: {e.strerror}") from None
        if head == MAGIC:
            return
        if is_last and len(head) < len(MAGIC) and MAGIC.startswith(head):
            # Created but its header never fully written (crash at rotation): empty segment.
            with open(seg.path, "r+b") as f:
                f.truncate(0)
                f.write(MAGIC)
            seg.size = len(MAGIC)
            return
        raise BusError(
            f"journal segment {seg.path} is corrupt: it does not start with {MAGIC.decode()} "
            f"(not an sva journal, or overwritten); move the journal directory aside to start a new one"
        )

    def _recover_last(self, seg: _Segment) -> None:
        """Scan the newest segment completely: find the last seq, cut off a torn tail."""
        end = seg.size
        last_good = len(MAGIC)
        seq_expected = seg.first_seq
        index: list[tuple[int, int]] = []
        n = 0
        last_time = seg.last_time_ms
        with open(seg.path, "rb") as f:
            try:
                for off, nxt, seq, t_ms, _topic, _body in _iter_records(f, len(MAGIC), end):
                    if seq != seq_expected:
                        raise _Corrupt(off, f"record seq {seq} where {seq_expected} was expected")
                    if n % INDEX_EVERY == 0:
                        index.append((seq, off))
                    n += 1
                    seq_expected += 1
                    last_time = t_ms
                    last_good = nxt
            except _Corrupt as c:
                if not self._is_torn_tail(f, c, end):
                    raise BusError(
                        f"journal segment {seg.path} is corrupt at offset {c.offset} ({c.why}; last good seq "
                        f"{seq_expected - 1}); the publisher will not append to a damaged journal: move the "
                        f"journal directory aside (keep it for inspection) to start a new stream"
                    ) from None
                torn = end - c.offset
                with open(seg.path, "r+b") as w:
                    w.truncate(c.offset)
                    w.flush()
                    os.fsync(w.fileno())
                last_good = c.offset
                self.recoveries.append(Recovery(
                    f"journal segment {seg.path.name}: cut {torn} bytes of a record torn by a crash at offset "
                    f"{c.offset} (it had not been published)"))
        seg.size = last_good
        seg.last_seq = seq_expected - 1
        seg.last_time_ms = last_time
        seg.index = index
        seg.indexed = True
        self._since_index = n % INDEX_EVERY

    @staticmethod
    def _is_torn_tail(f: BinaryIO, c: _Corrupt, end: int) -> bool:
        """A damaged record is a torn tail when nothing after it parses as a record.

        A crash can leave the last write partly on disk (short, or its pages zeroed); damage
        followed by more records is corruption, not a crash artefact.
        """
        f.seek(c.offset)
        hdr = f.read(_HDR.size)
        if len(hdr) < _HDR.size:
            return True
        _crc, size, _seq, _t, _tl = _HDR.unpack(hdr)
        if c.offset + 8 + size >= end:
            return True  # the damaged record is, or runs past, the last thing in the file
        f.seek(c.offset + _HDR.size)
        rest = f.read(end - c.offset - _HDR.size)
        return not rest.strip(b"\0")

    def _read_state(self) -> dict | None:  # type: ignore[type-arg]
        path = self.dir / "state.json"
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise BusError(f"journal state {path}: cannot read: {e.strerror}") from None
        try:
            state = json.loads(text)
            if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
                raise ValueError("unknown format")
            int(state.get("reserved") or 0)
        except (ValueError, TypeError) as e:
            raise BusError(f"journal state {path} is corrupt ({e}); move the journal directory aside") from None
        return state

    def _reserve(self, through: int, clean: bool) -> None:
        """Durably record that numbers up to `through` may be handed out (see FsyncPolicy)."""
        state = {
            "format": _STATE_FORMAT,
            "stream": self.stream,
            "created": self.created,
            "boot_id": _boot_id(),
            "clean": clean,
            "reserved": through,
            "last": self._next - 1,
        }
        tmp = self.dir / "state.json.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / "state.json")
            self._fsync_dir()
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise BusError(f"journal {self.dir}: cannot write state.json: {e.strerror}") from None
        self._reserved = through

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _open_active(self) -> None:
        if self._segments and self._segments[-1].last_seq == self._next - 1:
            seg = self._segments[-1]
            self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
            return
        self._new_segment(self._next)

    def _new_segment(self, first_seq: int) -> None:
        path = self.dir / f"{first_seq:020d}.seg"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as e:
            raise BusError(f"journal {self.dir}: cannot create segment {path.name}: {e.strerror}") from None
        try:
            if os.write(fd, MAGIC) != len(MAGIC):
                raise OSError(28, "short write")
            if self.fsync is not FsyncPolicy.NEVER:
                os.fsync(fd)
                self._fsync_dir()
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise BusError(f"journal {self.dir}: cannot start segment {path.name}: {e.strerror}") from None
        if self._fd >= 0:
            if self.fsync is not FsyncPolicy.NEVER:
                os.fsync(self._fd)
            os.close(self._fd)
        self._fd = fd
        self._since_index = 0
        self._segments.append(_Segment(first_seq, path, len(MAGIC), first_seq - 1, int(time.time() * 1000), [], True))

    # ---- writing -------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def last_seq(self) -> int:
        return self._next - 1

    @property
    def first_seq(self) -> int:
        """Oldest seq still held (last_seq + 1 when the journal holds nothing)."""
        with self._lock:
            for seg in self._segments:
                if seg.last_seq >= seg.first_seq:
                    return seg.first_seq
        return self._next

    def append(self, seq: int, time_ms: int, topic: bytes, body: bytes) -> None:
        """Write one record; on return it is in the kernel (and on disk with fsync=always).

        Raises BusError (nothing written, seq not consumed) when the disk is full or the
        write fails; the journal stays usable.
        """
        if self._closed:
            raise BusError(f"journal {self.dir} is closed")
        if seq != self._next:
            raise BusError(f"journal {self.dir}: append of seq {seq}, expected {self._next}")
        tail = _TAIL.pack(seq, time_ms, len(topic))
        size = _FIXED + len(topic) + len(body)
        if size > MAX_RECORD:
            raise BusError(f"event seq {seq} is {size} bytes; the journal takes at most {MAX_RECORD}")
        crc = zlib.crc32(body, zlib.crc32(topic, zlib.crc32(tail)))
        parts = [_PREFIX.pack(crc, size) + tail + topic, body]
        total = 8 + size
        with self._lock:
            seg = self._segments[-1]
            if seg.size > len(MAGIC) and seg.size + total > self.segment_bytes:
                self._new_segment(seq)
                seg = self._segments[-1]
            if seq > self._reserved:
                self._reserve(seq + RESERVE - 1, clean=False)
            offset = seg.size
            try:
                n = os.writev(self._fd, parts)  # one syscall, no concatenation copy of the body
                if n != total:
                    raise OSError(28, f"short write ({n} of {total} bytes)")
                if self.fsync is FsyncPolicy.ALWAYS:
                    os.fsync(self._fd)
            except OSError as e:
                self._undo(offset)
                raise BusError(
                    f"journal {self.dir}: cannot append seq {seq}: {e.strerror or e}; the event was not published"
                ) from None
            if self._since_index == 0:
                seg.index.append((seq, offset))
            self._since_index = (self._since_index + 1) % INDEX_EVERY
            seg.size = offset + total
            seg.last_seq = seq
            seg.last_time_ms = time_ms
            self._next = seq + 1
            self._dirty = True

    def append_many(self, first_seq: int, time_ms: int, records: Sequence[tuple[bytes, bytes]]) -> int:
        """Write records (topic, body) numbered first_seq, first_seq + 1, … with one `writev(2)`.

        Writes as many as fit in the segment being written (always at least one, starting a
        new segment first if needed) and at most `WRITE_BATCH`; returns how many. Those are
        all in the kernel on return (on disk with fsync=always); call again for the rest.
        All or nothing: on BusError (disk full, I/O error) none of them was written and no
        seq was consumed; the journal stays usable.
        """
        if self._closed:
            raise BusError(f"journal {self.dir} is closed")
        if first_seq != self._next:
            raise BusError(f"journal {self.dir}: append of seq {first_seq}, expected {self._next}")
        if not records:
            return 0
        parts: list[bytes] = []
        sizes: list[int] = []
        seq = first_seq
        for topic, body in records[:WRITE_BATCH]:
            tail = _TAIL.pack(seq, time_ms, len(topic))
            size = _FIXED + len(topic) + len(body)
            if size > MAX_RECORD:
                if seq == first_seq:
                    raise BusError(f"event seq {seq} is {size} bytes; the journal takes at most {MAX_RECORD}")
                break  # write the ones before it; the next call reports this one
            crc = zlib.crc32(body, zlib.crc32(topic, zlib.crc32(tail)))
            parts.append(_PREFIX.pack(crc, size) + tail + topic)
            parts.append(body)
            sizes.append(8 + size)
            seq += 1
        with self._lock:
            seg = self._segments[-1]
            if seg.size > len(MAGIC) and seg.size + sizes[0] > self.segment_bytes:
                self._new_segment(first_seq)
                seg = self._segments[-1]
            # as many as fit in this segment (the first always goes: a record may exceed segment_bytes)
            n, total = 1, sizes[0]
            while n < len(sizes) and seg.size + total + sizes[n] <= self.segment_bytes:
                total += sizes[n]
                n += 1
            if n < len(sizes):
                del parts[2 * n:]
            last = first_seq + n - 1
            if last > self._reserved:
                self._reserve(last + RESERVE - 1, clean=False)
            offset = seg.size
            try:
                w = os.writev(self._fd, parts)  # one syscall, no concatenation copy
                if w != total:
                    raise OSError(28, f"short write ({w} of {total} bytes)")
                if self.fsync is FsyncPolicy.ALWAYS:
                    os.fsync(self._fd)
            except OSError as e:
                self._undo(offset)
                what = f"seq {first_seq}" if n == 1 else f"seq {first_seq}..{last}"
                raise BusError(
                    f"journal {self.dir}: cannot append {what}: {e.strerror or e}; the event was not published"
                ) from None
            k = self._since_index
            pos = offset
            for i in range(n):
                if k == 0:
                    seg.index.append((first_seq + i, pos))
                k = (k + 1) % INDEX_EVERY
                pos += sizes[i]
            self._since_index = k
            seg.size = pos
            seg.last_seq = last
            seg.last_time_ms = time_ms
            self._next = last + 1
            self._dirty = True
        return n

    def _undo(self, offset: int) -> None:
        try:
            os.ftruncate(self._fd, offset)
        except OSError as e:  # pragma: no cover - truncating never needs space
            log.error("journal %s: cannot cut a failed write back to offset %d: %s", self.dir, offset, e)

    def sync(self) -> None:
        """fsync the segment being written if anything was appended since the last sync."""
        with self._lock:
            if not self._dirty or self._fd < 0:
                return
            fd = os.dup(self._fd)
            self._dirty = False
        try:
            os.fsync(fd)  # outside the lock: a flush must not stall appends
        finally:
            os.close(fd)

    # ---- retention -----------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._segments)

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    def enforce_retention(self, now: float | None = None) -> list[Dropped]:
        """Drop whole old segments over `max_bytes` or older than `max_age_s`."""
        now_ms = int((time.time() if now is None else now) * 1000)
        dropped: list[Dropped] = []
        with self._lock:
            total = sum(s.size for s in self._segments)
            while len(self._segments) > 1:
                seg = self._segments[0]
                if total > self.max_bytes:
                    reason = "size"
                elif now_ms - seg.last_time_ms > self.max_age_s * 1000:
                    reason = "age"
                else:
                    break
                self._segments.pop(0)
                total -= seg.size
                try:
                    seg.path.unlink()
                except OSError as e:
                    log.error("journal %s: cannot remove %s: %s", self.dir, seg.path, e)
                if seg.last_seq >= seg.first_seq:
                    dropped.append(Dropped(seg.first_seq, seg.last_seq, seg.size, reason))
        return dropped

    # ---- reading -------------------------------------------------------------------

    def read(
        self,
        since: int,
        *,
        until: int | None = None,
        max_events: int = 1000,
        max_bytes: int = 4 << 20,
        topics: Sequence[bytes] = (),
        max_scan: int = 100_000,
    ) -> ReadResult:
        """Records with since < seq <= until (default: the newest), in order, within limits.

        `topics`: only records whose topic starts with one of these prefixes are returned;
        the others still count as covered by `through`. At most `max_scan` records are
        looked at per call, so a sparse topic cannot make one call read the whole journal.
        """
        with self._lock:
            segs = [(s, s.size, s.last_seq) for s in self._segments if s.last_seq >= s.first_seq]
            newest = self._next - 1
        stop = newest if until is None else min(until, newest)
        prefixes = tuple(topics)
        records: list[Record] = []
        missing: list[Missing] = []
        pos = since + 1  # the next seq to account for
        nbytes = scanned = 0
        full = False
        for i, (seg, size, last) in enumerate(segs):
            if pos > stop or full:
                break
            if last < pos:
                continue
            if seg.first_seq > pos:
                reason = MissingReason.RETENTION if i == 0 else MissingReason.LOST
                missing.append(Missing(pos, min(seg.first_seq - 1, stop), reason))
                pos = seg.first_seq
                if pos > stop:
                    break
            try:
                for rec in self._read_segment(seg, size, pos, min(last, stop)):
                    if rec.seq != pos:
                        raise _Unreadable(f"record seq {rec.seq} where {pos} was expected")
                    pos += 1
                    scanned += 1
                    if not prefixes or rec.topic.startswith(prefixes):
                        records.append(rec)
                        nbytes += len(rec.body) + len(rec.topic)
                    if len(records) >= max_events or nbytes >= max_bytes or scanned >= max_scan:
                        full = True
                        break
            except _Unreadable as u:
                if pos <= min(last, stop):
                    bad_last = min(last, stop)
                    log.error("journal segment %s: %s; seq %d..%d unreadable", seg.path, u.why, pos, bad_last)
                    missing.append(Missing(pos, bad_last, u.reason))
                    pos = bad_last + 1
        if not full and pos <= stop:
            missing.append(Missing(pos, stop, MissingReason.RETENTION if not segs else MissingReason.LOST))
            pos = stop + 1
        return ReadResult(records, missing, max(since, min(pos - 1, stop)))

    def _read_segment(self, seg: _Segment, size: int, first: int, last: int):  # type: ignore[no-untyped-def]
        if not seg.indexed:
            self._index_segment(seg)
        if seg.corrupt_at is not None and first > seg.corrupt_at[1]:
            raise _Unreadable(f"segment damaged at offset {seg.corrupt_at[0]}, before this record")
        i = bisect_right(seg.index, (first, 1 << 62)) - 1
        start = seg.index[i][1] if i >= 0 else len(MAGIC)
        try:
            f = open(seg.path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            raise _Unreadable("segment removed by retention while being read", MissingReason.RETENTION) from None
        with f:
            try:
                for _off, _nxt, seq, t_ms, topic, body in _iter_records(f, start, size):
                    if seq < first:
                        continue
                    if seq > last:
                        return
                    yield Record(seq, t_ms, topic, body)
            except _Corrupt as c:
                raise _Unreadable(f"{c.why} at offset {c.offset}") from None
        if seg.corrupt_at is not None:
            raise _Unreadable(f"checksum or framing error at offset {seg.corrupt_at[0]}")

    def _index_segment(self, seg: _Segment) -> None:
        """First read of an older segment: check every record and build its sparse index."""
        index: list[tuple[int, int]] = []
        expected = seg.first_seq
        try:
            with open(seg.path, "rb", buffering=1 << 20) as f:
                for n, (off, _nxt, seq, _t, _tp, _b) in enumerate(_iter_records(f, len(MAGIC), seg.size)):
                    if seq != expected:
                        raise _Corrupt(off, f"record seq {seq} where {expected} was expected")
                    if n % INDEX_EVERY == 0:
                        index.append((seq, off))
                    expected += 1
        except _Corrupt as c:
            seg.corrupt_at = (c.offset, expected - 1)
            seg.size = c.offset
            log.error("journal segment %s is corrupt at offset %d: %s", seg.path, c.offset, c.why)
        except FileNotFoundError:
            pass
        seg.index = index
        seg.indexed = True

    # ---- closing -------------------------------------------------------------------

    def close(self) -> None:
        """fsync, mark the shutdown clean, release the lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
            self._reserve(self._reserved, clean=True)
        except (OSError, BusError) as e:
            log.error("journal %s: unclean close: %s", self.dir, e)
        finally:
            self._release_lock()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

