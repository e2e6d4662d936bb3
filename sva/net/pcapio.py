"""pcap and pcapng files: a streaming reader and small writers.

Files are input from outside: every length is checked against the block or record that
holds it and against a hard maximum before anything is read or allocated, and a file that
does not hold together raises CaptureError naming the file and the byte offset.

Frames come out as RawFrame tuples (timestamp, bytes, wire length, port label). The
label is the pcapng interface name where the file has one, "" otherwise. Linux cooked
captures (`tcpdump -i any`, SLL and SLL2) are turned into Ethernet frames so the fast
path has one link type to parse; other link types are refused.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from sva.errors import CaptureError

RawFrame = tuple[float, bytes, int, str]

LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
SUPPORTED_LINKTYPES = frozenset((LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2))

MAX_FRAME = 262144  # libpcap's largest snap length; a longer record is corruption
MAX_BLOCK = 16 * 1024 * 1024  # pcapng blocks beyond this are corruption, not data
MAX_INTERFACES = 4096

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D
PCAPNG_IDB, PCAPNG_OPB, PCAPNG_SPB, PCAPNG_EPB = 1, 2, 3, 6


def is_capture_file(path: str) -> bool:
    return path.endswith((".pcap", ".pcapng", ".cap"))


class PcapReader:
    """Iterate the frames of a pcap or pcapng file (format and byte order detected)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.source = f"pcap:{self.path}"
        self.frames = 0
        self.bytes = 0
        self.truncated = 0  # records shorter than their wire length
        self.format = ""
        try:
            self._f: BinaryIO = open(self.path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise CaptureError(self.source, f"cannot open: {e.strerror or e}") from e
        head = self._f.read(4)
        if len(head) < 4:
            self.close()
            raise CaptureError(self.source, "not a pcap or pcapng file (shorter than 4 bytes)")
        self._f.seek(0)
        if head in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d"):
            self.format = "pcap"
            self._iter: Iterator[RawFrame] = self._pcap()
        elif head == b"\x0a\x0d\x0d\x0a":
            self.format = "pcapng"
            self._iter = self._pcapng()
        else:
            self.close()
            raise CaptureError(self.source, f"not a pcap or pcapng file (magic {head.hex()})")

    def __iter__(self) -> Iterator[RawFrame]:
        return self._iter

    def __next__(self) -> RawFrame:
        return next(self._iter)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> PcapReader:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _error(self, offset: int, message: str) -> CaptureError:
        return CaptureError(self.source, f"offset 0x{offset:x}: {message}")

    def _read(self, n: int, offset: int, what: str) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise self._error(offset, f"file ends inside {what} ({len(data)} of {n} bytes)")
        return data

    # -- classic pcap -------------------------------------------------------------------
    def _pcap(self) -> Iterator[RawFrame]:
        hdr = self._read(24, 0, "the file header")
        magic_le = struct.unpack_from("<I", hdr)[0]
        if magic_le in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            bo = "<"
            magic = magic_le
        else:
            bo = ">"
            magic = struct.unpack_from(">I", hdr)[0]
        scale = 1e-9 if magic == PCAP_MAGIC_NS else 1e-6
        _vmaj, _vmin, _zone, _sigfigs, snaplen, linktype = struct.unpack_from(bo + "HHiIII", hdr, 4)
        linktype &= 0x0FFFFFFF  # the top bits carry FCS information, not the type
        to_eth = _link_converter(linktype, self._error, 20)
        rec = struct.Struct(bo + "IIII")
        read = self._f.read
        offset = 24
        while True:
            rh = read(16)
            if not rh:
                return
            if len(rh) < 16:
                raise self._error(offset, f"file ends inside a record header ({len(rh)} of 16 bytes)")
            sec, frac, caplen, wirelen = rec.unpack(rh)
            if caplen > MAX_FRAME:
                raise self._error(offset, f"record length {caplen} exceeds {MAX_FRAME}")
            data = read(caplen)
            if len(data) != caplen:
                raise self._error(offset, f"file ends inside a record ({len(data)} of {caplen} bytes)")
            offset += 16 + caplen
            if to_eth is not None:
                data, wirelen = to_eth(data, wirelen)
            if wirelen > caplen:
                self.truncated += 1
            self.frames += 1
            self.bytes += wirelen
            yield (sec + frac * scale, data, wirelen, "")

    # -- pcapng -------------------------------------------------------------------------
    def _pcapng(self) -> Iterator[RawFrame]:
        offset = 0
        bo = "<"
        # per section: (linktype, snaplen, ts scale, ts offset, name, converter)
        ifaces: list[tuple[int, int, float, int, str, object]] = []
        read = self._f.read
        while True:
            head = read(8)
            if not head:
                return
            if len(head) < 8:
                raise self._error(offset, f"file ends inside a block header ({len(head)} of 8 bytes)")
            if head[:4] == b"\x0a\x0d\x0d\x0a":
                bom = self._read(4, offset + 8, "a section header")
                if bom == b"\x4d\x3c\x2b\x1a":
                    bo = "<"
                elif bom == b"\x1a\x2b\x3c\x4d":
                    bo = ">"
                else:
                    raise self._error(offset, f"bad byte-order magic {bom.hex()}")
                btype, blen = struct.unpack(bo + "II", head)
                body_len = self._check_block_len(blen, offset, 16) - 12
                body = bom + self._read(body_len - 4, offset + 12, "a section header")
                ifaces = []
            else:
                btype, blen = struct.unpack(bo + "II", head)
                body_len = self._check_block_len(blen, offset, 12) - 12
                body = self._read(body_len, offset + 8, f"block type 0x{btype:x}")
            trailer = self._read(4, offset + 8 + body_len, "a block trailer")
            if struct.unpack(bo + "I", trailer)[0] != blen:
                raise self._error(offset, "block trailer length differs from its header")
            here = offset
            offset += blen

            if btype == PCAPNG_IDB:
                if len(body) < 8:
                    raise self._error(here, "interface description block too short")
                if len(ifaces) >= MAX_INTERFACES:
                    raise self._error(here, f"more than {MAX_INTERFACES} interfaces in one section")
                linktype, snaplen = struct.unpack_from(bo + "HxxI", body)
                scale, tsoff, name = 1e-6, 0, ""
                for code, value in _options(body, 8, bo):
                    if code == 9 and value:
                        r = value[0]
                        scale = 2.0 ** -(r & 0x7F) if r & 0x80 else 10.0**-r
                    elif code == 14 and len(value) == 8:
                        tsoff = struct.unpack(bo + "q", value)[0]
                    elif code == 2:
                        name = value.split(b"\0", 1)[0].decode("utf-8", "replace")
                conv = _link_converter(linktype, lambda _o, m: self._error(here, m), 0)
                ifaces.append((linktype, snaplen, scale, tsoff, name, conv))
            elif btype in (PCAPNG_EPB, PCAPNG_OPB):
                if btype == PCAPNG_EPB:
                    if len(body) < 20:
                        raise self._error(here, "enhanced packet block too short")
                    ifid, ts_hi, ts_lo, caplen, wirelen = struct.unpack_from(bo + "IIIII", body)
                else:
                    if len(body) < 20:
                        raise self._error(here, "packet block too short")
                    ifid, _drops, ts_hi, ts_lo, caplen, wirelen = struct.unpack_from(bo + "HHIIII", body)
                if caplen > len(body) - 20:
                    raise self._error(here, f"captured length {caplen} exceeds its block")
                if ifid >= len(ifaces):
                    raise self._error(here, f"packet names interface {ifid}, which is not described")
                _lt, _snap, scale, tsoff, name, conv = ifaces[ifid]
                data = body[20 : 20 + caplen]
                ts = ((ts_hi << 32) | ts_lo) * scale + tsoff
                yield self._frame(ts, data, wirelen, name, conv)
            elif btype == PCAPNG_SPB:
                if len(body) < 4:
                    raise self._error(here, "simple packet block too short")
                if not ifaces:
                    raise self._error(here, "simple packet block before any interface description")
                wirelen = struct.unpack_from(bo + "I", body)[0]
                _lt, snap, _scale, _tsoff, name, conv = ifaces[0]
                caplen = min(wirelen, len(body) - 4, snap or MAX_FRAME)
                yield self._frame(0.0, body[4 : 4 + caplen], wirelen, name, conv)
            # other block types (statistics, name resolution, custom) carry no frames

    def _frame(self, ts: float, data: bytes, wirelen: int, name: str, conv: object) -> RawFrame:
        if conv is not None:
            data, wirelen = conv(data, wirelen)  # type: ignore[operator]
        if wirelen > len(data):
            self.truncated += 1
        self.frames += 1
        self.bytes += wirelen
        return (ts, data, wirelen, name)

    def _check_block_len(self, blen: int, offset: int, minimum: int) -> int:
        if blen < minimum or blen % 4 or blen > MAX_BLOCK:
            raise self._error(offset, f"bad block length {blen}")
        return blen


def _options(body: bytes, start: int, bo: str) -> Iterator[tuple[int, bytes]]:
    """pcapng options (code, value) from `start`, bounded by the body; stops at opt_endofopt."""
    pos = start
    n = len(body)
    opt = struct.Struct(bo + "HH")
    while pos + 4 <= n:
        code, length = opt.unpack_from(body, pos)
        if code == 0:
            return
        value = body[pos + 4 : pos + 4 + length]
        if len(value) < length:
            return  # an option running past its block: ignore the rest, keep the packets
        yield code, value
        pos += 4 + ((length + 3) & ~3)


def _link_converter(linktype: int, error: object, offset: int) -> object:
    """None for Ethernet; a function turning a cooked-capture frame into Ethernet otherwise."""
    if linktype == LINKTYPE_ETHERNET:
        return None
    if linktype == LINKTYPE_LINUX_SLL:
        return _sll_to_ethernet
    if linktype == LINKTYPE_LINUX_SLL2:
        return _sll2_to_ethernet
    raise error(offset, f"link type {linktype} is not supported (Ethernet and Linux cooked only)")  # type: ignore[operator]


_ZERO_MAC = b"\0" * 6


def _sll_to_ethernet(data: bytes, wirelen: int) -> tuple[bytes, int]:
    # SLL: pkttype(2) arphrd(2) addr_len(2) addr(8) protocol(2); the destination is unknown.
    if len(data) < 16:
        return data, wirelen
    return _ZERO_MAC + data[6:12] + data[14:16] + data[16:], wirelen - 2


def _sll2_to_ethernet(data: bytes, wirelen: int) -> tuple[bytes, int]:
    # SLL2: protocol(2) reserved(2) ifindex(4) arphrd(2) pkttype(1) addr_len(1) addr(8).
    if len(data) < 20:
        return data, wirelen
    return _ZERO_MAC + data[12:18] + data[0:2] + data[20:], wirelen - 6


def read_frames(path: str | Path) -> list[RawFrame]:
    """All frames of a capture file in memory (tests, benchmarks, small files)."""
    with PcapReader(path) as r:
        return list(r)


# -- writers ------------------------------------------------------------------------------
class PcapWriter:
    """Write a classic little-endian pcap (microsecond, or nanosecond with `nanosecond=True`)."""

    def __init__(self, path: str | Path, *, linktype: int = LINKTYPE_ETHERNET, snaplen: int = 65535, nanosecond: bool = False) -> None:
        self.path = str(path)
        self._ns = nanosecond
        self._f: io.BufferedWriter = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        magic = PCAP_MAGIC_NS if nanosecond else PCAP_MAGIC_US
        self._f.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
        self._snaplen = snaplen
        self._rec = struct.Struct("<IIII")

    def write(self, ts: float, frame: bytes, wirelen: int | None = None) -> None:
        sec = int(ts)
        div = 1_000_000_000 if self._ns else 1_000_000
        frac = round((ts - sec) * div)
        if frac >= div:
            sec, frac = sec + 1, frac - div
        data = frame[: self._snaplen]
        self._f.write(self._rec.pack(sec, frac, len(data), len(frame) if wirelen is None else wirelen))
        self._f.write(data)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class PcapNgWriter:
    """Write a little-endian pcapng: one section, one Ethernet interface per port label, nanosecond times."""

    def __init__(self, path: str | Path, *, snaplen: int = 65535) -> None:
        self.path = str(path)
        self._f: io.BufferedWriter = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._snaplen = snaplen
        self._ifaces: dict[str, int] = {}
        self._block(PCAPNG_SHB, struct.pack("<IHHq", PCAPNG_BOM, 1, 0, -1))

    def _block(self, btype: int, body: bytes) -> None:
        body += b"\0" * (-len(body) % 4)
        blen = len(body) + 12
        self._f.write(struct.pack("<II", btype, blen) + body + struct.pack("<I", blen))

    def _iface(self, port: str) -> int:
        ifid = self._ifaces.get(port)
        if ifid is None:
            opts = _option(9, b"\x09")  # if_tsresol: 10^-9 s
            if port:
                opts += _option(2, port.encode())
            self._block(PCAPNG_IDB, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, self._snaplen) + opts + b"\0\0\0\0")
            ifid = self._ifaces[port] = len(self._ifaces)
        return ifid

    def write(self, ts: float, frame: bytes, wirelen: int | None = None, port: str = "") -> None:
        ifid = self._iface(port)
        t = round(ts * 1e9)
        data = frame[: self._snaplen]
        wl = len(frame) if wirelen is None else wirelen
        self._block(PCAPNG_EPB, struct.pack("<IIIII", ifid, t >> 32, t & 0xFFFFFFFF, len(data), wl) + data)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> PcapNgWriter:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def write_pcap(path: str | Path, frames: Iterable[RawFrame | bytes], *, nanosecond: bool = False) -> int:
    """Write frames (RawFrame tuples, or bare frame bytes stamped 0) to a pcap; returns the count."""
    n = 0
    with PcapWriter(path, nanosecond=nanosecond) as w:
        for fr in frames:
            if isinstance(fr, bytes | bytearray):
                w.write(0.0, bytes(fr))
            else:
                w.write(fr[0], fr[1], fr[2])
            n += 1
    return n
