"""The daemon's configuration: one TOML file → one frozen dataclass tree, checked at load.

Every problem is a ConfigError naming the key, with array items by their 0-based index
(`targets[1].interval: must be > 0`); unknown keys are errors, so a typo never silently
leaves a default in force. The `[bus]` and `[signatures]` sections are the bus's and the
signature refresher's own configs (`BusConfig.from_mapping`, `SigsConfig.from_mapping`).
appliance/sva.example.toml documents every key; docs/admin.md is the reference.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sva.bus.config import BusConfig
from sva.errors import ConfigError
from sva.sigs.config import SigsConfig

DEFAULT_CONFIG_PATH = Path("/etc/sva/sva.toml")
DEFAULT_METRICS_PORT = 9108
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_MAX_ITEMS = 1024  # targets / network sources / discovery patterns: a bound on hostile or broken files


class LogFormat(enum.StrEnum):
    JSON = "json"
    TEXT = "text"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class ApplianceConfig:
    name: str = "sva"
    management_address: str = "127.0.0.1"
    log_format: LogFormat = LogFormat.JSON
    log_level: LogLevel = LogLevel.INFO


@dataclass(frozen=True, slots=True)
class ScanSettings:
    """How one VM is scanned; `[defaults]` gives these to targets that leave them out
    and to discovered VMs."""

    interval: float = 5.0  # seconds between cycle starts
    cpu_budget: float = 0.5  # fraction of one core: a cycle of t s starts the next no sooner than t/budget
    detectors: tuple[str, ...] = ()  # empty: the built-in list
    rules: tuple[Path, ...] = ()  # empty: the shipped rules/
    signatures: str = ""  # empty: the active bundle of [signatures] state_dir
    sweep_period: float = 40.0  # seconds per whole pass of the sweeps, spread over the cycles in it
    yara_period: float = 2.0  # at least this many seconds between two YARA scans of all RAM
    retry: float = 2.0  # seconds between attempts to reach an unreachable VM
    gone_after: float = 60.0  # seconds a VM's socket may be missing before it counts as destroyed
    resume_paused: bool = True  # a VM found paused at attach was left so by a killed sva: resume it

    @property
    def sweep_every(self) -> int:
        """The cycles one pass of the sweeps is spread over: sweep_period / interval."""
        return max(1, math.ceil(self.sweep_period / self.interval - 1e-9))


@dataclass(frozen=True, slots=True)
class TargetConfig:
    name: str
    uri: str
    scan: ScanSettings
    discovered: bool = False


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    patterns: tuple[str, ...] = ()  # globs of QMP sockets, e.g. /run/sva/lab/*/qmp.sock
    poll: float = 5.0

    @property
    def enabled(self) -> bool:
        return bool(self.patterns)


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    name: str
    source: str
    inventory: tuple[str, ...] = ()
    rules: tuple[Path, ...] = ()
    detectors: tuple[str, ...] = ()
    interval: float = 1.0
    horizon: float = 30.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    listen: str = ""  # empty: the appliance's management address
    port: int = DEFAULT_METRICS_PORT


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    path: Path
    appliance: ApplianceConfig = field(default_factory=ApplianceConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    signatures: SigsConfig | None = None  # None: no [signatures] section, no refresher
    defaults: ScanSettings = field(default_factory=ScanSettings)
    targets: tuple[TargetConfig, ...] = ()
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    network: tuple[NetworkConfig, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def metrics_address(self) -> str:
        return self.metrics.listen or self.appliance.management_address


def load(path: str | Path) -> DaemonConfig:
    """Read and check the config file at `path`."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: {e}") from None
    try:
        return from_mapping(doc, p)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


_SECTIONS = ("appliance", "bus", "signatures", "defaults", "targets", "discovery", "network", "metrics")


def from_mapping(doc: Mapping[str, Any], path: Path) -> DaemonConfig:
    _known(doc, _SECTIONS, "")
    base = path.parent
    appliance = _appliance(_table(doc, "appliance"))
    bus = BusConfig.from_mapping(_table(doc, "bus"), "bus")
    bus = dataclasses.replace(bus, journal=_path(str(bus.journal), base), keys_dir=_path(str(bus.keys_dir), base))
    sigs = SigsConfig.from_mapping(_table(doc, "signatures"), base=base) if "signatures" in doc else None
    _known(_table(doc, "defaults"), _SCAN_KEYS, "defaults")
    defaults = _scan(_table(doc, "defaults"), "defaults", ScanSettings(), base)
    targets = tuple(_target(t, f"targets[{i}]", defaults, base) for i, t in enumerate(_array(doc, "targets")))
    _unique([t.name for t in targets], "targets", "name")
    discovery = _discovery(_table(doc, "discovery"))
    network = tuple(_network(n, f"network[{i}]", base) for i, n in enumerate(_array(doc, "network")))
    _unique([n.name for n in network], "network", "name")
    metrics = _metrics(_table(doc, "metrics"))
    return DaemonConfig(path=path, appliance=appliance, bus=bus, signatures=sigs, defaults=defaults,
                        targets=targets, discovery=discovery, network=network, metrics=metrics)  # fmt: skip


# -- sections ------------------------------------------------------------------------------
def _appliance(t: Mapping[str, Any]) -> ApplianceConfig:
    _known(t, ("name", "management_address", "log_format", "log_level"), "appliance")
    d = ApplianceConfig()
    name = _str(t, "name", "appliance", d.name)
    if not _NAME.match(name):
        raise ConfigError(f"appliance.name: letters, digits, '.', '_' and '-' (at most 63), got {name!r}")
    addr = _str(t, "management_address", "appliance", d.management_address)
    _ip(addr, "appliance.management_address")
    return ApplianceConfig(
        name=name, management_address=addr,
        log_format=_enum(LogFormat, _str(t, "log_format", "appliance", d.log_format.value), "appliance.log_format"),
        log_level=_enum(LogLevel, _str(t, "log_level", "appliance", d.log_level.value), "appliance.log_level"),
    )  # fmt: skip


_SCAN_KEYS = ("interval", "cpu_budget", "detectors", "rules", "signatures", "sweep_period", "yara_period", "retry",
              "gone_after", "resume_paused")


def _scan(t: Mapping[str, Any], prefix: str, d: ScanSettings, base: Path) -> ScanSettings:
    interval = _num(t, "interval", prefix, d.interval)
    budget = _num(t, "cpu_budget", prefix, d.cpu_budget)
    if not 0 < budget <= 1:
        raise ConfigError(f"{prefix}.cpu_budget: a fraction of one core, > 0 and <= 1, got {budget!r}")
    sweep = _positive(_num(t, "sweep_period", prefix, d.sweep_period), f"{prefix}.sweep_period")
    yara_period = _num(t, "yara_period", prefix, d.yara_period)
    if yara_period < 0:
        raise ConfigError(f"{prefix}.yara_period: must be >= 0 (0: every cycle), got {yara_period:g}")
    detectors = _strs(t, "detectors", prefix, d.detectors)
    if detectors:
        from sva.engine.registry import load_detectors

        try:
            load_detectors(list(detectors))
        except Exception as e:  # noqa: BLE001 - any load failure is this key's problem
            raise ConfigError(f"{prefix}.detectors: {e}") from None
    rules = tuple(_path(x, base) for x in _strs(t, "rules", prefix, tuple(str(r) for r in d.rules)))
    for i, r in enumerate(rules):
        if not r.exists():
            raise ConfigError(f"{prefix}.rules[{i}]: {r}: no such file or directory")
    sigs = _str(t, "signatures", prefix, d.signatures, allow_empty=True)
    if sigs and not _path(sigs, base).exists():
        raise ConfigError(f"{prefix}.signatures: {sigs}: no such rule directory or bundle file")
    return ScanSettings(
        interval=_positive(interval, f"{prefix}.interval"), cpu_budget=budget, detectors=detectors, rules=rules,
        signatures=str(_path(sigs, base)) if sigs else "", sweep_period=sweep, yara_period=yara_period,
        retry=_positive(_num(t, "retry", prefix, d.retry), f"{prefix}.retry"),
        gone_after=_positive(_num(t, "gone_after", prefix, d.gone_after), f"{prefix}.gone_after"),
        resume_paused=_bool(t, "resume_paused", prefix, d.resume_paused),
    )  # fmt: skip


def _target(t: Any, prefix: str, defaults: ScanSettings, base: Path) -> TargetConfig:
    if not isinstance(t, Mapping):
        raise ConfigError(f"{prefix}: expected a table ([[targets]]), got {t!r}")
    _known(t, ("name", "uri", *_SCAN_KEYS), prefix)
    if "uri" not in t:
        raise ConfigError(f"{prefix}.uri: missing (qemu:/path/qmp.sock, lab:NAME, libvmi:DOMAIN, ...)")
    uri = _str(t, "uri", prefix, "")
    check_uri(uri, f"{prefix}.uri")
    name = _str(t, "name", prefix, default_name(uri))
    if not _NAME.match(name):
        raise ConfigError(f"{prefix}.name: letters, digits, '.', '_' and '-' (at most 63), got {name!r}")
    return TargetConfig(name=name, uri=uri, scan=_scan(t, prefix, defaults, base))


def _discovery(t: Mapping[str, Any]) -> DiscoveryConfig:
    _known(t, ("patterns", "poll"), "discovery")
    patterns = _strs(t, "patterns", "discovery", ())
    for i, p in enumerate(patterns):
        if not p.startswith("/"):
            raise ConfigError(f"discovery.patterns[{i}]: an absolute glob of QMP sockets, got {p!r}")
    return DiscoveryConfig(patterns=patterns, poll=_positive(_num(t, "poll", "discovery", 5.0), "discovery.poll"))


def _network(t: Any, prefix: str, base: Path) -> NetworkConfig:
    if not isinstance(t, Mapping):
        raise ConfigError(f"{prefix}: expected a table ([[network]]), got {t!r}")
    _known(t, ("name", "source", "inventory", "rules", "detectors", "interval", "horizon"), prefix)
    if "source" not in t:
        raise ConfigError(f"{prefix}.source: missing (iface:NAME, qemu-mirror:PATH or lab:NAME)")
    source = _str(t, "source", prefix, "")
    if not source.startswith(("iface:", "qemu-mirror:", "lab:")) or len(source.split(":", 1)[1]) == 0:
        raise ConfigError(f"{prefix}.source: iface:NAME, qemu-mirror:PATH or lab:NAME, got {source!r}")
    name = _str(t, "name", prefix, source.split(":", 1)[1].rsplit("/", 1)[-1] or source)
    inventory = tuple(x if x.startswith(("qmp:", "lab:")) else str(_path(x, base))
                      for x in _strs(t, "inventory", prefix, ()))  # fmt: skip
    rules = tuple(_path(x, base) for x in _strs(t, "rules", prefix, ()))
    for i, r in enumerate(rules):
        if not r.exists():
            raise ConfigError(f"{prefix}.rules[{i}]: {r}: no such file or directory")
    return NetworkConfig(
        name=name, source=source, inventory=inventory, rules=rules, detectors=_strs(t, "detectors", prefix, ()),
        interval=_positive(_num(t, "interval", prefix, 1.0), f"{prefix}.interval"),
        horizon=_positive(_num(t, "horizon", prefix, 30.0), f"{prefix}.horizon"),
    )  # fmt: skip


def _metrics(t: Mapping[str, Any]) -> MetricsConfig:
    _known(t, ("enabled", "listen", "port"), "metrics")
    enabled = _bool(t, "enabled", "metrics", True)
    listen = _str(t, "listen", "metrics", "", allow_empty=True)
    if listen:
        _ip(listen, "metrics.listen")
    port = _int(t, "port", "metrics", DEFAULT_METRICS_PORT)
    if not 0 <= port < 65536:
        raise ConfigError(f"metrics.port: 0..65535 (0: any free port), got {port}")
    return MetricsConfig(enabled=enabled, listen=listen, port=port)


# -- targets ------------------------------------------------------------------------------
_URI_SCHEMES = ("qemu", "lab", "libvmi", "libvmi+file", "ivshmem", "file", "raw", "elf", "lime")


def check_uri(uri: str, key: str) -> str:
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme not in _URI_SCHEMES or not rest:
        raise ConfigError(f"{key}: expected SCHEME:WHERE with a scheme of {', '.join(_URI_SCHEMES)}, got {uri!r}")
    return uri


def default_name(uri: str) -> str:
    """A VM name from a target string: lab:NAME → NAME; a socket path → its directory's name
    (/run/sva/lab/web01/qmp.sock → web01; libvirt's domain-3-web01 → web01)."""
    scheme, _, rest = uri.partition(":")
    if scheme in ("lab", "libvmi"):
        return rest
    p = Path(rest)
    name = p.parent.name if p.suffix in (".sock", ".monitor") or p.name in ("qmp", "monitor.sock") else p.stem
    m = re.match(r"^domain-\d+-(.+)$", name)
    name = m.group(1) if m else name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:63] or "vm"


# -- helpers ---------------------------------------------------------------------------------
_RENAMED = {"sweep_every": "replaced by sweep_period, in seconds per whole pass (the old value times interval)"}


def _known(t: Mapping[str, Any], keys: tuple[str, ...], prefix: str) -> None:
    for k in t:
        if k not in keys:
            where = f"{prefix}.{k}" if prefix else k
            if k in _RENAMED:
                raise ConfigError(f"{where}: {_RENAMED[k]}")
            raise ConfigError(f"{where}: unknown setting (known: {', '.join(keys)})")


def _table(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = doc.get(key, {})
    if not isinstance(v, Mapping):
        raise ConfigError(f"{key}: expected a table ([{key}]), got {type(v).__name__}")
    return v


def _array(doc: Mapping[str, Any], key: str) -> list[Any]:
    v = doc.get(key, [])
    if not isinstance(v, list):
        raise ConfigError(f"{key}: expected an array of tables ([[{key}]]), got {type(v).__name__}")
    if len(v) > _MAX_ITEMS:
        raise ConfigError(f"{key}: at most {_MAX_ITEMS} entries, got {len(v)}")
    return v


def _unique(names: list[str], section: str, key: str) -> None:
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            raise ConfigError(f"{section}[{i}].{key}: {n!r} is used twice")
        seen.add(n)


def _str(t: Mapping[str, Any], key: str, prefix: str, default: str, allow_empty: bool = False) -> str:
    v = t.get(key, default)
    if not isinstance(v, str) or (not v and not allow_empty):
        raise ConfigError(f"{prefix}.{key}: expected a non-empty string, got {v!r}")
    return v


def _strs(t: Mapping[str, Any], key: str, prefix: str, default: tuple[str, ...]) -> tuple[str, ...]:
    v = t.get(key, list(default))
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v) or len(v) > _MAX_ITEMS:
        raise ConfigError(f"{prefix}.{key}: expected a list of non-empty strings, got {v!r}")
    return tuple(v)


def _bool(t: Mapping[str, Any], key: str, prefix: str, default: bool) -> bool:
    v = t.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{prefix}.{key}: expected true or false, got {v!r}")
    return v


def _num(t: Mapping[str, Any], key: str, prefix: str, default: float) -> float:
    v = t.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"{prefix}.{key}: expected a number, got {v!r}")
    return float(v)


def _int(t: Mapping[str, Any], key: str, prefix: str, default: int) -> int:
    v = t.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{prefix}.{key}: expected an integer, got {v!r}")
    return v


def _positive(v: float, key: str) -> float:
    if not v > 0:
        raise ConfigError(f"{key}: must be > 0, got {v:g}")
    return v


def _enum(cls: type[enum.StrEnum], v: str, key: str) -> Any:
    try:
        return cls(v)
    except ValueError:
        raise ConfigError(f"{key}: one of {', '.join(m.value for m in cls)}, got {v!r}") from None


def _ip(v: str, key: str) -> None:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise ConfigError(f"{key}: expected an IP address, got {v!r}") from None


def _path(v: str, base: Path) -> Path:
    p = Path(v)
    return p if p.is_absolute() else base / p
