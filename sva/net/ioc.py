"""Indicator-of-compromise lists (signatures/ioc/): bad IP addresses and bad domains.

A list is a text file, one indicator per line; `#` starts a comment; blank lines are fine.
The file name says what it holds and names the list:

    signatures/ioc/<list>.ips       an IPv4/IPv6 address or prefix per line (192.0.2.66, 198.51.100.0/24)
    signatures/ioc/<list>.domains   a domain per line; it matches the domain and every name below it
                                    ("evil.example" matches "cdn.evil.example"; a leading "*." is accepted)

Other files (README, hashes for file scanning) are ignored here. A malformed line is a
`SignatureError` naming `file:line`. Lookups are dictionary/set hits per name and per
address; prefixes are grouped by length so an address costs one lookup per length.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sva.errors import SignatureError
from sva.net.model import memo

IP_SUFFIX = ".ips"
DOMAIN_SUFFIX = ".domains"
MAX_IOC_FILE = 64 << 20
MAX_LABELS = 127
MAX_CACHE = 65536  # addresses whose answer is remembered
_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*")


@dataclass(frozen=True)
class IocHit:
    list: str  # the list's name (file stem)
    indicator: str  # the entry that matched (an address/prefix or a domain)
    value: str  # what was seen
    source: str  # "file:line" of the entry


@dataclass(frozen=True)
class IocSet:
    """Every loaded list; `match_ip` / `match_domain` answer with the entry that matched."""

    lists: tuple[tuple[str, str, int], ...] = ()  # (name, kind "ips"/"domains", entries)
    _domains: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)  # domain -> (list, source)
    _prefixes: dict[tuple[int, int], dict[int, tuple[str, str, str]]] = field(default_factory=dict, repr=False)
    # The same few addresses come up every cycle (a window's flows): remember the answers.
    _ip_cache: dict[str, IocHit | None] = field(default_factory=dict, repr=False, compare=False)
    _name_cache: dict[str, IocHit | None] = field(default_factory=dict, repr=False, compare=False)

    @property
    def empty(self) -> bool:
        return not self._domains and not self._prefixes

    @property
    def has_ips(self) -> bool:
        return bool(self._prefixes)

    def match_domain(self, name: str) -> IocHit | None:
        return memo(self._name_cache, name, self._match_domain, MAX_CACHE)

    def _match_domain(self, name: str) -> IocHit | None:
        if not self._domains:
            return None
        name = name.strip().rstrip(".").lower()
        labels = name.split(".")
        if len(labels) > MAX_LABELS:
            labels = labels[-MAX_LABELS:]
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            hit = self._domains.get(candidate)
            if hit is not None:
                return IocHit(hit[0], candidate, name, hit[1])
        return None

    def match_ip(self, ip: str) -> IocHit | None:
        return memo(self._ip_cache, ip, self._match_ip, MAX_CACHE)

    def _match_ip(self, ip: str) -> IocHit | None:
        if not self._prefixes:
            return None
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        value = int(addr)
        bits = 32 if addr.version == 4 else 128
        for (version, length), table in self._prefixes.items():
            if version != addr.version:
                continue
            hit = table.get(value >> (bits - length))
            if hit is not None:
                return IocHit(hit[0], hit[1], ip, hit[2])
        return None


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_IOC_FILE + 1)
    except OSError as e:
        raise SignatureError(str(path), None, f"cannot read: {e.strerror}") from None
    if len(data) > MAX_IOC_FILE:
        raise SignatureError(str(path), None, f"larger than {MAX_IOC_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SignatureError(str(path), data[: e.start].count(b"\n") + 1, "not UTF-8 text") from None
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            yield n, entry


def ioc_files(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith((IP_SUFFIX, DOMAIN_SUFFIX))))
        elif p.is_file():
            if not p.name.endswith((IP_SUFFIX, DOMAIN_SUFFIX)):
                raise SignatureError(str(p), None, f"an IOC list ends in {IP_SUFFIX} or {DOMAIN_SUFFIX}")
            out.append(p)
        else:
            raise SignatureError(str(p), None, "no such IOC list or directory")
    return out


def load_iocs(*paths: str | Path) -> IocSet:
    """The lists in `paths` (files, or directories of *.ips / *.domains files)."""
    domains: dict[str, tuple[str, str]] = {}
    prefixes: dict[tuple[int, int], dict[int, tuple[str, str, str]]] = {}
    lists: list[tuple[str, str, int]] = []
    for path in ioc_files(paths):
        is_ip = path.name.endswith(IP_SUFFIX)
        name = path.name[: -len(IP_SUFFIX if is_ip else DOMAIN_SUFFIX)]
        count = 0
        for n, entry in _lines(path):
            source = f"{path}:{n}"
            if is_ip:
                try:
                    net = ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise SignatureError(str(path), n, f"{entry!r} is not an IP address or prefix") from None
                bits = net.max_prefixlen
                table = prefixes.setdefault((net.version, net.prefixlen), {})
                table.setdefault(int(net.network_address) >> (bits - net.prefixlen), (name, str(net), source))
            else:
                domain = entry.lower().removeprefix("*.").rstrip(".")
                if not _DOMAIN.fullmatch(domain):
                    raise SignatureError(str(path), n, f"{entry!r} is not a domain name")
                domains.setdefault(domain, (name, source))
            count += 1
        lists.append((name, "ips" if is_ip else "domains", count))
    # Longest prefixes first: the most specific entry names the hit.
    ordered = dict(sorted(prefixes.items(), key=lambda kv: (kv[0][0], -kv[0][1])))
    return IocSet(tuple(lists), domains, ordered)


def default_ioc_dir() -> Path:
    from sva.scan.rules import signatures_dir

    return signatures_dir() / "ioc"
