"""The signature store: verified bundles on disk, the active one, the last known good one,
and the refresher's state, all under one directory (default /var/lib/sva/sigs,
`$SVA_SIGS_DIR` to override):

    bundles/v42-1a2b3c4d5e6f/    an unpacked, verified bundle (manifest.json, manifest.sig,
                                  files/…, info.json: source, counts, activation time)
    active   -> bundles/v42-…    symbolic link: the bundle the engine scans with
    previous -> bundles/v41-…    the last known good bundle (`sva sigs rollback`)
    staging/                     bundles being checked; never read by the engine
    state.json                   versions, sources' ETags and backoff, last check and error
    lock                         flock: one updater at a time

Activation is a rename: a new link is made beside `active` and renamed over it, so a
reader sees either the old or the new target, never none. Bundles other than the active
and previous ones are removed after each activation.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sva.errors import BundleError, ConfigError
from sva.sigs.bundle import MANIFEST
from sva.sigs.model import RejectReason

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("/var/lib/sva/sigs")
ENV_DIR = "SVA_SIGS_DIR"
_LOCK_WAIT_S = 120.0
_MAX_STATE_BYTES = 4 << 20


def default_store_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


@dataclass(frozen=True)
class BundleInfo:
    """One installed bundle, as status shows it."""

    name: str
    version: int
    dir: Path
    source: str
    key_id: str
    sha256: str
    activated: float
    counts: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "dir": str(self.dir), "source": self.source,
                "key_id": self.key_id, "sha256": self.sha256, "activated": self.activated, "counts": self.counts}


class SignatureStore:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_store_dir()

    # -- layout --------------------------------------------------------------------------
    @property
    def bundles(self) -> Path:
        return self.root / "bundles"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def ensure(self) -> None:
        try:
            for d in (self.root, self.bundles, self.staging):
                d.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{self.root}: cannot create the signature store: {e.strerror or e}") from None

    def link_target(self, name: str = "active") -> Path | None:
        """Where `active`/`previous` points (a bundle directory), or None."""
        try:
            return self.root / os.readlink(self.root / name)
        except OSError:
            return None

    def info(self, name: str = "active") -> BundleInfo | None:
        target = self.link_target(name)
        return None if target is None else read_info(target)

    # -- changing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (one updater, rollback or pruning at a time)."""
        self.ensure()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + _LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ConfigError(f"{self.root}/lock: another update has held the store for {_LOCK_WAIT_S:.0f} s") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def new_staging_dir(self, tag: str) -> Path:
        self.ensure()
        return self.staging / f"{tag}.{os.getpid()}.{time.monotonic_ns()}"

    def commit(self, staged: Path, info: BundleInfo) -> BundleInfo:
        """Move a checked staging dir into bundles/ and make it active; the old active one
        becomes `previous`. Call with the lock held."""
        final = self.bundles / f"v{info.version}-{info.sha256[:12]}"
        try:
            if final.exists():  # the same bundle installed before and since rolled away from
                shutil.rmtree(final)
            info = BundleInfo(**{**info.__dict__, "dir": final})
            _write_json(staged / "info.json", info.to_json())
            os.replace(staged, final)
            old = self.link_target("active")
            if old is not None and old.resolve() != final.resolve():
                self._point("previous", old)
            self._point("active", final)
        except OSError as e:
            raise BundleError(str(self.root), RejectReason.STORE_FAILED, f"cannot activate the bundle: {e.strerror or e}") from None
        self.prune()
        return info

    def rollback(self) -> tuple[BundleInfo, BundleInfo]:
        """Swap `active` and `previous`; returns (now active, now previous)."""
        prev, cur = self.link_target("previous"), self.link_target("active")
        if prev is None or not prev.is_dir():
            raise ConfigError(f"{self.root}: no previous bundle to roll back to")
        if cur is None:
            raise ConfigError(f"{self.root}: no active bundle")
        self._point("active", prev)
        self._point("previous", cur)
        return read_info(prev), read_info(cur)

    def _point(self, name: str, target: Path) -> None:
        tmp = self.root / f".{name}.new"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(os.path.relpath(target, self.root), tmp)
        os.replace(tmp, self.root / name)
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def prune(self) -> None:
        """Remove bundles that are neither active nor previous, and stale staging dirs."""
        keep = {p.resolve() for p in (self.link_target("active"), self.link_target("previous")) if p is not None}
        for d in self.bundles.iterdir() if self.bundles.is_dir() else ():
            if d.resolve() not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def clear_staging(self) -> None:
        for d in self.staging.iterdir() if self.staging.is_dir() else ():
            shutil.rmtree(d, ignore_errors=True)

    # -- state.json ------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any]:
        try:
            with open(self.state_file, "rb") as f:
                data = f.read(_MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise ConfigError(f"{self.state_file}: cannot read: {e.strerror or e}") from None
        try:
            state = json.loads(data) if len(data) <= _MAX_STATE_BYTES else None
        except ValueError:
            state = None
        if not isinstance(state, dict):
            log.warning("%s: unreadable, starting from an empty state", self.state_file)
            return {}
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        self.ensure()
        _write_json(self.state_file, state)


def read_info(bundle_dir: Path) -> BundleInfo:
    try:
        d = json.loads((bundle_dir / "info.json").read_text())
        return BundleInfo(d["name"], int(d["version"]), bundle_dir, d["source"], d["key_id"], d["sha256"],
                          float(d["activated"]), dict(d["counts"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{bundle_dir}/info.json: not a bundle of the signature store ({e})") from None


def manifest_bytes(bundle_dir: Path) -> bytes:
    return (bundle_dir / MANIFEST).read_bytes()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
