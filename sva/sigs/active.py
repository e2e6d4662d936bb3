"""The rule set in force, as the callable the engine's `yara_matches` provider calls at the
start of every cycle (`sva.guest.memscan.YaraMemoryScan.rules`).

`ActiveRules()` follows the store's `active` link: one readlink per call, a compile (in a
background thread) only when the link points somewhere new. While a new bundle compiles,
or if it cannot be loaded, the call returns the rules it had — a cycle never runs without
rules and never waits for a compile. With no active bundle it returns the built-in
bundle's memory rules (signatures/). An updater in the same process hands over the set it
already compiled (`prime`), so the swap costs nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sva.errors import ConfigError, SvaError
from sva.scan.cost import SlowRulePolicy
from sva.scan.rules import CompiledRuleSet
from sva.sigs.manifest import Manifest
from sva.sigs.model import BundleLimits
from sva.sigs.store import SignatureStore, manifest_bytes, read_info

log = logging.getLogger(__name__)


def load_bundle_rules(bundle_dir: Path) -> CompiledRuleSet:
    """The memory rules of an installed (already verified) bundle directory."""
    from sva.sigs.content import compile_memory_rules

    try:
        manifest = Manifest.parse(manifest_bytes(bundle_dir), BundleLimits(), str(bundle_dir))
    except OSError as e:
        raise ConfigError(f"{bundle_dir}: cannot read the bundle manifest: {e.strerror or e}") from None
    return compile_memory_rules(bundle_dir / "files", manifest, source=str(bundle_dir))


class ActiveRules:
    """Callable: the active bundle's compiled memory rules (see the module docstring).

    When the link moves, the new bundle is compiled in a background thread and the call
    returns the rules in use until it is ready, so no cycle waits for a compile; only the
    very first call (nothing compiled yet) compiles in the caller.
    """

    def __init__(self, store: SignatureStore, fallback: Callable[[], CompiledRuleSet] | None = None) -> None:
        self.store = store
        if fallback is None:
            from sva.sigs.content import builtin_rules

            fallback = builtin_rules
        self._fallback = fallback
        self._lock = threading.Lock()
        # (target, rules) replaced as one tuple: a reader sees a consistent pair
        self._current: tuple[Path | None, CompiledRuleSet] | None = None
        self._loading: Path | None | bool = False  # target being compiled in the background
        self.load_errors = 0
        self.last_error: str | None = None

    def prime(self, target: Path, rules: CompiledRuleSet) -> None:
        """Hand over a set compiled elsewhere for `target` (the updater in this process)."""
        self._current = (target.resolve(), rules)

    @property
    def version_dir(self) -> Path | None:
        cur = self._current
        return None if cur is None else cur[0]

    @property
    def version(self) -> str:
        """The version of the rules in use, for stamping on alerts: the bundle's version, or
        "builtin" for the built-in signatures/."""
        target = self.version_dir
        if target is None:
            return "builtin"
        try:
            return str(read_info(target).version)
        except ConfigError:
            return f"unknown ({target.name})"

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait for a background compile to finish (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._loading is not False and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._loading is False

    def __call__(self) -> CompiledRuleSet:
        target = self.store.link_target("active")
        resolved = target.resolve() if target is not None else None
        cur = self._current
        if cur is not None and cur[0] == resolved:
            return cur[1]
        if cur is None:  # nothing to scan with yet: compile now, in the caller
            with self._lock:
                if self._current is None:
                    self._current = self._load(resolved, None)
                return self._current[1]
        with self._lock:
            if self._loading is False:
                self._loading = resolved
                threading.Thread(target=self._background, args=(resolved, cur), name="sva-sigs-load",
                                 daemon=True).start()
        return cur[1]

    def _background(self, target: Path | None, cur: tuple[Path | None, CompiledRuleSet]) -> None:
        try:
            loaded = self._load(target, cur)
            with self._lock:
                if self._current is cur:  # not primed with something newer meanwhile
                    self._current = loaded
        finally:
            self._loading = False

    def _load(self, target: Path | None, cur: tuple[Path | None, CompiledRuleSet] | None
              ) -> tuple[Path | None, CompiledRuleSet]:
        try:
            return target, load_bundle_rules(target) if target is not None else self._fallback()
        except (SvaError, OSError) as e:
            self.load_errors += 1
            self.last_error = f"{target}: {e}"
            log.warning("signature bundle %s could not be loaded, keeping the rules in use: %s", target, e)
            if cur is not None:
                # remember the failed target so it is not compiled again every cycle
                return target, cur[1]
            return None, self._fallback()


def rules_for_scan(spec: str | None, config_path: str | None = None) -> Callable[[], CompiledRuleSet]:
    """The rules callable for `sva scan`/`sva watch --signatures SPEC`:
    a directory of rule files (compiled once); a bundle file (verified with the trusted keys
    of the `[signatures]` config, then compiled once); nothing: the active bundle of the
    configured store (`[signatures] state_dir`, else $SVA_SIGS_DIR, else /var/lib/sva/sigs),
    followed across updates (the built-in signatures/ until one is installed)."""
    if spec is None:
        from sva.sigs.config import load_config

        return ActiveRules(SignatureStore(load_config(config_path).state_dir))
    path = Path(spec)
    if path.is_dir():
        # An unvetted directory (no bundle pipeline refused its slow rules): time them and
        # scan the slow ones apart, each with its own timeout (sva.scan.cost).
        rules = CompiledRuleSet.load(path, slow_policy=SlowRulePolicy())
        return lambda: rules
    if path.is_file():
        rules = _bundle_file_rules(path, config_path)
        return lambda: rules
    raise ConfigError(f"--signatures {spec}: no such rule directory or bundle file")


def _bundle_file_rules(path: Path, config_path: str | None) -> CompiledRuleSet:
    import tempfile

    from sva.sigs.bundle import read_bundle, unpack
    from sva.sigs.config import load_config
    from sva.sigs.keys import load_trusted

    cfg = load_config(config_path)
    trusted = load_trusted(cfg.trusted_keys)
    if not trusted:
        raise ConfigError(f"--signatures {path}: no trusted publisher keys to verify it ([signatures] trusted_keys)")
    bundle = read_bundle(path.read_bytes(), trusted, cfg.limits, str(path))
    with tempfile.TemporaryDirectory(prefix="sva-bundle-") as tmp:
        unpack(bundle, Path(tmp) / "b")
        return load_bundle_rules(Path(tmp) / "b")


def scan_state(spec: str | None, config_path: str | None = None) -> Any:
    """A `YaraMemoryScan` using `rules_for_scan(spec)`, for `memory_providers(session, scan)`."""
    from sva.guest.memscan import YaraMemoryScan

    return YaraMemoryScan(rules=rules_for_scan(spec, config_path))
