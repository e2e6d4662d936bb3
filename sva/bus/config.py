"""Bus configuration: one validated frozen dataclass, loadable from the `[bus]` TOML table.

    [bus]
    endpoint = "tcp://10.0.0.2:7755"        # PUB; tcp://HOST:PORT or ipc:///path
    replay_endpoint = "tcp://10.0.0.2:7756" # ROUTER; default: PUB port + 1 (ipc: path + ".replay")
    journal = "/var/lib/sva/bus"
    keys_dir = "/etc/sva/keys"
    plaintext = false                        # true = no CURVE: local development only
    heartbeat_s = 2.0
    fsync = "interval"                       # always | interval | never (see sva.bus.journal)
    fsync_interval_s = 1.0
    retention_bytes = 1073741824
    retention_age_s = 2592000
    segment_bytes = 16777216
    sndhwm = 100000                          # per-subscriber queue before PUB drops
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sva.bus.journal import FsyncPolicy
from sva.bus.keys import DEFAULT_KEYS_DIR
from sva.errors import ConfigError

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7755"
_TCP = re.compile(r"^tcp://(?P<host>\[[0-9a-fA-F:.]+\]|[^:/\[\]]+):(?P<port>\*|\d{1,5})$")


def check_endpoint(endpoint: str, key: str = "endpoint") -> str:
    """tcp://HOST:PORT (PORT may be * to pick a free one) or ipc:///path; ConfigError otherwise."""
    if endpoint.startswith("ipc://"):
        if len(endpoint) <= len("ipc://"):
            raise ConfigError(f"{key}: ipc endpoint needs a path: {endpoint!r}")
        return endpoint
    m = _TCP.match(endpoint)
    if not m:
        raise ConfigError(f"{key}: expected tcp://HOST:PORT or ipc:///PATH, got {endpoint!r}")
    if m["port"] != "*" and not 0 < int(m["port"]) < 65536:
        raise ConfigError(f"{key}: port {m['port']} out of range")
    return endpoint


def default_replay_endpoint(endpoint: str) -> str:
    """The replay endpoint that goes with a PUB endpoint: tcp port + 1, or ipc path + '.replay'."""
    if endpoint.startswith("ipc://"):
        return endpoint + ".replay"
    m = _TCP.match(endpoint)
    if not m or m["port"] == "*":
        raise ConfigError(f"replay_endpoint: cannot derive one from {endpoint!r}; give it explicitly")
    return f"tcp://{m['host']}:{int(m['port']) + 1}"


@dataclass(frozen=True, slots=True)
class BusConfig:
    endpoint: str = DEFAULT_ENDPOINT
    replay_endpoint: str = ""
    journal: Path = Path("/var/lib/sva/bus")
    keys_dir: Path = Path(DEFAULT_KEYS_DIR)
    plaintext: bool = False
    heartbeat_s: float = 2.0
    fsync: FsyncPolicy = FsyncPolicy.INTERVAL
    fsync_interval_s: float = 1.0
    retention_bytes: int = 1 << 30
    retention_age_s: float = 30 * 86400
    segment_bytes: int = 16 << 20
    sndhwm: int = 100_000

    def __post_init__(self) -> None:
        check_endpoint(self.endpoint, "bus.endpoint")
        if not self.replay_endpoint:
            object.__setattr__(self, "replay_endpoint", default_replay_endpoint(self.endpoint))
        check_endpoint(self.replay_endpoint, "bus.replay_endpoint")
        if self.replay_endpoint == self.endpoint and not self.endpoint.endswith(":*"):
            raise ConfigError("bus.replay_endpoint must differ from bus.endpoint")
        object.__setattr__(self, "journal", Path(self.journal))
        object.__setattr__(self, "keys_dir", Path(self.keys_dir))
        try:
            object.__setattr__(self, "fsync", FsyncPolicy(self.fsync))
        except ValueError:
            choices = ", ".join(p.value for p in FsyncPolicy)
            raise ConfigError(f"bus.fsync: one of {choices}, got {self.fsync!r}") from None
        for name, low in (("heartbeat_s", 0.01), ("fsync_interval_s", 0.01), ("retention_age_s", 1.0)):
            if not float(getattr(self, name)) >= low:
                raise ConfigError(f"bus.{name}: must be at least {low}, got {getattr(self, name)!r}")
        if self.segment_bytes < 4096:
            raise ConfigError(f"bus.segment_bytes: at least 4096, got {self.segment_bytes}")
        if self.retention_bytes < 2 * self.segment_bytes:
            raise ConfigError(
                f"bus.retention_bytes ({self.retention_bytes}) must be at least twice bus.segment_bytes "
                f"({self.segment_bytes}): retention drops whole segments"
            )
        if self.sndhwm < 0:
            raise ConfigError(f"bus.sndhwm: must be >= 0, got {self.sndhwm}")

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], prefix: str = "bus") -> BusConfig:
        """Build from a parsed TOML table; unknown keys and wrong types name the key."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in table.items():
            if key not in fields:
                raise ConfigError(f"{prefix}.{key}: unknown setting (known: {', '.join(fields)})")
            default = fields[key].default
            want = type(default)
            if isinstance(default, Path):
                ok = isinstance(value, str)
            elif want is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            elif want is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(default, str):
                ok = isinstance(value, str)
            else:
                ok = isinstance(value, want)
            if not ok:
                raise ConfigError(f"{prefix}.{key}: expected {want.__name__}, got {type(value).__name__} {value!r}")
            kwargs[key] = value
        return cls(**kwargs)
