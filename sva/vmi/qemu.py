"""Live QEMU guests: RAM from a shared memory-backend-file, control and vCPU state over QMP.

The guest's RAM must be a `memory-backend-file` with `share=on`, so that the file QEMU
maps is the guest's memory itself. We open that file O_RDONLY and map it PROT_READ: the
appliance has no way to write to the guest. Where guest-physical addresses live in the
file comes from QEMU's flattened memory tree (`info mtree -f`), never from assumptions:
on q35, RAM above 2 GiB continues in the file but sits at GPA 4 GiB.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from sva.errors import QmpError, TargetError
from sva.vmi.base import Capabilities, MappedBackend, MemoryMap, MemoryRegion, PauseRecord, Registers
from sva.vmi.qmp import QmpClient

SHARE_HINT = (
    "start QEMU with its RAM in a shared file, e.g. "
    "-object memory-backend-file,id=ram0,size=<RAM>,mem-path=/run/sva/<vm>.ram,share=on "
    "-machine memory-backend=ram0"
)

# A flat-view line: "  0000000000100000-000000007fffffff (prio 0, ram): ram0 @0000000000100000"
_FLAT_LINE = re.compile(
    r"^\s*(?P<start>[0-9a-f]+)-(?P<last>[0-9a-f]+) \(prio -?\d+, (?P<kind>[a-z]+)\): "
    r"(?P<name>\S+)(?: @(?P<off>[0-9a-f]+))?"
)


@dataclass(frozen=True)
class RamBackendInfo:
    """A QEMU host-memory backend object as QOM reports it."""

    id: str
    qom_type: str
    mem_path: str | None
    share: bool
    size: int


def parse_flat_memory_map(mtree: str, region_names: set[str]) -> list[tuple[str, int, int, int]]:
    """Pick the system address space out of `info mtree -f` text.

    Returns (backend region name, gpa, size, offset in that region) for every flat-view
    range backed by one of `region_names`, adjacent pieces merged.
    """
    views = re.split(r"^FlatView #\d+\s*$", mtree, flags=re.M)
    system = next((v for v in views if re.search(r'^\s*AS "memory"', v, flags=re.M)), None)
    if system is None:
        return []
    out: list[tuple[str, int, int, int]] = []
    for line in system.splitlines():
        m = _FLAT_LINE.match(line)
        if not m or m["name"] not in region_names or m["kind"] not in ("ram", "rom", "romd"):
            continue
        start, last = int(m["start"], 16), int(m["last"], 16)
        off = int(m["off"], 16) if m["off"] else 0
        size = last - start + 1
        if out and out[-1][0] == m["name"]:
            name, pgpa, psize, poff = out[-1]
            if pgpa + psize == start and poff + psize == off:
                out[-1] = (name, pgpa, psize + size, poff)
                continue
        out.append((m["name"], start, size, off))
    return out


_REG = re.compile(r"\b([A-Z][A-Z0-9]*)\s*=\s*([0-9a-fA-F]+)\b")
_TABLE = re.compile(r"^(GDT|IDT)=\s+([0-9a-fA-F]+)\s+([0-9a-fA-F]+)", re.M)
_SEG = re.compile(r"^(ES|CS|SS|DS|FS|GS|LDT|TR)\s*=([0-9a-fA-F]+) ([0-9a-fA-F]+) ([0-9a-fA-F]+) ([0-9a-fA-F]+)", re.M)
_ALIASES = {"EIP": "RIP", "ESP": "RSP", "EFL": "RFL", "RFL": "RFL"}


def parse_info_registers(text: str) -> list[Registers]:
    """Parse `info registers -a` output (all vCPUs, 32- or 64-bit layout)."""
    blocks = re.split(r"^CPU#(\d+)\s*$", text, flags=re.M)
    if len(blocks) == 1:  # a single vCPU printed without a header
        blocks = ["", "0", text]
    result: list[Registers] = []
    for i in range(1, len(blocks) - 1, 2):
        vcpu, body = int(blocks[i]), blocks[i + 1]
        vals: dict[str, int] = {}
        for line in body.splitlines():
            if line.startswith(("GDT", "IDT", "FPR", "XMM", "YMM", "ZMM", "FCW", "Code")):
                continue
            if _SEG.match(line):
                continue
            for name, value in _REG.findall(line):
                vals[_ALIASES.get(name, name)] = int(value, 16)
        tables = {m[1]: (int(m[2], 16), int(m[3], 16)) for m in _TABLE.finditer(body)}
        extra = {
            k.lower(): v
            for k, v in vals.items()
            if k in ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "R8", "R9", "R10", "R11",
                     "R12", "R13", "R14", "R15", "EAX", "EBX", "ECX", "EDX", "ESI", "EDI", "EBP", "CPL")
        }
        for m in _SEG.finditer(body):
            extra[f"{m[1].lower()}_selector"] = int(m[2], 16)
            extra[f"{m[1].lower()}_base"] = int(m[3], 16)
        missing = [k for k in ("RIP", "RSP", "CR0", "CR3", "CR4") if k not in vals]
        if missing or "GDT" not in tables or "IDT" not in tables:
            raise ValueError(f"vCPU {vcpu}: registers missing from monitor output: {missing or 'GDT/IDT'}")
        result.append(
            Registers(
                vcpu=vcpu,
                rip=vals["RIP"],
                rsp=vals["RSP"],
                rflags=vals.get("RFL", 0),
                cr0=vals["CR0"],
                cr2=vals.get("CR2", 0),
                cr3=vals["CR3"],
                cr4=vals["CR4"],
                efer=vals.get("EFER", 0),
                idtr_base=tables["IDT"][0],
                idtr_limit=tables["IDT"][1],
                gdtr_base=tables["GDT"][0],
                gdtr_limit=tables["GDT"][1],
                extra=extra,
            )
        )
    return result


class QemuBackend(MappedBackend):
    """A running QEMU guest, reached through its QMP unix socket."""

    capabilities = Capabilities(live=True, pause=True, registers=True)

    def __init__(
        self,
        qmp_path: str,
        target: str | None = None,
        timeout: float = 5.0,
        *,
        qmp: QmpClient | None = None,
        ram_path: str | None = None,
    ) -> None:
        """`qmp` (an open client) and `ram_path` let another view of the same RAM be used,
        e.g. an appliance VM that sees the guest's RAM file as an ivshmem BAR and reaches
        QMP through a proxy: the layout still comes from QMP, the bytes from `ram_path`."""
        target = target or f"qemu:{qmp_path}"
        self.qmp = qmp if qmp is not None else QmpClient(qmp_path, timeout=timeout)
        try:
            self.ram_backends = self._ram_backends(target)
            memory_map, path = self._memory_layout(target, ram_path)
            self._vcpus = len(self.qmp.execute("query-cpus-fast"))
            super().__init__(target, path, memory_map)
        except BaseException:
            self.qmp.close()
            raise

    # -- discovery ------------------------------------------------------------------
    def _ram_backends(self, target: str) -> list[RamBackendInfo]:
        found = []
        for child in self.qmp.execute("qom-list", {"path": "/objects"}):
            ctype = child.get("type", "")
            if not (ctype.startswith("child<memory-backend-") and ctype.endswith(">")):
                continue
            oid = child["name"]
            qtype = ctype[len("child<") : -1]
            path = f"/objects/{oid}"
            share = bool(self.qmp.execute("qom-get", {"path": path, "property": "share"}))
            size = int(self.qmp.execute("qom-get", {"path": path, "property": "size"}))
            mem_path = None
            if qtype == "memory-backend-file":
                mem_path = self.qmp.execute("qom-get", {"path": path, "property": "mem-path"})
            found.append(RamBackendInfo(oid, qtype, mem_path, share, size))
        return found

    def _memory_layout(self, target: str, ram_path: str | None = None) -> tuple[MemoryMap, str]:
        if not self.ram_backends:
            raise TargetError(target, f"the VM's RAM is not in a memory backend object; {SHARE_HINT}")
        names = {b.id for b in self.ram_backends}
        pieces = parse_flat_memory_map(self.qmp.hmp("info mtree -f"), names)
        used = {p[0] for p in pieces}
        if not pieces:
            raise TargetError(target, "QEMU's memory tree shows no RAM from a memory backend object")
        if len(used) > 1:
            raise TargetError(
                target, f"RAM is split over several backends ({', '.join(sorted(used))}); one backend is supported"
            )
        info = next(b for b in self.ram_backends if b.id in used)
        if info.qom_type != "memory-backend-file" or not info.mem_path:
            raise TargetError(target, f"RAM backend {info.id!r} is a {info.qom_type}, not a file; {SHARE_HINT}")
        if not info.share:
            raise TargetError(
                target,
                f"RAM backend {info.id!r} has share=off, so its file is not the live guest memory; {SHARE_HINT}",
            )
        regions = [MemoryRegion(gpa=g, size=s, offset=o, name=n) for n, g, s, o in pieces]
        if ram_path is not None:
            # The host's mem-path is not visible from here; the caller's view of it is.
            return MemoryMap(regions), ram_path
        try:
            st = os.stat(info.mem_path)
        except OSError as e:
            raise TargetError(target, f"RAM file {info.mem_path} of backend {info.id!r}: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise TargetError(
                target,
                f"RAM backend {info.id!r} has mem-path={info.mem_path}, a directory, so QEMU's file is anonymous; "
                "give mem-path a file name",
            )
        return MemoryMap(regions), info.mem_path

    # -- vCPU -------------------------------------------------------------------------
    @property
    def vcpu_count(self) -> int:
        return self._vcpus

    def all_regs(self) -> list[Registers]:
        text = self.qmp.hmp("info registers -a")
        try:
            return parse_info_registers(text)
        except ValueError as e:
            raise QmpError(self.target, f"cannot parse 'info registers': {e}") from None

    def regs(self, vcpu: int = 0) -> Registers:
        if not 0 <= vcpu < self._vcpus:
            raise TargetError(self.target, f"no vCPU {vcpu}; the VM has {self._vcpus}")
        if self._overlay is not None:
            return self._overlay.register(vcpu, self._live_regs)
        return self._live_regs(vcpu)

    def _all_registers(self) -> list[Registers]:
        return list(self.all_regs())

    def _live_regs(self, vcpu: int) -> Registers:
        for r in self.all_regs():
            if r.vcpu == vcpu:
                return r
        raise QmpError(self.target, f"QEMU printed no registers for vCPU {vcpu}")

    # -- execution control ------------------------------------------------------------
    def status(self) -> str:
        """QEMU's run state: 'running', 'paused', 'shutdown', …"""
        return str(self.qmp.execute("query-status").get("status", "unknown"))

    def pause(self) -> None:
        self.qmp.execute("stop")

    def resume(self) -> None:
        self.qmp.execute("cont")

    def _stop_if_running(self) -> bool:
        """Stop the guest; True if it was running, i.e. if we are the ones who stopped it.

        QEMU raises a STOP event only when the run state changes, and sends it before the
        reply to `stop`. Seeing it costs no extra round trip; not seeing it falls back to
        asking, and any late STOP event reaches us before that answer.
        """
        self.qmp.execute("stop")
        if any(e.get("event") == "STOP" for e in self.qmp.last_events):
            return True
        status = self.qmp.execute("query-status")
        if any(e.get("event") == "STOP" for e in self.qmp.last_events):
            return True
        if status.get("running", False):
            # Someone resumed it between our two commands: stop it again, ours now.
            self.qmp.execute("stop")
            return True
        return False

    @contextlib.contextmanager
    def frozen(self) -> Iterator[PauseRecord]:
        """Pause for the block and always resume after, also on error or Ctrl-C.

        A guest that was already paused (by an admin, or by a nested freeze) stays
        paused: we only resume what we stopped. `seconds` spans from sending `stop` to
        the reply to `cont`, an upper bound of the time the guest stood still.
        """
        rec = PauseRecord(started=time.monotonic())
        t0 = time.perf_counter()
        stopped_by_us = False
        try:
            stopped_by_us = self._stop_if_running()
            yield rec
        finally:
            if stopped_by_us:
                self.resume()
                rec.seconds = time.perf_counter() - t0
            else:
                rec.seconds = 0.0

    def close(self) -> None:
        self.qmp.close()
        super().close()
