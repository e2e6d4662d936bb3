"""Rule kinds of the network detectors (rules/network/*.toml).

Importing this module registers the kinds with the rules loader (`sva.engine.rules`
`@rule_kind`), the same way the memory kinds are registered; every network detector
module imports it, so `sva rules check` (which imports all detectors) knows them too.
Every rule has `allow_vms` (globs on VM names) as a tuning point, empty as shipped.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from sva.engine.rules import Problem, Rule, check_not_empty, check_positive, meta, rule_kind


def check_prefix(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"{value!r} is not an IP address or prefix"
    return None


def check_mac(value: str) -> str | None:
    ok = re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", value)
    return None if ok else f"{value!r} is not a lower-case MAC address (aa:bb:cc:dd:ee:ff)"


_SERVICE = re.compile(r"(tcp|udp)/([0-9]{1,5})(-([0-9]{1,5}))?|icmp|icmpv6|any")


def check_service(value: str) -> str | None:
    m = _SERVICE.fullmatch(value)
    if m is None:
        return f"{value!r} is not a service (tcp/22, udp/53, tcp/8000-8080, icmp, icmpv6, any)"
    if m[2] is not None:
        lo = int(m[2])
        hi = int(m[4]) if m[4] else lo
        if not (0 <= lo <= hi <= 65535):
            return f"{value!r}: ports are 0..65535, low to high"
    return None


def service_matches(service: str, proto: int, dport: int) -> bool:
    """Whether a flow (IP protocol, destination port) is `service` (checked by check_service)."""
    if service == "any":
        return True
    if service == "icmp":
        return proto == 1
    if service == "icmpv6":
        return proto == 58
    name, _, ports = service.partition("/")
    if (name == "tcp" and proto != 6) or (name == "udp" and proto != 17):
        return False
    lo, _, hi = ports.partition("-")
    return int(lo) <= dport <= int(hi or lo)


@dataclass(frozen=True, kw_only=True)
class NetRule(Rule):
    """A network rule. `allow_vms`: globs on the name of the VM the finding is about."""

    allow_vms: tuple[str, ...] = ()

    def allows_vm(self, vm: str | None) -> bool:
        return vm is not None and any(fnmatchcase(vm, g) for g in self.allow_vms)


@rule_kind("net_mac_spoof")
@dataclass(frozen=True, kw_only=True)
class MacSpoofRule(NetRule):
    """Fires when a VM's port carries a frame from the VM with a source MAC that is not
    assigned to it, or (`check_ip_owner`) when a VM's configured IP is used from a MAC that
    is neither that VM's nor a known VM's or gateway's. `allow_macs` are never reported."""

    check_ip_owner: bool = True
    allow_macs: tuple[str, ...] = field(default=(), metadata=meta(item_check=check_mac))


@rule_kind("net_ip_spoof")
@dataclass(frozen=True, kw_only=True)
class IpSpoofRule(NetRule):
    """Fires when a VM (known by its MAC or port) sends IP packets from a source address
    that is not bound to it (configured prefixes or learned). 0.0.0.0 (DHCP) and, with
    `allow_link_local`, IPv6 link-local sources are fine; `allow_sources` lists more."""

    allow_link_local: bool = True
    allow_sources: tuple[str, ...] = field(default=(), metadata=meta(item_check=check_prefix))

    def allows_source(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if addr.is_unspecified:
            return True
        if self.allow_link_local and addr.version == 6 and addr.is_link_local:
            return True
        return any(addr in ipaddress.ip_network(p, strict=False) for p in self.allow_sources)


@rule_kind("net_arp_spoof")
@dataclass(frozen=True, kw_only=True)
class ArpSpoofRule(NetRule):
    """Fires on ARP replies and gratuitous ARPs that claim an address of another VM or of a
    gateway for a MAC that is not its owner's (`check_claims`), and when one address is
    claimed by at least `flip_flop_macs` different MACs within the window (0: off)."""

    check_claims: bool = True
    flip_flop_macs: int = 2
    allow_macs: tuple[str, ...] = field(default=(), metadata=meta(item_check=check_mac))

    def problems(self) -> Iterable[Problem]:
        if self.flip_flop_macs == 1 or self.flip_flop_macs < 0:
            yield ("flip_flop_macs",), "must be 0 (off) or at least 2"
        if not self.check_claims and not self.flip_flop_macs:
            yield (), "checks nothing: set check_claims = true or flip_flop_macs >= 2"


class ScanProtocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


@rule_kind("net_port_scan")
@dataclass(frozen=True, kw_only=True)
class PortScanRule(NetRule):
    """Fires when one source probes at least `min_ports` distinct ports of one host
    (vertical) or the same port on at least `min_hosts` hosts (horizontal, 0: off) within
    `window_seconds`. A probe is a flow of at most `max_probe_packets` packets that carried
    no payload: for TCP it began with a SYN (half-open SYN scans and full connect scans
    alike; which one is in the evidence), for UDP it is any such flow."""

    protocol: ScanProtocol
    min_ports: int = field(default=20, metadata=meta(check_positive))
    min_hosts: int = 0
    window_seconds: float = 30.0
    max_probe_packets: int = field(default=4, metadata=meta(check_positive))
    allow_sources: tuple[str, ...] = field(default=(), metadata=meta(item_check=check_prefix))

    def problems(self) -> Iterable[Problem]:
        if self.window_seconds <= 0:
            yield ("window_seconds",), "must be positive"
        if self.min_hosts < 0 or self.min_hosts == 1:
            yield ("min_hosts",), "must be 0 (off) or at least 2"

    def allows_source(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in ipaddress.ip_network(p, strict=False) for p in self.allow_sources)


IOC_SOURCES = ("ip", "dns_query", "dns_answer", "tls_sni", "http_host")


def check_ioc_source(value: str) -> str | None:
    return None if value in IOC_SOURCES else f"{value!r} is not one of {', '.join(IOC_SOURCES)}"


@rule_kind("net_ioc")
@dataclass(frozen=True, kw_only=True)
class IocRule(NetRule):
    """Fires when an indicator of a list whose name matches `lists` (globs) is seen in one
    of `sources`: a flow's address ("ip"), a DNS question or answer, a TLS SNI, an HTTP Host."""

    sources: tuple[str, ...] = field(default=IOC_SOURCES, metadata=meta(item_check=check_ioc_source))
    lists: tuple[str, ...] = field(default=("*",), metadata=meta(item_check=check_not_empty))

    def problems(self) -> Iterable[Problem]:
        if not self.sources:
            yield ("sources",), "needs at least one source"
        if not self.lists:
            yield ("lists",), 'needs at least one list glob ("*" for all)'

    def covers(self, list_name: str) -> bool:
        return any(fnmatchcase(list_name, g) for g in self.lists)


@rule_kind("net_payload_signature")
@dataclass(frozen=True, kw_only=True)
class PayloadSignatureRule(NetRule):
    """Turns network YARA matches (signatures/network) on the first bytes of a flow's
    payload into findings, for YARA rules whose `namespace:rule` matches `signatures`."""

    signatures: tuple[str, ...] = field(default=("*",), metadata=meta(item_check=check_not_empty))

    def covers(self, signature: str) -> bool:
        return any(fnmatchcase(signature, g) for g in self.signatures)


@rule_kind("net_vm_policy")
@dataclass(frozen=True, kw_only=True)
class VmTrafficPolicyRule(NetRule):
    """Which VM groups may talk to which, on what: fires for a conversation a VM of a group
    in `from_groups` opens to a VM of a group in `to_groups` (globs) whose service is not in
    `allow` (tcp/22, udp/53, tcp/8000-8080, icmp, icmpv6, any). Who opened it: the side of
    a TCP SYN, else the side seen first."""

    from_groups: tuple[str, ...] = field(metadata=meta(item_check=check_not_empty))
    to_groups: tuple[str, ...] = field(metadata=meta(item_check=check_not_empty))
    allow: tuple[str, ...] = field(default=(), metadata=meta(item_check=check_service))
    same_group: bool = True  # also between two VMs of the same group

    def problems(self) -> Iterable[Problem]:
        if not self.from_groups:
            yield ("from_groups",), "needs at least one group glob"
        if not self.to_groups:
            yield ("to_groups",), "needs at least one group glob"

    def applies(self, src_group: str, dst_group: str) -> bool:
        if not self.same_group and src_group == dst_group:
            return False
        return any(fnmatchcase(src_group, g) for g in self.from_groups) and any(
            fnmatchcase(dst_group, g) for g in self.to_groups
        )

    def allowed(self, proto: int, dport: int) -> bool:
        return any(service_matches(s, proto, dport) for s in self.allow)
