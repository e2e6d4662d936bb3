"""The journal on its own: order, restarts, retention, torn tails, corruption, full disks, locks."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from sva.bus.journal import MAGIC, Journal, MissingReason
from sva.errors import BusError

BODY = b"x" * 200


def fill(j: Journal, n: int, topic: bytes = b"sva.alert.high.t", t_ms: int | None = None) -> None:
    for _ in range(n):
        j.append(j.next_seq, int(time.time() * 1000) if t_ms is None else t_ms, topic,
                 BODY + str(j.next_seq).encode())


def all_seqs(j: Journal) -> list[int]:
    out: list[int] = []
    since = 0
    while True:
        r = j.read(since, max_events=500)
        out += [rec.seq for rec in r.records]
        if r.through == since:
            return out
        since = r.through


def test_append_read_and_continue_after_restart(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", segment_bytes=8192) as j:
        assert (j.first_seq, j.last_seq, j.next_seq) == (1, 0, 1)
        fill(j, 100)
        stream = j.stream
        assert j.segment_count > 1
        r = j.read(10, until=20)
        assert [x.seq for x in r.records] == list(range(11, 21)) and r.through == 20 and not r.missing
        assert r.records[0].body == BODY + b"11" and r.records[0].topic == b"sva.alert.high.t"
        with pytest.raises(BusError, match="expected 101"):
            j.append(99, 0, b"t", b"b")
    with Journal(tmp_path / "j", segment_bytes=8192) as j:
        assert (j.first_seq, j.last_seq, j.stream, j.recoveries) == (1, 100, stream, [])
        fill(j, 5)
        assert all_seqs(j) == list(range(1, 106))


def test_read_limits_and_topic_filter(tmp_path: Path) -> None:
    with Journal(tmp_path / "j") as j:
        for i in range(50):
            j.append(j.next_seq, 0, b"sva.health.bus" if i % 10 == 0 else b"sva.alert.low.x", BODY)
        r = j.read(0, max_events=7)
        assert len(r.records) == 7 and r.through == 7
        r = j.read(0, topics=[b"sva.health."])
        assert [x.seq for x in r.records] == [1, 11, 21, 31, 41] and r.through == 50
        r = j.read(0, topics=[b"sva.health."], max_scan=15)
        assert [x.seq for x in r.records] == [1, 11] and r.through == 15
        assert j.read(50).records == [] and j.read(50).through == 50
        assert j.read(70).through == 70  # asking past the end is not an error


def test_only_one_publisher_per_journal(tmp_path: Path) -> None:
    with Journal(tmp_path / "j"), pytest.raises(BusError, match="in use by another publisher"):
        Journal(tmp_path / "j")
    Journal(tmp_path / "j").close()


def test_retention_by_size_and_age_reports_what_it_dropped(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", segment_bytes=4096, max_bytes=3 * 4096, max_age_s=3600) as j:
        fill(j, 200)
        dropped = j.enforce_retention()
        assert dropped and all(d.reason == "size" for d in dropped)
        assert dropped[0].first == 1 and j.first_seq == dropped[-1].last + 1
        assert j.nbytes <= 3 * 4096
        r = j.read(0, max_events=5)
        assert r.missing[0].first == 1 and r.missing[0].last == j.first_seq - 1
        assert r.missing[0].reason is MissingReason.RETENTION
        assert r.records[0].seq == j.first_seq
        assert all_seqs(j) == list(range(j.first_seq, 201))
    old_ms = int((time.time() - 7200) * 1000)
    with Journal(tmp_path / "k", segment_bytes=4096, max_age_s=3600) as k:
        fill(k, 60, t_ms=old_ms)
        fill(k, 60)
        dropped = k.enforce_retention()
        assert dropped and {d.reason for d in dropped} == {"age"}
        assert k.first_seq > 1 and k.last_seq == 120


def test_segment_being_written_is_never_dropped(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", segment_bytes=1 << 20, max_bytes=2 << 20, max_age_s=1) as j:
        fill(j, 10, t_ms=0)
        assert j.enforce_retention() == []
        assert all_seqs(j) == list(range(1, 11))


def _segments(d: Path) -> list[Path]:
    return sorted(d.glob("*.seg"))


def _crash(j: Journal) -> None:
    """Leave the journal as SIGKILL would: no close(), no clean-shutdown mark."""
    os.close(j._fd)
    os.close(j._lock_fd)


def test_torn_tail_after_a_crash_is_cut_and_reported(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j = Journal(d)
    fill(j, 20)
    _crash(j)
    seg = _segments(d)[-1]
    with open(seg, "r+b") as f:  # the last record only half on disk
        f.truncate(seg.stat().st_size - 50)
    with Journal(d) as j:
        assert j.last_seq == 19
        assert len(j.recoveries) == 1 and "torn" in j.recoveries[0].message
        fill(j, 1)
        assert all_seqs(j) == list(range(1, 21))


def test_records_gone_after_a_clean_close_are_never_renumbered(tmp_path: Path) -> None:
    d = tmp_path / "j"
    with Journal(d) as j:
        fill(j, 20)
    seg = _segments(d)[-1]
    with open(seg, "r+b") as f:
        f.truncate(seg.stat().st_size - 50)
    with Journal(d) as j:
        assert j.next_seq == 21
        lost = [r.lost for r in j.recoveries if r.lost is not None]
        assert [(m.first, m.last) for m in lost] == [(20, 20)]
        fill(j, 1)
        r = j.read(0)
        assert [x.seq for x in r.records] == [*range(1, 20), 21]
        assert [(m.first, m.last, m.reason) for m in r.missing] == [(20, 20, MissingReason.LOST)]


def test_corrupt_record_in_the_newest_segment_refuses_to_start(tmp_path: Path) -> None:
    d = tmp_path / "j"
    with Journal(d) as j:
        fill(j, 20)
    seg = _segments(d)[-1]
    data = bytearray(seg.read_bytes())
    data[len(MAGIC) + 300] ^= 0xFF  # inside record 2 of 20
    seg.write_bytes(bytes(data))
    with pytest.raises(BusError, match=r"is corrupt at offset \d+ \(checksum mismatch.*move the\s+journal"):
        Journal(d)
    # The refusal released the lock and left the files alone for inspection.
    assert seg.read_bytes() == bytes(data)


def test_not_a_journal_refuses_to_start(tmp_path: Path) -> None:
    d = tmp_path / "j"
    d.mkdir()
    (d / f"{1:020d}.seg").write_bytes(b"SQLite format 3\0" + b"\0" * 100)
    (d / f"{5:020d}.seg").write_bytes(MAGIC)
    with pytest.raises(BusError, match="does not start with SVAJRNL1"):
        Journal(d)
    (d / "state.json").write_text("{oops")
    shutil.rmtree(d)
    d.mkdir()
    (d / "state.json").write_text("{oops")
    with pytest.raises(BusError, match="state.json is corrupt"):
        Journal(d)


def test_corrupt_older_segment_is_reported_by_replay_not_skipped(tmp_path: Path) -> None:
    d = tmp_path / "j"
    with Journal(d, segment_bytes=4096) as j:
        fill(j, 100)
    segs = _segments(d)
    assert len(segs) >= 3
    victim = segs[1]
    first_in_victim = int(victim.stem)
    data = bytearray(victim.read_bytes())
    data[len(MAGIC) + 260] ^= 0xFF  # second record of that segment
    victim.write_bytes(bytes(data))
    with Journal(d, segment_bytes=4096) as j:  # the newest segment is fine: starts
        seqs, missing, since = [], [], 0
        while True:
            r = j.read(since, max_events=1000)
            seqs += [x.seq for x in r.records]
            missing += r.missing
            if r.through == since:
                break
            since = r.through
        assert len(missing) == 1 and missing[0].reason is MissingReason.CORRUPT
        assert missing[0].first == first_in_victim + 1 and missing[0].last == int(segs[2].stem) - 1
        assert sorted(seqs + list(range(missing[0].first, missing[0].last + 1))) == list(range(1, 101))


def test_host_crash_with_fsync_interval_resumes_past_reserved_numbers(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j = Journal(d)
    fill(j, 10)
    # Simulate a power loss: the process never closed the journal and the boot id changed.
    state = json.loads((d / "state.json").read_text())
    assert state["clean"] is False and state["reserved"] >= 10
    state["boot_id"] = str(uuid.uuid4())
    _crash(j)
    (d / "state.json").write_text(json.dumps(state))
    with Journal(d) as j2:
        assert j2.next_seq == state["reserved"] + 1
        assert j2.recoveries and j2.recoveries[0].lost is not None
        assert (j2.recoveries[0].lost.first, j2.recoveries[0].lost.last) == (11, state["reserved"])
        fill(j2, 1)
        r = j2.read(0)
        assert [x.seq for x in r.records] == [*range(1, 11), state["reserved"] + 1]
        assert [(m.first, m.last, m.reason) for m in r.missing] == [(11, state["reserved"], MissingReason.LOST)]


def test_a_process_crash_loses_and_skips_nothing(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j = Journal(d)
    fill(j, 10)
    _crash(j)  # same boot: the kernel still had every write
    with Journal(d) as j2:
        assert j2.next_seq == 11 and j2.recoveries == []


@pytest.fixture
def small_tmpfs(mount_tmpfs: Callable[[str], Path]) -> Path:
    return mount_tmpfs("256k")


def test_full_disk_refuses_the_event_cleanly_and_recovers(small_tmpfs: Path) -> None:
    ballast = small_tmpfs / "ballast"
    ballast.write_bytes(b"b" * (64 << 10))  # what the operator will delete to make room
    d = small_tmpfs / "j"
    j = Journal(d, segment_bytes=1 << 20, max_bytes=4 << 20)
    n = 0
    with pytest.raises(BusError, match=r"cannot append seq \d+: .*(No space left|short write).*not published"):
        for _ in range(10_000):  # bounded: 256 KiB fill up long before
            j.append(j.next_seq, 0, b"sva.alert.high.t", b"y" * 1000)
            n += 1
    assert n > 0 and j.last_seq == n  # the refused event took no number
    with pytest.raises(BusError, match="not published"):  # still full, still refused, still usable
        j.append(j.next_seq, 0, b"sva.alert.high.t", b"y" * 1000)
    # Nothing half-written: every record up to n reads back.
    assert [x.seq for x in j.read(0, max_events=10_000).records] == list(range(1, n + 1))
    ballast.unlink()
    j.append(j.next_seq, 0, b"sva.alert.high.t", b"y" * 1000)
    assert j.last_seq == n + 1
    j.close()
    with Journal(d, segment_bytes=1 << 20, max_bytes=4 << 20) as j2:
        assert j2.last_seq == n + 1 and j2.recoveries == []
        assert all_seqs(j2) == list(range(1, n + 2))


def test_opening_on_a_full_disk_is_a_clear_error(small_tmpfs: Path) -> None:
    fd = os.open(small_tmpfs / "ballast", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(1000):  # 256 KiB in 4 KiB writes: full long before the bound
            os.write(fd, b"b" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(BusError, match="No space left on device"):
        Journal(small_tmpfs / "j")
