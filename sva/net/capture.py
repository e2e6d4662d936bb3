"""Capture sources: a Linux interface (AF_PACKET), QEMU's filter-mirror stream, pcap files.

All sources yield batches of RawFrame tuples and keep their own statistics, drops
included: the kernel's (PACKET_STATISTICS) and sva's own (a queue that had to drop). A
capture that loses packets says so in `stats()`; it never loses them silently.

Interfaces are read through a TPACKET_V3 ring: the kernel fills whole blocks of frames in
shared memory and hands a block over by flipping its status word, so one poll and no
system call per frame serve thousands of frames. If the kernel refuses the ring, the
source falls back to plain receives on a socket with a large buffer, and `stats().mode`
says which path is in use.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from sva.errors import CaptureError
from sva.net.pcapio import PcapReader, is_capture_file

RawFrame = tuple[float, bytes, int, str]  # (timestamp epoch s, frame, wire length, port label)


@dataclass(frozen=True)
class CaptureStats:
    source: str
    packets: int  # frames delivered to sva
    bytes: int
    kernel_drops: int  # drops the kernel reported; 0 where the source cannot drop
    ring_drops: int  # frames lost in sva's own ring/queue handling
    truncated: int  # frames shorter than their wire length (snap length)
    malformed: int  # frames the parser flagged (filled in by the fast path)
    elapsed: float  # seconds since the source was opened
    mode: str = ""  # how frames are read: "tpacket_v3", "recv", "file", "stream"
    link_errors: int = 0  # interface went down/away while capturing (frames in that gap are not seen)

    @property
    def rate(self) -> float:
        """Delivered packets per second since the source was opened."""
        return self.packets / self.elapsed if self.elapsed > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["rate_pps"] = round(self.rate, 1)
        return d


class CaptureSource(Protocol):
    name: str

    def batches(self, stop: threading.Event | None = None, timeout: float = 0.2) -> Iterator[list[RawFrame]]: ...

    def stats(self) -> CaptureStats: ...

    def close(self) -> None: ...


DEFAULT_RING_MB = 64
MAX_BATCH = 4096  # frames per yielded batch: bounds the latency of one batch's processing


def open_source(
    spec: str,
    *,
    bpf: str | None = None,
    snaplen: int = 65535,
    ring_mb: int = DEFAULT_RING_MB,
    use_ring: bool = True,
    netns: str | None = None,
) -> CaptureSource:
    """Open a capture source from its spec (see the module docstring of each source).

    `iface:NAME[,NAME…]` reads interfaces (a TPACKET_V3 ring of `ring_mb` MiB each, or
    plain receives if `use_ring` is false or the ring is refused); `netns` opens the
    sockets inside that network namespace (/run/netns/NAME). `qemu-mirror:PATH` connects
    to a QEMU filter-mirror socket, `qemu-mirror:listen:PATH` waits for QEMU to connect.
    `pcap:PATH` or a path ending in .pcap/.pcapng reads a file.
    """
    if not 64 <= snaplen <= 262144:
        raise CaptureError(spec, f"snap length {snaplen} is outside 64..262144")
    kind, sep, rest = spec.partition(":")
    if kind == "iface" and sep:
        names = [n for n in rest.split(",") if n]
        if not names:
            raise CaptureError(spec, "no interface named (iface:NAME or iface:NAME1,NAME2)")
        for n in names:
            if len(n) > 15 or "/" in n or not n.isprintable() or " " in n:
                raise CaptureError(spec, f"{n!r} is not a valid interface name")
        prog = compile_bpf(bpf, spec) if bpf else None
        with _in_netns(netns, spec):
            return InterfaceSource(spec, names, snaplen=snaplen, ring_mb=ring_mb, use_ring=use_ring, bpf=prog)
    if kind == "qemu-mirror" and sep:
        if bpf:
            raise CaptureError(spec, "a BPF filter applies to interfaces only")
        listen = rest.startswith("listen:")
        path = rest[len("listen:") :] if listen else rest
        if not path:
            raise CaptureError(spec, "no socket path (qemu-mirror:PATH or qemu-mirror:listen:PATH)")
        return QemuMirrorSource(spec, path, listen=listen, snaplen=snaplen)
    if (kind == "pcap" and sep) or is_capture_file(spec):
        if bpf:
            raise CaptureError(spec, "a BPF filter applies to interfaces only")
        return PcapFileSource(spec, rest if kind == "pcap" and sep else spec, snaplen=snaplen)
    raise CaptureError(spec, "unknown capture source (iface:NAME, qemu-mirror:PATH, pcap:PATH or a .pcap/.pcapng path)")


# -- pcap files ---------------------------------------------------------------------------
class PcapFileSource:
    """Frames from a pcap or pcapng file, in file order, in batches; ends at end of file."""

    BATCH = 1024

    def __init__(self, name: str, path: str, *, snaplen: int = 65535) -> None:
        self.name = name
        self._reader = PcapReader(path)
        self._snaplen = snaplen
        self._opened = time.monotonic()
        self._packets = 0
        self._bytes = 0
        self._truncated = 0

    def batches(self, stop: threading.Event | None = None, timeout: float = 0.2) -> Iterator[list[RawFrame]]:
        batch: list[RawFrame] = []
        snap = self._snaplen
        for fr in self._reader:
            if len(fr[1]) > snap:
                fr = (fr[0], fr[1][:snap], fr[2], fr[3])
            if len(fr[1]) < fr[2]:
                self._truncated += 1
            self._bytes += fr[2]
            batch.append(fr)
            if len(batch) >= self.BATCH:
                self._packets += len(batch)
                yield batch
                batch = []
                if stop is not None and stop.is_set():
                    return
        if batch:
            self._packets += len(batch)
            yield batch

    def stats(self) -> CaptureStats:
        return CaptureStats(self._reader.source, self._packets, self._bytes, 0, 0, self._truncated, 0, time.monotonic() - self._opened, "file")

    def close(self) -> None:
        self._reader.close()


# -- network namespaces -------------------------------------------------------------------
CLONE_NEWNET = 0x40000000


@contextmanager
def _in_netns(netns: str | None, source: str) -> Iterator[None]:
    """Run the body in network namespace `netns` (this thread only), then come back.

    Sockets keep the namespace they were created in, so a source opened here reads that
    namespace's interfaces from anywhere in the process.
    """
    if not netns:
        yield
        return
    if "/" in netns or netns in (".", ".."):
        raise CaptureError(source, f"{netns!r} is not a network namespace name")
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    except OSError as e:
        raise CaptureError(source, f"network namespace {netns}: {e.strerror}") from e
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise CaptureError(source, f"cannot enter network namespace {netns}: {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:  # pragma: no cover - would leave the thread elsewhere
                raise OSError(ctypes.get_errno(), "cannot return to the original network namespace")
    finally:
        os.close(target)
        os.close(home)


# -- BPF ----------------------------------------------------------------------------------
def compile_bpf(expr: str, source: str) -> bytes:
    """Compile a tcpdump filter expression to classic BPF (struct sock_filter array) with tcpdump."""
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        raise CaptureError(source, "a BPF filter needs tcpdump to compile it, and tcpdump is not installed")
    try:
        out = subprocess.run([tcpdump, "-y", "EN10MB", "-ddd", expr], capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired as e:
        raise CaptureError(source, f"tcpdump took too long compiling filter {expr!r}") from e
    if out.returncode != 0:
        msg = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit status {out.returncode}"
        raise CaptureError(source, f"bad BPF filter {expr!r}: {msg}")
    lines = out.stdout.split()
    try:
        count = int(lines[0])
        nums = [int(x) for x in lines[1:]]
    except (IndexError, ValueError) as e:
        raise CaptureError(source, f"cannot read tcpdump's compiled filter for {expr!r}") from e
    if count < 1 or count > 4096 or len(nums) != 4 * count:
        raise CaptureError(source, f"tcpdump's compiled filter for {expr!r} has a bad instruction count")
    return b"".join(struct.pack("HBBI", *nums[i : i + 4]) for i in range(0, len(nums), 4))


SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33


def _attach_bpf(sock: socket.socket, prog: bytes, source: str) -> None:
    buf = ctypes.create_string_buffer(prog, len(prog))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(buf))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as e:
        raise CaptureError(source, f"the kernel refused the BPF filter: {e.strerror}") from e


# -- AF_PACKET ----------------------------------------------------------------------------
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_AUXDATA = 8
PACKET_VERSION = 10
TPACKET_V3 = 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
ETH_P_ALL = 3

# A block is handed over when full or when RETIRE_TOV_MS passes, partly filled. A retired
# block takes a whole block's room in the ring however few frames it holds, so at moderate
# rates the ring's depth is block count x timeout, not its size in bytes: many smaller
# blocks and a less eager timeout keep a short stall of the reader from becoming loss
# (1 MiB blocks retired every 10 ms dropped frames at 47 k packets/s with a 4 MiB ring).
BLOCK_SIZE = 1 << 18  # 256 KiB: hundreds of frames per hand-over
FRAME_SIZE = 2048  # TPACKET_V3 packs frames by size; this only sets the nominal frame count
RETIRE_TOV_MS = 50  # bounds how long a frame can wait in a partly filled block

_BLOCK_HDR = struct.Struct("=III")  # block_status, num_pkts, offset_to_first_pkt (at +8)
_PKT_HDR = struct.Struct("=IIIIIIH")  # tpacket3_hdr: next_offset, sec, nsec, snaplen, len, status, mac
_VLAN = struct.Struct("=IH")  # hv1.tp_vlan_tci, hv1.tp_vlan_tpid (at +32, after tp_net and hv1.tp_rxhash)
_U32 = struct.Struct("=I")
_AUX = struct.Struct("=IIIHHHH")  # tpacket_auxdata
_STATS_V3 = struct.Struct("=III")  # tp_packets, tp_drops, tp_freeze_q_cnt
_TAG = struct.Struct("!HH")  # a VLAN tag put back into a frame: TPID, TCI


def _walk_block_py(
    buf: Any, base: int, limit: int, first: int, max_frames: int, snap: int, label: str, out: list[RawFrame]
) -> tuple[int, int, int]:
    """Append the frames of the TPACKET_V3 block at `base` (ending at `limit`) to `out`:
    (ts, frame, wirelen, label) each, following tp_next_offset from `first`, at most
    `max_frames`. Returns (bytes on the wire, frames cut short, ring errors).

    The reference for the C walk in sva/net/_fastpath.c (used when it is built). The ring
    is shared with the kernel: every offset is checked against the block's end before use.
    """
    unpack_pkt = _PKT_HDR.unpack_from
    unpack_vlan = _VLAN.unpack_from
    append = out.append
    n_bytes = truncated = errors = 0
    off = first
    for _ in range(max_frames):
        p = base + off
        if p + 40 > limit:  # through hv1.tp_vlan_tpid
            errors += 1
            break
        nxt, sec, nsec, caplen, wirelen, pstatus, mac = unpack_pkt(buf, p)
        start = p + mac
        end = start + (caplen if caplen <= snap else snap)
        if end > limit:
            errors += 1
            break
        frame = buf[start:end]
        if pstatus & TP_STATUS_VLAN_VALID:
            # The kernel took the outermost tag off into the header; put it back so the
            # frame is what was on the wire and the parser sees the VLAN.
            tci, tpid = unpack_vlan(buf, p + 32)
            tp = tpid if pstatus & TP_STATUS_VLAN_TPID_VALID and tpid else 0x8100
            frame = frame[:12] + _TAG.pack(tp, tci & 0xFFFF) + frame[12:]
            wirelen += 4
            caplen += 4
        if caplen < wirelen or caplen > snap:
            truncated += 1
        n_bytes += wirelen
        append((sec + nsec * 1e-9, frame, wirelen, label))
        if not nxt:
            break
        off += nxt
    return n_bytes, truncated, errors


try:  # the optional C walk (built by `pip install -e .` where gcc and python3-dev are)
    from sva.net._fastpath import walk_block as _walk_block_c
except ImportError:  # pragma: no cover - depends on the build
    _walk_block_c = None
_walk_block = _walk_block_c if _walk_block_c is not None else _walk_block_py


class _Ring:
    """One interface's TPACKET_V3 ring (or, without one, its plain socket)."""

    def __init__(self, sock: socket.socket, label: str, mm: mmap.mmap | None, block_nr: int) -> None:
        self.sock = sock
        self.label = label
        self.mm = mm
        self.block_nr = block_nr
        self.index = 0
        self.buf = bytearray(65536 + 4) if mm is None else None


class InterfaceSource:
    """Frames from one or more Linux interfaces through AF_PACKET, each labeled with its interface."""

    def __init__(self, name: str, ifaces: list[str], *, snaplen: int, ring_mb: int, use_ring: bool, bpf: bytes | None) -> None:
        self.name = name
        self.snaplen = snaplen
        self.mode = ""
        self._rings: list[_Ring] = []
        self._opened = time.monotonic()
        self._packets = 0
        self._bytes = 0
        self._truncated = 0
        self._ring_errors = 0
        self._link_errors = 0  # socket errors reported by poll (link down/removed)
        self._k_packets = 0
        self._k_drops = 0
        self._k_freeze = 0
        self._closed = False
        self._lock = threading.Lock()
        try:
            for ifname in ifaces:
                self._rings.append(self._open(ifname, ring_mb, use_ring, bpf))
        except BaseException:
            self.close()
            raise
        modes = {"recv" if r.mm is None else "tpacket_v3" for r in self._rings}
        self.mode = "+".join(sorted(modes))
        self._poll = select.poll()
        self._by_fd: dict[int, _Ring] = {}
        for r in self._rings:
            self._poll.register(r.sock.fileno(), select.POLLIN | select.POLLERR)
            self._by_fd[r.sock.fileno()] = r

    def _open(self, ifname: str, ring_mb: int, use_ring: bool, bpf: bytes | None) -> _Ring:
        src = f"{self.name} ({ifname})" if "," in self.name else self.name
        try:
            # Protocol 0: no frames arrive until bind, so the ring starts with this interface's only.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError as e:
            raise CaptureError(src, "reading an interface needs root or CAP_NET_RAW") from e
        except OSError as e:
            raise CaptureError(src, f"cannot open a packet socket: {e.strerror}") from e
        try:
            if bpf is not None:
                _attach_bpf(sock, bpf, src)
            mm: mmap.mmap | None = None
            block_nr = 0
            if use_ring:
                mm, block_nr = self._setup_ring(sock, ring_mb)
            if mm is None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, max(ring_mb, 1) << 20)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(ring_mb, 1) << 20)
                sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            try:
                sock.bind((ifname, ETH_P_ALL))
            except OSError as e:
                if e.errno == errno.ENODEV:
                    raise CaptureError(src, f"no interface named {ifname}") from e
                raise CaptureError(src, f"cannot bind to {ifname}: {e.strerror}") from e
            sock.setblocking(False)
            return _Ring(sock, ifname, mm, block_nr)
        except BaseException:
            sock.close()
            raise

    @staticmethod
    def _setup_ring(sock: socket.socket, ring_mb: int) -> tuple[mmap.mmap | None, int]:
        """Set up the TPACKET_V3 ring; (None, 0) if the kernel refuses it (then plain receives)."""
        block_nr = max(2, (ring_mb << 20) // BLOCK_SIZE)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            req = struct.pack("=IIIIIII", BLOCK_SIZE, block_nr, FRAME_SIZE, BLOCK_SIZE * block_nr // FRAME_SIZE, RETIRE_TOV_MS, 0, 0)
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            mm = mmap.mmap(sock.fileno(), BLOCK_SIZE * block_nr, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            return None, 0
        return mm, block_nr

    # Reading --------------------------------------------------------------------------
    def batches(self, stop: threading.Event | None = None, timeout: float = 0.2) -> Iterator[list[RawFrame]]:
        poll_ms = max(0, int(timeout * 1000))
        idle_polls = 0
        while not self._closed and not (stop is not None and stop.is_set()):
            batch: list[RawFrame] = []
            with self._lock:  # close() from another thread waits for the ring walk to finish
                if self._closed:
                    return
                for r in self._rings:
                    if r.mm is not None:
                        self._drain_ring(r, batch)
                    else:
                        self._drain_socket(r, batch)
            if batch:
                idle_polls = 0
                self._packets += len(batch)
                yield batch
                continue
            if idle_polls:
                # Readable, yet nothing to read (a block retired between the checks): hand the
                # caller an empty batch so a spurious wake-up can never turn into a busy loop.
                idle_polls = 0
                yield []
                continue
            try:
                events = self._poll.poll(poll_ms)
            except InterruptedError:
                events = []
            for fd, ev in events:
                if ev & select.POLLERR:
                    # The interface went down (ENETDOWN) or away: read the error to clear it,
                    # count it, and keep reading (a link that comes back up delivers again).
                    self._by_fd[fd].sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    self._link_errors += 1
            if events:
                idle_polls += 1
            else:
                yield []

    def _drain_ring(self, r: _Ring, out: list[RawFrame]) -> None:
        """Move the frames of every block the kernel has handed over into `out` (up to MAX_BATCH)."""
        mm = r.mm
        assert mm is not None
        unpack_block = _BLOCK_HDR.unpack_from
        walk = _walk_block
        label = r.label
        snap = self.snaplen
        n_bytes = 0
        truncated = 0
        while len(out) < MAX_BATCH:
            base = r.index * BLOCK_SIZE
            status, num, first = unpack_block(mm, base + 8)
            if not status & TP_STATUS_USER:
                break
            nb, tr, errors = walk(mm, base, base + BLOCK_SIZE, first, min(num, BLOCK_SIZE // 32), snap, label, out)
            n_bytes += nb
            truncated += tr
            self._ring_errors += errors
            _U32.pack_into(mm, base + 8, TP_STATUS_KERNEL)  # hand the block back
            r.index = (r.index + 1) % r.block_nr
        self._bytes += n_bytes
        self._truncated += truncated

    def _drain_socket(self, r: _Ring, out: list[RawFrame]) -> None:
        buf = r.buf
        assert buf is not None
        view = memoryview(buf)
        sock = r.sock
        snap = self.snaplen
        flags = socket.MSG_TRUNC | socket.MSG_DONTWAIT
        anc = socket.CMSG_SPACE(_AUX.size)
        while len(out) < MAX_BATCH:
            try:
                nbytes, ancdata, _fl, _addr = sock.recvmsg_into([view], anc, flags)
            except (BlockingIOError, InterruptedError):
                return
            got = min(nbytes, len(buf))
            frame = bytes(view[:got])
            wirelen = nbytes
            for level, kind, data in ancdata:
                if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= _AUX.size:
                    st, tlen, _snap, _mac, _net, tci, tpid = _AUX.unpack_from(data)
                    wirelen = tlen
                    if st & TP_STATUS_VLAN_VALID:
                        tp = tpid if st & TP_STATUS_VLAN_TPID_VALID and tpid else 0x8100
                        frame = frame[:12] + struct.pack("!HH", tp, tci) + frame[12:]
                        wirelen += 4
            if len(frame) > snap:
                frame = frame[:snap]
            if len(frame) < wirelen:
                self._truncated += 1
            self._bytes += wirelen
            out.append((time.time(), frame, wirelen, r.label))

    # Statistics -----------------------------------------------------------------------
    def _read_kernel_stats(self) -> None:
        for r in self._rings:
            try:
                raw = r.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS_V3.size)
            except OSError:
                continue
            # Reading resets the kernel's counters: accumulate.
            if len(raw) >= 12:
                packets, drops, freeze = _STATS_V3.unpack_from(raw)
                self._k_freeze += freeze
            else:
                packets, drops = struct.unpack_from("=II", raw)
            self._k_packets += packets
            self._k_drops += drops

    def stats(self) -> CaptureStats:
        with self._lock:
            if not self._closed:
                self._read_kernel_stats()
        return CaptureStats(
            self.name,
            self._packets,
            self._bytes,
            self._k_drops,
            self._ring_errors,
            self._truncated,
            0,
            time.monotonic() - self._opened,
            self.mode,
            self._link_errors,
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._rings:
                self._read_kernel_stats()
            self._closed = True
            for r in self._rings:
                if r.mm is not None:
                    r.mm.close()
                r.sock.close()


# -- QEMU filter-mirror -------------------------------------------------------------------
MIRROR_MAX_FRAME = 65536 + 4096  # QEMU's largest packet (64 KiB GSO) plus headroom; beyond is a broken stream
MIRROR_QUEUE_FRAMES = 65536  # frames held between the reader thread and the consumer


class QemuMirrorSource:
    """A QEMU filter-mirror chardev stream: each frame is a 4-byte big-endian length, then the frame.

    A thread reads the socket all the time, because QEMU stops the guest's NIC when the
    reader stops; frames wait in a bounded queue for `batches()`, and if the consumer
    falls that far behind, the newest frames are dropped and counted in `ring_drops`.
    """

    def __init__(self, name: str, path: str, *, listen: bool = False, snaplen: int = 65535, connect_timeout: float = 10.0) -> None:
        self.name = name
        self.path = path
        self._snaplen = snaplen
        self._opened = time.monotonic()
        self._queue: deque[RawFrame] = deque()
        self._cond = threading.Condition()
        self._packets = 0
        self._bytes = 0
        self._truncated = 0
        self._drops = 0
        self._error: CaptureError | None = None
        self._eof = False
        self._closed = False
        self._listener: socket.socket | None = None
        self._sock: socket.socket | None = None
        if len(os.fsencode(path)) > 107:
            raise CaptureError(name, "unix socket path is longer than 107 bytes")
        if listen:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if Path(path).is_socket():
                    Path(path).unlink()
                self._listener.bind(path)
                self._listener.listen(1)
            except OSError as e:
                self._listener.close()
                raise CaptureError(name, f"cannot listen on {path}: {e.strerror or e}") from e
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(connect_timeout)
            try:
                sock.connect(path)
            except OSError as e:
                sock.close()
                raise CaptureError(name, f"cannot connect to {path}: {e.strerror or e}") from e
            self._sock = sock
        self._thread = threading.Thread(target=self._reader, name=f"qemu-mirror {path}", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        try:
            if self._listener is not None:
                self._listener.settimeout(0.5)
                while not self._closed:
                    try:
                        self._sock, _ = self._listener.accept()
                        break
                    except TimeoutError:
                        continue
                if self._sock is None:
                    return
            self._sock.settimeout(0.5)  # type: ignore[union-attr]
            self._read_stream(self._sock)  # type: ignore[arg-type]
        except CaptureError as e:
            self._error = e
        except OSError as e:
            if not self._closed:
                self._error = CaptureError(self.name, f"read failed: {e.strerror or e}")
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _read_stream(self, sock: socket.socket) -> None:
        buf = bytearray()
        pos = 0
        snap = self._snaplen
        queue = self._queue
        while not self._closed:
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                if len(buf) - pos:
                    raise CaptureError(self.name, f"stream ended inside a frame ({len(buf) - pos} bytes left over)")
                return
            buf += chunk
            frames: list[RawFrame] = []
            now = time.time()
            bad: CaptureError | None = None
            while len(buf) - pos >= 4:
                n = int.from_bytes(buf[pos : pos + 4], "big")
                if n == 0 or n > MIRROR_MAX_FRAME:
                    bad = CaptureError(self.name, f"bad frame length {n} in the mirror stream (not a filter-mirror socket, or vnet_hdr_support is on)")
                    break
                if len(buf) - pos - 4 < n:
                    break
                frame = bytes(buf[pos + 4 : pos + 4 + min(n, snap)])
                pos += 4 + n
                if n > snap:
                    self._truncated += 1
                frames.append((now, frame, n, ""))
            if pos:
                del buf[:pos]
                pos = 0
            if frames:
                with self._cond:
                    room = MIRROR_QUEUE_FRAMES - len(queue)
                    if room < len(frames):
                        self._drops += len(frames) - max(room, 0)
                        frames = frames[: max(room, 0)]
                    queue.extend(frames)
                    self._cond.notify_all()
            if bad is not None:
                raise bad  # after the frames before it are queued: they were fine

    def batches(self, stop: threading.Event | None = None, timeout: float = 0.2) -> Iterator[list[RawFrame]]:
        queue = self._queue
        while not (stop is not None and stop.is_set()):
            with self._cond:
                if not queue and not self._eof:
                    self._cond.wait(timeout)
                batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
                done = self._eof and not queue
            if batch:
                self._packets += len(batch)
                self._bytes += sum(f[2] for f in batch)
                yield batch
            elif done:
                if self._error is not None:
                    raise self._error
                return
            else:
                yield []

    def stats(self) -> CaptureStats:
        return CaptureStats(self.name, self._packets, self._bytes, 0, self._drops, self._truncated, 0, time.monotonic() - self._opened, "stream")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._thread.join(timeout=2.0)
        for s in (self._sock, self._listener):
            if s is not None:
                s.close()
        if self._listener is not None:
            try:
                Path(self.path).unlink()
            except OSError:
                pass
