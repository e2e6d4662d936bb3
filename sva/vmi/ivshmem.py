"""A guest's RAM seen from inside the appliance VM, as the BAR of an `ivshmem-plain` device.

On a QEMU/KVM host the appliance VM gets each guest's RAM file as a PCI BAR:

    -object memory-backend-file,id=g1,mem-path=<guest RAM file>,size=<size>,share=on,readonly=on
    -device ivshmem-plain,memdev=g1

Inside the appliance that BAR is `/sys/bus/pci/devices/<BDF>/resource2`. Its offsets are the
RAM file's offsets, so the guest-physical layout QEMU reports for the guest (over QMP,
through the host's allow-list proxy) applies unchanged: this backend is a `QemuBackend`
whose bytes come from the BAR instead of the host path. The kernel gives a memory BAR no
read() (it answers EIO), so every access goes through the read-only mapping
(O_RDONLY, PROT_READ): the appliance cannot write to the guest even by mistake.

Target syntax:
  ivshmem:RAM?qmp=QMP
    RAM  a PCI address (0000:00:04.0 or 00:04.0) whose BAR2 is used, or a path to an
         mmap-able file (the resource2 file itself, or any file laid out like the RAM file)
    QMP  a unix socket path, or tcp:HOST:PORT (e.g. a slirp guestfwd to the host proxy)
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from sva.errors import MemoryAccessError, QmpError, TargetError
from sva.vmi.qemu import QemuBackend
from sva.vmi.qmp import QmpClient

SYSFS_PCI = Path("/sys/bus/pci/devices")
IVSHMEM_IDS = ("0x1af4", "0x1110")  # Red Hat vendor id, inter-VM shared memory device
_BDF = re.compile(r"^(?:(?P<dom>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<dev>[0-1][0-9a-fA-F])\.(?P<fn>[0-7])$")
_TCP = re.compile(r"^tcp:(?P<host>[^:\s]+):(?P<port>\d{1,5})$")
MAX_SPEC = 4096  # a target string is config input: refuse absurd ones before parsing


@dataclass(frozen=True)
class IvshmemSpec:
    """A parsed `ivshmem:` target."""

    ram_path: str
    qmp: str  # a unix socket path or tcp:HOST:PORT
    pci_address: str | None = None  # set when RAM was given as a PCI address

    @property
    def qmp_tcp(self) -> tuple[str, int] | None:
        m = _TCP.match(self.qmp)
        return (m["host"], int(m["port"])) if m else None


def parse_spec(rest: str, target: str | None = None) -> IvshmemSpec:
    """Parse what follows `ivshmem:`; errors name the whole target."""
    target = target or f"ivshmem:{rest}"
    if len(rest) > MAX_SPEC:
        raise TargetError(target[:80] + "…", f"target longer than {MAX_SPEC} characters")
    ram, _, query = rest.partition("?")
    if not ram:
        raise TargetError(target, "ivshmem: needs a PCI address or a BAR path before '?'")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise TargetError(target, f"cannot parse the parameters {query!r}; use ?qmp=…") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key != "qmp":
            raise TargetError(target, f"unknown parameter {key!r}; only qmp= is known")
        if key in params:
            raise TargetError(target, "qmp= given twice")
        params[key] = value
    qmp = params.get("qmp", "")
    if not qmp:
        raise TargetError(target, "ivshmem: needs ?qmp=SOCKET or ?qmp=tcp:HOST:PORT (the VM's QMP, via the host proxy)")
    if qmp.startswith("tcp:"):
        m = _TCP.match(qmp)
        if not m or not 0 < int(m["port"]) < 65536:
            raise TargetError(target, f"qmp={qmp!r} is not tcp:HOST:PORT")
    m = _BDF.match(ram)
    if m:
        bdf = f"{(m['dom'] or '0000').lower()}:{m['bus'].lower()}:{m['dev'].lower()}.{m['fn']}"
        return IvshmemSpec(str(SYSFS_PCI / bdf / "resource2"), qmp, bdf)
    return IvshmemSpec(ram, qmp)


def _check_ivshmem_device(spec: IvshmemSpec, target: str) -> None:
    """A BAR path under sysfs must belong to an ivshmem device, not some other PCI device."""
    dev = Path(spec.ram_path).parent
    if not (dev / "vendor").exists():
        if spec.pci_address is not None:
            raise TargetError(target, f"no PCI device {spec.pci_address} (see lspci; the host adds -device ivshmem-plain)")
        return  # a plain file laid out like the RAM file
    try:
        ids = ((dev / "vendor").read_text().strip(), (dev / "device").read_text().strip())
    except OSError as e:
        raise TargetError(target, f"cannot read the PCI ids of {dev}: {e.strerror}") from None
    if ids != IVSHMEM_IDS:
        raise TargetError(target, f"PCI device {dev.name} is {ids[0]}:{ids[1]}, not ivshmem (0x1af4:0x1110)")


class TcpQmpClient(QmpClient):
    """QMP over TCP: how the appliance reaches the host proxy through a slirp guestfwd.

    Each connection is a new QMP session (the host spawns one proxy client per connection),
    so the greeting/capabilities handshake is the same as on a unix socket.
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self._addr = (host, port)
        super().__init__(f"tcp:{host}:{port}", timeout=timeout)

    def _connect(self) -> None:
        try:
            sock = socket.create_connection(self._addr, timeout=self.timeout)
        except OSError as e:
            raise self._fail(f"cannot connect: {e.strerror or e}") from None
        self._sock = sock
        try:
            greeting = self._read_message("no QMP greeting (is the host's QMP proxy running?)")
            if "QMP" not in greeting:
                raise self._fail("the peer answered, but not with a QMP greeting")
            self.version = greeting["QMP"].get("version", {})
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise


class IvshmemBackend(QemuBackend):
    """A live guest whose RAM is an ivshmem BAR (mapped read-only) and whose QMP is proxied."""

    def __init__(self, spec: IvshmemSpec, target: str | None = None, timeout: float = 5.0) -> None:
        target = target or f"ivshmem:{spec.ram_path}?qmp={spec.qmp}"
        _check_ivshmem_device(spec, target)
        if not os.path.exists(spec.ram_path):
            raise TargetError(target, f"no BAR file {spec.ram_path}")
        tcp = spec.qmp_tcp
        try:
            qmp = TcpQmpClient(*tcp, timeout=timeout) if tcp else QmpClient(spec.qmp, timeout=timeout)
        except QmpError as e:
            raise TargetError(target, f"QMP {spec.qmp}: {e.reason}") from None
        self.spec = spec
        super().__init__(spec.qmp, target=target, timeout=timeout, qmp=qmp, ram_path=spec.ram_path)

    def _copy_run(self, off: int, dst: memoryview, gpa: int) -> None:
        """From the mapping: a memory BAR has no read(), only mmap."""
        if off + len(dst) > len(self._mv):
            raise MemoryAccessError(gpa, len(dst), f"{self.path} ends at offset 0x{len(self._mv):x}")
        dst[:] = self._mv[off : off + len(dst)]

    def _read_live(self, gpa: int, out: memoryview) -> int:
        """Copy from the mapping: a memory BAR has no read(), only mmap."""
        pos = 0
        for _region, off, n in self.memory_map.translate(gpa, len(out)):
            if off + n > len(self._mv):
                raise MemoryAccessError(gpa, len(out), f"{self.path} ends at offset 0x{len(self._mv):x}")
            out[pos : pos + n] = self._mv[off : off + n]
            pos += n
        return pos


def open_ivshmem_target(rest: str, target: str, timeout: float = 5.0) -> IvshmemBackend:
    return IvshmemBackend(parse_spec(rest, target), target=target, timeout=timeout)
