"""Fixtures for signature-bundle tests: real Ed25519 keys, real bundles, a real store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sva.scan.sample import synthetic_memory
from sva.sigs.config import SigsConfig
from sva.sigs.keys import PublicKey, SecretKey, generate, load_public, load_secret
from sva.sigs.pack import pack
from sva.sigs.pipeline import Refresher
from sva.sigs.testing import FeedServer, LoopbackCA, write_source

# Rule only the "new" bundles have; the string is planted where a test needs it to match.
NEW_RULE = """
rule SVA_Test_New_Bundle_Only
{
    strings:
        $a = "sigs-test-only-in-new-bundle-7f3c" ascii
    condition:
        $a
}
"""
SAMPLE = synthetic_memory(256 << 10, seed=7)  # small: tests time rules on it many times


@pytest.fixture(scope="session")
def publisher_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[SecretKey, PublicKey, Path]:
    d = tmp_path_factory.mktemp("pubkeys")
    secret, public = generate(d, "publisher")
    return load_secret(secret), load_public(public), public


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[SecretKey, PublicKey, Path]:
    d = tmp_path_factory.mktemp("otherkeys")
    secret, public = generate(d, "other")
    return load_secret(secret), load_public(public), public


@pytest.fixture
def make_bundle(tmp_path: Path, publisher_keys: tuple[SecretKey, PublicKey, Path]) -> Callable[..., Path]:
    """Factory: a signed bundle of the built-in signatures plus `extra` files, version `version`."""
    counter = iter(range(10_000))

    def make(version: int, extra: dict[str, str | bytes] | None = None, *, key: SecretKey | None = None,
             check: bool = False, builtin: bool = True, out: Path | None = None) -> Path:
        n = next(counter)
        src = write_source(tmp_path / f"src{n}", extra, builtin=builtin)
        out = out or tmp_path / f"bundles{n}" / f"test-{version}.tar.gz"
        pack(src, key or publisher_keys[0], out, name="test", version=version, check=check, sample=SAMPLE)
        return out

    return make


@pytest.fixture
def config(tmp_path: Path, publisher_keys: tuple[SecretKey, PublicKey, Path]) -> SigsConfig:
    return SigsConfig(state_dir=tmp_path / "store", trusted_keys=(publisher_keys[2],), sample_size=256 << 10,
                      backoff_initial_s=10, backoff_max_s=80, interval_s=300, timeout_s=5)


@pytest.fixture
def refresher(config: SigsConfig) -> Iterator[Refresher]:
    yield Refresher(config, sample=SAMPLE)


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LoopbackCA:
    return LoopbackCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def feed(tmp_path: Path, ca: LoopbackCA) -> Iterator[FeedServer]:
    """A real HTTPS server on 127.0.0.1 (random port) serving tmp_path/feed."""
    d = tmp_path / "feed"
    d.mkdir()
    with FeedServer(d, ca) as server:
        yield server
