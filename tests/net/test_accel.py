"""The C walk of TPACKET_V3 blocks (sva/net/_fastpath.c) against the Python walk it
accelerates: on well-formed blocks, VLAN-stripped frames, and blocks whose offsets and
lengths are hostile, both give the same frames and counts, and neither reads past the block."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sva.net.capture import _walk_block_c, _walk_block_py

_PKT = struct.Struct("=IIIIIIH")  # tp_next_offset, sec, nsec, snaplen, len, status, mac
VLAN_VALID, TPID_VALID = 1 << 4, 1 << 6

needs_c = pytest.mark.skipif(
    _walk_block_c is None, reason="sva.net._fastpath is not built (pip install -e . with gcc and python3-dev)"
)


def _both(block: bytes, base: int, limit: int, first: int, max_frames: int, snap: int) -> tuple[Any, Any]:
    assert _walk_block_c is not None
    out_py: list[Any] = []
    out_c: list[Any] = []
    res_py = _walk_block_py(block, base, limit, first, max_frames, snap, "p0", out_py)
    res_c = _walk_block_c(block, base, limit, first, max_frames, snap, "p0", out_c)
    return (res_py, out_py), (res_c, out_c)


@st.composite
def blocks(draw: Any) -> tuple[bytes, int, int, int]:
    """A block of frames laid out as the kernel does (header, then the frame at `mac`), with
    random statuses, VLAN tags, cut frames and, sometimes, a lying next offset or length."""
    n = draw(st.integers(1, 6))
    body = bytearray()
    first = 48
    for i in range(n):
        frame = draw(st.binary(min_size=0, max_size=90))
        mac = draw(st.sampled_from([48, 66, 40]))
        wirelen = len(frame) + draw(st.sampled_from([0, 0, 10]))
        caplen = len(frame) if draw(st.integers(0, 9)) else draw(st.integers(0, 5000))
        status = draw(st.sampled_from([1, 1 | VLAN_VALID, 1 | VLAN_VALID | TPID_VALID]))
        size = mac + len(frame)
        size += -size % 16
        nxt = 0 if i == n - 1 else size
        if draw(st.integers(0, 9)) == 0:
            nxt = draw(st.integers(0, 0xFFFFFFFF))
        hdr = bytearray(size)
        _PKT.pack_into(hdr, 0, nxt, 1_700_000_000 + i, draw(st.integers(0, 999_999_999)), caplen, wirelen, status, mac)
        struct.pack_into("=IH", hdr, 32, draw(st.integers(0, 0xFFFFFFFF)), draw(st.sampled_from([0, 0x88A8, 0x8100])))
        hdr[mac : mac + len(frame)] = frame
        body += hdr
    block = bytes(first) + bytes(body) + bytes(draw(st.integers(0, 32)))
    return block, 0, len(block), first


@needs_c
@settings(max_examples=300, deadline=None)
@given(blocks(), st.sampled_from([65535, 64, 20]))
def test_c_walk_equals_python_walk(blk: tuple[bytes, int, int, int], snap: int) -> None:
    block, base, limit, first = blk
    (res_py, out_py), (res_c, out_c) = _both(block, base, limit, first, 64, snap)
    assert res_c == res_py
    assert out_c == out_py
    for ts, frame, wirelen, label in out_c:  # the types the fast path expects
        assert type(ts) is float and type(frame) is bytes and type(wirelen) is int and label == "p0"


@needs_c
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 500), st.integers(0, 0xFFFF), st.integers(0, 20))
def test_c_walk_on_random_bytes(data: bytes, first: int, snap: int, max_frames: int) -> None:
    (res_py, out_py), (res_c, out_c) = _both(data, 0, len(data), first, max_frames, snap)
    assert res_c == res_py and out_c == out_py


@needs_c
def test_c_walk_refuses_a_block_outside_the_buffer_and_restores_vlan_tags() -> None:
    assert _walk_block_c is not None
    with pytest.raises(ValueError, match="outside the buffer"):
        _walk_block_c(b"\x00" * 10, 0, 100, 0, 1, 65535, "p", [])
    frame = bytes(range(20))
    hdr = bytearray(48)
    _PKT.pack_into(hdr, 0, 0, 5, 500_000_000, len(frame), len(frame), 1 | VLAN_VALID | TPID_VALID, 48)
    struct.pack_into("=IH", hdr, 32, 0x0123, 0x88A8)
    out: list[Any] = []
    assert _walk_block_c(bytes(hdr) + frame, 0, 68, 0, 4, 65535, "p", out) == (24, 0, 0)
    assert out == [(5.5, frame[:12] + b"\x88\xa8\x01\x23" + frame[12:], 24, "p")]


# -- the C common-case parse against sva.net.parse.parse_frame -------------------------------
from sva.net.parse import Headers, fast_parse_frame, parse_frame  # noqa: E402

needs_c_parse = pytest.mark.skipif(fast_parse_frame is parse_frame, reason="sva.net._fastpath is not built")


@st.composite
def ipv4_frames(draw: Any) -> bytes:
    """Untagged IPv4 TCP/UDP frames with random (often inconsistent) lengths, flags and
    fragment fields, cut or padded at random: the C path's whole input domain and its edges."""
    proto = draw(st.sampled_from([6, 17, 6, 17, 1, 47]))
    payload = draw(st.binary(max_size=40))
    l4 = (struct.pack("!HHIIBBHHH", draw(st.integers(0, 65535)), draw(st.integers(0, 65535)), 1, 2,
                      draw(st.sampled_from([0x50, 0x80, 0x40, 0xF0, 0x00])), draw(st.integers(0, 255)), 0, 0, 0)
          if proto == 6 else struct.pack("!HHHH", draw(st.integers(0, 65535)), draw(st.integers(0, 65535)),
                                         draw(st.sampled_from([8 + len(payload), 8, 7, 0, 9 + len(payload), 65535])), 0))  # fmt: skip
    total = 20 + len(l4) + len(payload)
    total = draw(st.sampled_from([total, total, total - 1, total + 6, 39, 40, 0, 65535]))
    frag = draw(st.sampled_from([0, 0, 0x4000, 0x2000, 0x0001, 0x1FFF]))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total & 0xFFFF, 1, frag, 64, proto, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    frame = bytes(6) + b"\x02" * 6 + b"\x08\x00" + ip + l4 + payload + draw(st.binary(max_size=8))
    cut = draw(st.integers(0, len(frame)))
    return frame if draw(st.booleans()) else frame[:cut]


@needs_c_parse
@settings(max_examples=800, deadline=None)
@given(st.one_of(ipv4_frames(), st.binary(max_size=80)), st.integers(0, 3000), st.floats(allow_nan=False))
def test_c_parse_equals_python_parse(frame: bytes, wirelen: int, ts: float) -> None:
    ours = fast_parse_frame(frame, ts, wirelen, "eth9")
    ref = parse_frame(frame, ts, wirelen, "eth9")
    assert type(ours) is Headers
    assert ours == ref
    assert [type(x) for x in ours] == [type(x) for x in ref]


@needs_c_parse
def test_c_parse_takes_the_common_case_itself() -> None:
    """The C path is really used (not always the fallback): a plain TCP frame parses right
    when the Python fallback is taken away."""
    from sva.net import _fastpath

    tcp = bytes(6) + b"\x02" * 6 + b"\x08\x00" + struct.pack(
        "!BBHHHBBH4s4sHHIIBBHHH", 0x45, 0, 44, 1, 0x4000, 64, 6, 0, b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02",
        1234, 443, 1, 2, 0x50, 0x18, 0, 0, 0) + b"abcd"  # fmt: skip
    ref = parse_frame(tcp, 1.0, 0, "p")
    assert ref.payload == 54 and ref.payload_end == 58 and ref.tcp_flags == 0x18

    def refuse(*args: Any) -> Headers:
        raise AssertionError("fell back to Python")

    _fastpath.setup(Headers, refuse)
    try:
        assert fast_parse_frame(tcp, 1.0, 0, "p") == ref
        with pytest.raises(AssertionError, match="fell back"):
            fast_parse_frame(tcp[:40], 1.0, 0, "p")
    finally:
        _fastpath.setup(Headers, parse_frame)


# -- the C fast-path loop against FastPath's Python loop -------------------------------------
from sva.net.fastpath import FastPath, _process_batch_c  # noqa: E402
from sva.net.flows import FlowTable  # noqa: E402

needs_c_loop = pytest.mark.skipif(_process_batch_c is None, reason="sva.net._fastpath is not built")


def _arp_frame(op: int) -> bytes:
    return b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + bytes(20)


def _l4_frame(proto: int, sport: int, dport: int, payload: bytes, flags: int = 0x18) -> bytes:
    l4 = (struct.pack("!HHIIBBHHH", sport, dport, 1, 2, 0x50, flags, 0, 0, 0) if proto == 6
          else struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) if proto == 17 else b"\x08\x00\x00\x00")  # fmt: skip
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4) + len(payload), 1, 0, 64, proto, 0, b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02")
    return bytes(6) + b"\x02" * 6 + b"\x08\x00" + ip + l4 + payload


_PAYLOADS = st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"POST", b"\x16\x03\x01\x00", b"\x16\x02", b"x" * 30, b"PUT", b"TRACE x"])
_FRAMES = st.one_of(
    ipv4_frames(),
    st.binary(max_size=70),
    st.integers(1, 2).map(_arp_frame),
    st.builds(_l4_frame, st.sampled_from([6, 17, 1]), st.sampled_from([53, 67, 68, 443, 80, 1234]),
              st.sampled_from([53, 67, 68, 443, 80, 2222]), _PAYLOADS, st.sampled_from([0x02, 0x12, 0x04, 0x11, 0x18, 0])),
)  # fmt: skip


def _run(batches: list[list[Any]], accelerated: bool, deep: bool) -> tuple[Any, ...]:
    seen: list[Any] = []
    fp = FastPath(deep=seen.append if deep else None, table=FlowTable(max_flows=5, head_bytes=24))
    fp.accelerated = accelerated
    for b in batches:
        fp.process(b)
    return fp.counters(), fp.last_ts, fp.table.flows(), fp.table.evicted_flows, seen


@needs_c_loop
@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.tuples(_FRAMES, st.integers(0, 3), st.sampled_from(["a", "b"])), max_size=12), max_size=4),
       st.booleans())  # fmt: skip
def test_c_loop_equals_python_loop(raw: list[list[tuple[bytes, int, str]]], deep: bool) -> None:
    """Same counters, same flow table (order, counts, flags, payload heads, evictions) and the
    same frames handed to the deep path; timestamps repeat and go backwards on purpose."""
    batches = [[(float(t), f, len(f) + 4 * (t == 3), port) for f, t, port in b] for b in raw]
    assert _run(batches, True, deep) == _run(batches, False, deep)
