"""The `[signatures]` configuration section: where bundles come from, which keys are
trusted, how often to look, and the limits a bundle must stay within.

    [signatures]
    state_dir = "/var/lib/sva/sigs"
    sources = ["https://sigs.example.org/feed/", "/srv/sva-feed"]
    trusted_keys = ["/etc/sva/sigs/trusted"]      # *.pub files, or directories of them
    ca_file = ""                                   # PEM CA bundle instead of the system's
    interval_s = 3600
    max_rule_ms_per_mib = 10.0

    [signatures.limits]
    max_total_bytes = 268435456

Every key is checked at load time; a bad one fails with its name (`signatures.interval_s:
…`). `SigsConfig.from_mapping` takes the parsed table, so the daemon's config file can
embed the section.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sva.errors import ConfigError
from sva.sigs.model import BundleLimits, MiB
from sva.sigs.store import default_store_dir

ENV_CONFIG = "SVA_CONFIG"
DEFAULT_CONFIG = Path("/etc/sva/sva.toml")
DEFAULT_TRUSTED = Path("/etc/sva/sigs/trusted")


@dataclass(frozen=True)
class SigsConfig:
    state_dir: Path = field(default_factory=default_store_dir)
    sources: tuple[str, ...] = ()
    trusted_keys: tuple[Path, ...] = ()
    ca_file: Path | None = None
    interval_s: float = 3600.0
    timeout_s: float = 30.0  # connect and each read; a whole download also gets 10x this
    max_download_bytes: int = 256 * MiB
    max_index_bytes: int = 64 << 10
    backoff_initial_s: float = 60.0
    backoff_max_s: float = 6 * 3600.0
    max_rule_ms_per_mib: float = 10.0  # a rule costing more on sample memory refuses the bundle
    sample_size: int = 2 * MiB  # synthetic sample memory for timing and the clean canary
    rule_timeout_s: int = 30  # one timed scan longer than this marks its rules slow
    limits: BundleLimits = field(default_factory=BundleLimits)

    def __post_init__(self) -> None:
        positive = ("interval_s", "timeout_s", "max_download_bytes", "max_index_bytes", "backoff_initial_s",
                    "backoff_max_s", "max_rule_ms_per_mib", "rule_timeout_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"signatures.{name}: must be positive, got {getattr(self, name)!r}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError("signatures.backoff_max_s: must be at least backoff_initial_s")
        if self.sample_size < 64 << 10:
            raise ConfigError(f"signatures.sample_size: at least 65536, got {self.sample_size}")
        for i, s in enumerate(self.sources):
            check_source(s, f"signatures.sources[{i}]")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ConfigError(f"signatures.ca_file: {self.ca_file}: no such file")

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], prefix: str = "signatures", base: Path | None = None) -> SigsConfig:
        """From a parsed TOML table; relative paths are relative to `base` (the config file's dir)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}

        def path(key: str, v: Any) -> Path:
            if not isinstance(v, str) or not v:
                raise ConfigError(f"{prefix}.{key}: expected a path string, got {v!r}")
            p = Path(v)
            return p if p.is_absolute() or base is None else base / p

        for key, v in table.items():
            if key not in fields:
                raise ConfigError(f"{prefix}.{key}: unknown setting (known: {', '.join(sorted(fields))})")
            if key == "state_dir":
                kw[key] = path(key, v)
            elif key == "ca_file":
                kw[key] = path(key, v) if v != "" else None
            elif key in ("sources", "trusted_keys"):
                if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                    raise ConfigError(f"{prefix}.{key}: expected a list of strings, got {v!r}")
                if key == "trusted_keys":
                    kw[key] = tuple(path(f"{key}[{i}]", x) for i, x in enumerate(v))
                else:
                    kw[key] = tuple(x if "://" in x or base is None or Path(x).is_absolute() else str(base / x) for x in v)
            elif key == "limits":
                kw[key] = _limits(v, f"{prefix}.limits")
            else:
                want = type(getattr(cls(), key)) if key not in ("sample_size", "rule_timeout_s") else int
                kw[key] = _scalar(v, want, f"{prefix}.{key}")
        return cls(**kw)


def _scalar(v: Any, want: type, key: str) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | float) or (want is int and not isinstance(v, int)):
        raise ConfigError(f"{key}: expected {'an integer' if want is int else 'a number'}, got {v!r}")
    return want(v)


def _limits(v: Any, prefix: str) -> BundleLimits:
    if not isinstance(v, Mapping):
        raise ConfigError(f"{prefix}: expected a table")
    known = {f.name for f in dataclasses.fields(BundleLimits)}
    for k in v:
        if k not in known:
            raise ConfigError(f"{prefix}.{k}: unknown setting (known: {', '.join(sorted(known))})")
    return BundleLimits(**{k: _scalar(x, int, f"{prefix}.{k}") for k, x in v.items()})


def check_source(source: str, key: str) -> str:
    """An https:// feed URL or an absolute local directory; ConfigError naming `key` otherwise."""
    if "://" in source:
        u = urlsplit(source)
        if u.scheme != "https" or not u.hostname:
            raise ConfigError(f"{key}: {source!r}: feeds are fetched over https:// only (certificate checked)")
        return source
    if not Path(source).is_absolute():
        raise ConfigError(f"{key}: {source!r}: a local feed must be an absolute directory path")
    return source


def load_config(path: str | os.PathLike[str] | None = None) -> SigsConfig:
    """The `[signatures]` section of PATH, else of $SVA_CONFIG, else of /etc/sva/sva.toml if
    it exists; defaults (trusted keys from /etc/sva/sigs/trusted if present) otherwise."""
    explicit = path is not None or bool(os.environ.get(ENV_CONFIG))
    p = Path(path or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG)
    if not p.exists():
        if explicit:
            raise ConfigError(f"{p}: no such config file")
        return SigsConfig(trusted_keys=(DEFAULT_TRUSTED,) if DEFAULT_TRUSTED.is_dir() else ())
    try:
        doc = tomllib.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: {e}") from None
    table = doc.get("signatures", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{p}: [signatures] must be a table")
    return SigsConfig.from_mapping(table, base=p.parent)
