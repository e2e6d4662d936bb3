"""Network namespaces for the network tests: a virtual switch with "VMs" and port mirrors.

`bridge_lab` (module-scoped) builds, with real `ip` and `tc`:

    netns <p>-sw   bridge br0 with ports pa, pb, pc (STP off, IPv6 off: no background chatter)
                   tc clsact ingress on each port pX, a match-everything u32 filter
                   (u32 rather than matchall: kernels without CONFIG_NET_CLS_MATCHALL exist, this one):
                     mirred egress mirror -> mtx (shared monitor, read on its peer "mon")
                     mirred egress mirror -> tX  (per-port monitor, read on its peer "mX")
    netns <p>-a    eth0 = peer of pa, 02:00:00:77:00:01, 10.77.0.1/24   (VM "a")
    netns <p>-b    eth0 = peer of pb, 02:00:00:77:00:02, 10.77.0.2/24   (VM "b")
    netns <p>-c    eth0 = peer of pc, 02:00:00:77:00:03, 10.77.0.3/24   (VM "c")

Mirroring the ingress of every port shows each frame once, as its sender put it on the
switch (egress mirroring as well would show every forwarded frame twice). `mon` sees all
ports without a per-port label; `iface:ma,mb,mc` labels each frame with its port's monitor.
Open a capture with `lab.open("mon")` / `lab.open("ma,mb,mc")` (AF_PACKET sockets are
created inside the switch namespace, nothing is added to the host's own namespace).

The prefix carries a random suffix, so parallel sessions do not collide; everything is
removed (namespaces, the processes started in them with `lab.popen`) when the module ends.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from sva.net.capture import CaptureSource, open_source


@dataclass(frozen=True)
class LabVm:
    name: str  # "a", "b", "c"
    netns: str
    mac: str
    ip: str
    port: str  # its bridge port in the switch namespace
    monitor: str  # the per-port monitor interface (frames this VM sent), in the switch namespace

    @property
    def mac_bytes(self) -> bytes:
        return bytes.fromhex(self.mac.replace(":", ""))

    @property
    def ip_bytes(self) -> bytes:
        return bytes(int(x) for x in self.ip.split("."))


@dataclass
class BridgeLab:
    prefix: str
    switch_ns: str
    vms: dict[str, LabVm]
    monitor: str = "mon"  # all ports, unlabeled
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def open(self, ifaces: str | None = None, **kw: object) -> CaptureSource:
        """A capture source on monitor interface(s) of the switch (default: the shared one)."""
        return open_source(f"iface:{ifaces or self.monitor}", netns=self.switch_ns, **kw)  # type: ignore[arg-type]

    def run(self, vm: str, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside VM `vm`'s namespace and wait for it."""
        ns = self.vms[vm].netns if vm in self.vms else vm
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout, check=check)

    def popen(self, vm: str, *cmd: str, **kw: object) -> subprocess.Popen[bytes]:
        """Start a command inside VM `vm`'s namespace; it is killed when the lab is torn down."""
        ns = self.vms[vm].netns if vm in self.vms else vm
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kw)  # type: ignore[call-overload]
        self._procs.append(p)
        return p  # type: ignore[no-any-return]

    @property
    def namespaces(self) -> list[str]:
        return [self.switch_ns, *(v.netns for v in self.vms.values())]


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _ns(ns: str, *cmd: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f"{ns}: {' '.join(cmd)}: {r.stderr.strip()}")


def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2; scripts/setup.sh installs it)"
    return None


@contextmanager
def make_bridge_lab(vm_names: tuple[str, ...] = ("a", "b", "c")) -> Iterator[BridgeLab]:
    """Build the switch and VMs described in the module docstring; remove them afterwards."""
    prefix = f"sva{secrets.token_hex(3)}"
    sw = f"{prefix}-sw"
    vms = {
        n: LabVm(n, f"{prefix}-{n}", f"02:00:00:77:00:{i + 1:02x}", f"10.77.0.{i + 1}", f"p{n}", f"m{n}")
        for i, n in enumerate(vm_names)
    }
    lab = BridgeLab(prefix, sw, vms)
    created: list[str] = []
    try:
        for ns in [sw, *(v.netns for v in vms.values())]:
            _ip("netns", "add", ns)
            created.append(ns)
            # IPv6 off before any interface exists: no router solicitations, MLD or DAD in captures.
            _ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
            _ip("-n", ns, "link", "set", "dev", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0")
        _ip("-n", sw, "link", "add", "mtx", "type", "veth", "peer", "name", lab.monitor)
        for link in ("br0", "mtx", lab.monitor):
            _ip("-n", sw, "link", "set", "dev", link, "up")
        for v in vms.values():
            _ip("-n", sw, "link", "add", v.port, "type", "veth", "peer", "name", "eth0", "netns", v.netns)
            _ip("-n", sw, "link", "add", f"t{v.name}", "type", "veth", "peer", "name", v.monitor)
            _ip("-n", sw, "link", "set", "dev", v.port, "master", "br0")
            for link in (v.port, f"t{v.name}", v.monitor):
                _ip("-n", sw, "link", "set", "dev", link, "up")
            _ip("-n", v.netns, "link", "set", "dev", "eth0", "address", v.mac)
            _ip("-n", v.netns, "addr", "add", f"{v.ip}/24", "dev", "eth0")
            _ip("-n", v.netns, "link", "set", "dev", "eth0", "up")
            _ns(sw, "tc", "qdisc", "add", "dev", v.port, "clsact")
            _ns(
                sw, "tc", "filter", "add", "dev", v.port, "ingress", "protocol", "all", "u32", "match", "u32", "0", "0",
                "action", "mirred", "egress", "mirror", "dev", "mtx",
                "action", "mirred", "egress", "mirror", "dev", f"t{v.name}",
            )  # fmt: skip
        yield lab
    finally:
        for p in lab._procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(created):
            # Anything still running in it was started by this lab (lab.run/popen): end it by pid.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def bridge_lab() -> Iterator[BridgeLab]:
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    with make_bridge_lab() as lab:
        yield lab
