"""VM inventory: which MAC and IP addresses belong to which VM, on which host port.

Three sources, merged into one `Inventory`:

- a TOML file (`sva net --inventory FILE`), for everything sva cannot ask a hypervisor:

      [[vm]]
      name = "web1"
      macs = ["52:54:00:aa:bb:01"]
      ips = ["10.0.0.10", "fd00::10/128"]   # addresses or prefixes the VM may send from
      port = "vnet0"                          # capture port label its frames come in on ("" unknown)
      port_traffic = "both"                   # the port also carries frames *to* the VM ("from_vm": only from it)
      group = "web"                           # for the inter-VM policy rules
      learn = false                           # true: also bind what DHCP ACKs / its first ARP say

      [[gateway]]
      name = "router"
      ips = ["10.0.0.1"]
      macs = ["52:54:00:00:00:01"]            # empty: MAC unknown (ARP claims are not checked)

  Errors name `file:line` (InventoryError).
- QMP (`query-rx-filter`: each NIC's MAC) for QEMU targets: `from_qmp(path)`.
- a lab guest (`lab:NAME`): `from_lab(name)`, its MAC and QEMU user-net addresses.

Learning (`Learner`) binds an IP to a VM only where that VM says `learn = true`, only
from a DHCP ACK to its MAC or from the first ARP it sends while it has no address, and
never an address that is already someone else's: a spoofer cannot learn its way in.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sva.engine.tomlpos import KeyPath, key_lines, line_of
from sva.errors import InventoryError, SvaError
from sva.net.model import memo

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_INVENTORY_FILE = 1 << 20
MAX_VMS = 4096
MAX_LEARNED_PER_VM = 16
MAX_OWNER_CACHE = 65536
PORT_TRAFFIC = ("both", "from_vm")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")

# QEMU user-mode networking (the lab): the guest gets 10.0.2.15 from DHCP, the gateway is
# 10.0.2.2, the DNS forwarder 10.0.2.3; libslirp answers ARP for its virtual hosts with
# 52:55 followed by the host's IPv4 address.
LAB_GUEST_IP = "10.0.2.15"
LAB_VIRTUAL_HOSTS = {"gateway": "10.0.2.2", "dns": "10.0.2.3"}


def normalize_mac(value: str) -> str | None:
    """`52:54:00:AA:bb:01` or `52-54-00-aa-bb-01` → `52:54:00:aa:bb:01`; None if not a MAC."""
    text = value.strip().lower().replace("-", ":")
    return text if _MAC.fullmatch(text) else None


def slirp_mac(ip: str) -> str:
    return "52:55:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(ip).packed)


@dataclass(frozen=True)
class VmEntry:
    name: str
    macs: tuple[str, ...]
    networks: tuple[IpNetwork, ...] = ()
    port: str = ""
    port_traffic: str = "both"
    group: str = "default"
    learn: bool = False
    source: str = ""  # where it was defined: "file:line", "lab:NAME", "qmp:PATH"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "macs": list(self.macs), "ips": [str(n) for n in self.networks],
            "port": self.port, "port_traffic": self.port_traffic, "group": self.group, "learn": self.learn,
            "source": self.source,
        }  # fmt: skip


@dataclass(frozen=True)
class Gateway:
    name: str
    networks: tuple[IpNetwork, ...]
    macs: tuple[str, ...] = ()
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ips": [str(n) for n in self.networks], "macs": list(self.macs),
                "source": self.source}  # fmt: skip


@dataclass(frozen=True)
class LearnedBinding:
    vm: str
    ip: str
    how: str  # "dhcp" or "arp"
    ts: float


@dataclass(frozen=True)
class Owner:
    """Who an address belongs to: a VM or a gateway (`kind`), by name."""

    kind: str  # "vm" or "gateway"
    name: str
    macs: tuple[str, ...]
    learned: bool = False


def _parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        return None


@dataclass(frozen=True)
class Inventory:
    """The VMs and gateways, immutable; lookups by MAC, port and IP."""

    vms: tuple[VmEntry, ...] = ()
    gateways: tuple[Gateway, ...] = ()
    learned: tuple[LearnedBinding, ...] = ()
    _by_mac: Mapping[str, VmEntry] = field(default_factory=dict, repr=False, compare=False)
    _by_port: Mapping[str, VmEntry] = field(default_factory=dict, repr=False, compare=False)
    _gw_by_mac: Mapping[str, Gateway] = field(default_factory=dict, repr=False, compare=False)
    _learned_ip: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    _owners: dict[str, Owner | None] = field(default_factory=dict, repr=False, compare=False)  # owner_of_ip answers

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_mac", {m: vm for vm in self.vms for m in vm.macs})
        object.__setattr__(self, "_by_port", {vm.port: vm for vm in self.vms if vm.port})
        object.__setattr__(self, "_gw_by_mac", {m: g for g in self.gateways for m in g.macs})
        object.__setattr__(self, "_learned_ip", {b.ip: b.vm for b in self.learned})
        object.__setattr__(self, "_owners", {})  # a new inventory (e.g. one more learned binding) asks afresh

    def merged(self, other: Inventory) -> Inventory:
        """Both inventories; a VM name defined twice is an error naming both sources."""
        names = {vm.name: vm for vm in self.vms}
        for vm in other.vms:
            if vm.name in names:
                raise InventoryError(vm.source or vm.name, None,
                                     f"VM {vm.name!r} is also defined by {names[vm.name].source}")  # fmt: skip
        return Inventory(self.vms + other.vms, self.gateways + other.gateways, self.learned + other.learned)

    def vm(self, name: str) -> VmEntry | None:
        return next((v for v in self.vms if v.name == name), None)

    def vm_by_mac(self, mac: str) -> VmEntry | None:
        return self._by_mac.get(mac)

    def vm_by_port(self, port: str) -> VmEntry | None:
        return self._by_port.get(port) if port else None

    def gateway_by_mac(self, mac: str) -> Gateway | None:
        return self._gw_by_mac.get(mac)

    def sender_vm(self, port: str, src_mac: str) -> VmEntry | None:
        """The VM a frame came from: by its port when the port is bound, else by its MAC."""
        return self.vm_by_port(port) or self.vm_by_mac(src_mac)

    def learned_ips(self, vm: str) -> tuple[str, ...]:
        return tuple(b.ip for b in self.learned if b.vm == vm)

    def owner_of_ip(self, ip: str) -> Owner | None:
        """The VM or gateway this address is configured (or learned) for; None if nobody's."""
        return memo(self._owners, ip, self._owner_of_ip, MAX_OWNER_CACHE)

    def _owner_of_ip(self, ip: str) -> Owner | None:
        addr = _parse_ip(ip)
        if addr is None:
            return None
        for vm in self.vms:
            if any(addr in n for n in vm.networks):
                return Owner("vm", vm.name, vm.macs)
        for g in self.gateways:
            if any(addr in n for n in g.networks):
                return Owner("gateway", g.name, g.macs)
        owner = self._learned_ip.get(ip)
        if owner is not None:
            vm = self.vm(owner)
            return Owner("vm", owner, vm.macs if vm else (), learned=True)
        return None

    def may_send_from(self, vm: VmEntry, ip: str) -> bool:
        """Whether `vm` may use source address `ip` (configured prefixes or learned)."""
        owner = self.owner_of_ip(ip)
        if owner is not None and owner.kind == "vm" and owner.name == vm.name:
            return True
        addr = _parse_ip(ip) if owner is not None else None  # another owner's prefix may overlap this VM's
        return addr is not None and any(addr in n for n in vm.networks)

    def with_learned(self, binding: LearnedBinding) -> Inventory:
        return replace(self, learned=(*self.learned, binding))

    def to_json(self) -> dict[str, Any]:
        return {
            "vms": [v.to_json() for v in self.vms],
            "gateways": [g.to_json() for g in self.gateways],
            "learned": [{"vm": b.vm, "ip": b.ip, "how": b.how, "ts": b.ts} for b in self.learned],
        }


class Learner:
    """Adds learned bindings to an inventory, under the rules in the module docstring."""

    def __init__(self, inventory: Inventory, max_per_vm: int = MAX_LEARNED_PER_VM) -> None:
        self.inventory = inventory
        self.max_per_vm = max_per_vm
        self.refused = 0  # learning attempts refused (address owned, limit reached)

    def _learn(self, vm: VmEntry, ip: str, how: str, ts: float) -> bool:
        inv = self.inventory
        addr = _parse_ip(ip)
        if addr is None or addr.is_unspecified or addr.is_multicast or ip == "255.255.255.255":
            return False
        if inv.may_send_from(vm, ip):
            return False  # already its own
        owner = inv.owner_of_ip(ip)
        if owner is not None or len(inv.learned_ips(vm.name)) >= self.max_per_vm:
            self.refused += 1
            return False
        self.inventory = inv.with_learned(LearnedBinding(vm.name, ip, how, ts))
        return True

    def dhcp_ack(self, mac: str, ip: str, ts: float) -> bool:
        vm = self.inventory.vm_by_mac(mac)
        return vm is not None and vm.learn and self._learn(vm, ip, "dhcp", ts)

    def first_arp(self, port: str, sender_mac: str, sender_ip: str, ts: float) -> bool:
        vm = self.inventory.sender_vm(port, sender_mac)
        if vm is None or not vm.learn or sender_mac not in vm.macs:
            return False
        if vm.networks or self.inventory.learned_ips(vm.name):
            return False  # only the first address a VM announces, while it has none
        return self._learn(vm, sender_ip, "arp", ts)


# -- the TOML file ---------------------------------------------------------------------------


class _FileReader:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = key_lines(text)

    def fail(self, keypath: KeyPath, message: str) -> InventoryError:
        return InventoryError(self.path, line_of(self.lines, keypath), message)

    def where(self, keypath: KeyPath) -> str:
        return f"{self.path}:{line_of(self.lines, keypath)}"

    def string(self, table: Mapping[str, Any], key: str, kp: KeyPath, default: str | None = None) -> str:
        if key not in table:
            if default is None:
                raise self.fail(kp, f"missing required key {key!r}")
            return default
        value = table[key]
        if not isinstance(value, str):
            raise self.fail((*kp, key), f"{key}: expected a string, got {type(value).__name__}")
        return value

    def strings(self, table: Mapping[str, Any], key: str, kp: KeyPath) -> list[str]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail((*kp, key), f"{key}: expected an array of strings")
        return value

    def macs(self, table: Mapping[str, Any], kp: KeyPath) -> tuple[str, ...]:
        out = []
        for i, raw in enumerate(self.strings(table, "macs", kp)):
            mac = normalize_mac(raw)
            if mac is None:
                raise self.fail((*kp, "macs", i), f"macs[{i}]: {raw!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
            out.append(mac)
        return tuple(out)

    def networks(self, table: Mapping[str, Any], kp: KeyPath) -> tuple[IpNetwork, ...]:
        out = []
        for i, raw in enumerate(self.strings(table, "ips", kp)):
            try:
                out.append(ipaddress.ip_network(raw.strip(), strict=False))
            except ValueError:
                raise self.fail((*kp, "ips", i), f"ips[{i}]: {raw!r} is not an IP address or prefix") from None
        return tuple(out)

    def check_keys(self, table: Mapping[str, Any], known: Iterable[str], kp: KeyPath, what: str) -> None:
        known = tuple(known)
        for key in table:
            if key not in known:
                raise self.fail((*kp, key), f"{what}: unknown key {key!r} (known: {', '.join(known)})")

    def tables(self, doc: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
        value = doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise self.fail((key,), f"{key!r} must be an array of tables: write [[{key}]]")
        return value


_VM_KEYS = ("name", "macs", "ips", "port", "port_traffic", "group", "learn")
_GW_KEYS = ("name", "ips", "macs")


def loads_inventory(text: str, path: str = "<inventory>") -> Inventory:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        raise InventoryError(path, int(m[1]) if m else None, f"invalid TOML: {e}") from None
    r = _FileReader(path, text)
    for key in doc:
        if key not in ("vm", "gateway"):
            raise r.fail((key,), f"unknown top-level key {key!r}: an inventory has [[vm]] and [[gateway]] tables")
    vm_tables = r.tables(doc, "vm")
    if len(vm_tables) > MAX_VMS:
        raise r.fail(("vm",), f"more than {MAX_VMS} VMs")
    vms: list[VmEntry] = []
    seen: dict[str, str] = {}
    owners: dict[str, str] = {}  # MAC -> VM name
    for i, t in enumerate(vm_tables):
        kp: KeyPath = ("vm", i)
        r.check_keys(t, _VM_KEYS, kp, f"vm #{i + 1}")
        name = r.string(t, "name", kp)
        if not _NAME.fullmatch(name):
            raise r.fail((*kp, "name"), f"name: {name!r} is not a valid VM name")
        if name in seen:
            raise r.fail((*kp, "name"), f"VM {name!r} defined twice (first at {seen[name]})")
        seen[name] = r.where((*kp, "name"))
        macs = r.macs(t, kp)
        if not macs:
            raise r.fail(kp, f"vm {name!r}: needs at least one MAC in `macs`")
        for j, mac in enumerate(macs):
            if mac in owners:
                raise r.fail((*kp, "macs", j), f"vm {name!r}: MAC {mac} is already VM {owners[mac]!r}'s")
            owners[mac] = name
        traffic = r.string(t, "port_traffic", kp, "both")
        if traffic not in PORT_TRAFFIC:
            raise r.fail((*kp, "port_traffic"), f"port_traffic: {traffic!r} is not one of {', '.join(PORT_TRAFFIC)}")
        learn = t.get("learn", False)
        if not isinstance(learn, bool):
            raise r.fail((*kp, "learn"), "learn: expected true or false")
        vms.append(VmEntry(
            name=name, macs=macs, networks=r.networks(t, kp), port=r.string(t, "port", kp, ""),
            port_traffic=traffic, group=r.string(t, "group", kp, "default"), learn=learn, source=r.where(kp),
        ))  # fmt: skip
    ports = [v.port for v in vms if v.port]
    for v in vms:
        if v.port and ports.count(v.port) > 1:
            raise InventoryError(path, int(v.source.rsplit(":", 1)[1]), f"port {v.port!r} is bound to more than one VM")
    gateways: list[Gateway] = []
    for i, t in enumerate(r.tables(doc, "gateway")):
        kp = ("gateway", i)
        r.check_keys(t, _GW_KEYS, kp, f"gateway #{i + 1}")
        name = r.string(t, "name", kp)
        networks = r.networks(t, kp)
        if not networks:
            raise r.fail(kp, f"gateway {name!r}: needs at least one address in `ips`")
        gateways.append(Gateway(name, networks, r.macs(t, kp), r.where(kp)))
    return Inventory(tuple(vms), tuple(gateways))


def load_inventory(path: str | Path) -> Inventory:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_INVENTORY_FILE + 1)
    except OSError as e:
        raise InventoryError(str(p), None, f"cannot read: {e.strerror}") from None
    if len(data) > MAX_INVENTORY_FILE:
        raise InventoryError(str(p), None, f"larger than {MAX_INVENTORY_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InventoryError(str(p), data[: e.start].count(b"\n") + 1, "not UTF-8 text") from None
    return loads_inventory(text, str(p))


# -- hypervisor sources --------------------------------------------------------------------


def from_lab(name: str) -> Inventory:
    """A lab guest: its NIC's MAC, QEMU user-net's address for it, and user-net's hosts."""
    from sva import lab

    guest = lab.get(name)
    mac = normalize_mac(guest.mac)
    if mac is None:
        raise InventoryError(f"lab:{name}", None, f"lab guest has no valid MAC ({guest.mac!r})")
    vm = VmEntry(
        name=name, macs=(mac,), networks=(ipaddress.ip_network(LAB_GUEST_IP),), group="lab", learn=True,
        source=f"lab:{name}",
    )  # fmt: skip
    gws = tuple(
        Gateway(f"user-net {role}", (ipaddress.ip_network(ip),), (slirp_mac(ip),), f"lab:{name}")
        for role, ip in LAB_VIRTUAL_HOSTS.items()
    )
    return Inventory((vm,), gws)


def from_qmp(path: str, name: str | None = None, group: str = "default", timeout: float = 5.0) -> Inventory:
    """A running QEMU: one VM with every NIC's MAC from `query-rx-filter`; IPs are learned."""
    from sva.vmi.qmp import QmpClient

    source = f"qmp:{path}"
    try:
        with QmpClient(path, timeout=timeout) as qmp:
            filters = qmp.execute("query-rx-filter")
            if name is None:
                try:
                    name = str(qmp.execute("query-name").get("name") or "")
                except SvaError:
                    name = ""
    except SvaError as e:
        raise InventoryError(source, None, f"cannot ask QEMU for its NICs: {e}") from None
    macs = []
    for f in filters if isinstance(filters, list) else []:
        mac = normalize_mac(str(f.get("main-mac", ""))) if isinstance(f, dict) else None
        if mac is not None and mac not in macs:
            macs.append(mac)
    if not macs:
        raise InventoryError(source, None, "QEMU reports no NIC with a MAC (query-rx-filter)")
    vm_name = name or Path(path).stem
    return Inventory((VmEntry(vm_name, tuple(macs), group=group, learn=True, source=source),))


def whois(inv: Inventory, *, port: str = "", mac: str = "", ip: str = "") -> dict[str, Any]:
    """Evidence naming who an endpoint is: the VM (by port, then MAC, then address) or gateway."""
    out: dict[str, Any] = {}
    vm = inv.vm_by_port(port) or (inv.vm_by_mac(mac) if mac else None)
    how = "port" if inv.vm_by_port(port) else "mac"
    if vm is None and ip:
        owner = inv.owner_of_ip(ip)
        if owner is not None and owner.kind == "vm":
            vm = inv.vm(owner.name)
            how = "learned ip" if owner.learned else "ip"
        elif owner is not None:
            out["gateway"] = owner.name
    if vm is None and mac:
        gw = inv.gateway_by_mac(mac)
        if gw is not None:
            out["gateway"] = gw.name
    if vm is not None:
        out["vm"] = vm.name
        out["vm_group"] = vm.group
        out["vm_resolved_by"] = how
    if port:
        out["port"] = port
    return out
