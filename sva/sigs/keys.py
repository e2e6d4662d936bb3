"""Ed25519 publisher keys: generate, store, load, sign, verify.

Files are one line of text so they can be pasted into a config or a ticket:

    publisher.key   sva-sigs-ed25519-secret <base64 32-byte seed>      (mode 0600)
    publisher.pub   sva-sigs-ed25519 <base64 32-byte public key> <key id>

A key id is the first 16 hex digits of the SHA-256 of the raw public key: bundles name
the key that signed them so a verifier with several trusted keys (rotation) knows which
one to try, but the id is only a hint — the signature check is what counts.

Signatures cover a domain-separation prefix plus the exact manifest bytes, so a signature
made for anything else with the same key can never pass as a bundle signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from sva.errors import ConfigError

SECRET_TAG = "sva-sigs-ed25519-secret"
PUBLIC_TAG = "sva-sigs-ed25519"
SIGNED_CONTEXT = b"sva-sigs-manifest-v1\0"
_MAX_KEY_FILE = 4096
_MAX_KEYS = 64  # trusted keys in one directory: more is a misconfiguration


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """A trusted publisher key; `source` is the file it came from (for messages)."""

    raw: bytes
    source: str = ""

    @property
    def id(self) -> str:
        return key_id(self.raw)

    def verify(self, signature: bytes, manifest: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, SIGNED_CONTEXT + manifest)
        except (InvalidSignature, ValueError):
            return False
        return True

    def line(self) -> str:
        return f"{PUBLIC_TAG} {base64.b64encode(self.raw).decode()} {self.id}\n"


@dataclass(frozen=True)
class SecretKey:
    seed: bytes
    source: str = ""

    @property
    def public(self) -> PublicKey:
        pub = Ed25519PrivateKey.from_private_bytes(self.seed).public_key().public_bytes_raw()
        return PublicKey(pub, self.source)

    def sign(self, manifest: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.seed).sign(SIGNED_CONTEXT + manifest)


def generate(out_dir: Path, name: str = "publisher", force: bool = False) -> tuple[Path, Path]:
    """A new keypair as OUT_DIR/NAME.key (0600) and OUT_DIR/NAME.pub; never overwrites
    unless `force`."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name {name!r}: use a plain file name")
    out_dir.mkdir(parents=True, exist_ok=True)
    secret_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (secret_path, public_path):
        if p.exists() and not force:
            raise ConfigError(f"{p}: exists (use --force to replace it)")
    seed = Ed25519PrivateKey.generate().private_bytes_raw()
    secret = SecretKey(seed, str(secret_path))
    tmp = secret_path.with_name(f".{secret_path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when the umask or an old file said otherwise
        os.write(fd, f"{SECRET_TAG} {base64.b64encode(seed).decode()}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, secret_path)
    public_path.write_text(secret.public.line())
    return secret_path, public_path


def _read_line(path: Path, tag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            text = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read key: {e.strerror or e}") from None
    if len(text) > _MAX_KEY_FILE:
        raise ConfigError(f"{path}: not a key file (too long)")
    parts = text.decode(errors="replace").split()
    if len(parts) < 2 or parts[0] != tag:
        raise ConfigError(f"{path}: not a {tag} key file (expected '{tag} <base64>')")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        raise ConfigError(f"{path}: key is not valid base64") from None
    if len(raw) != 32:
        raise ConfigError(f"{path}: key is {len(raw)} bytes, Ed25519 keys are 32")
    return raw


def load_secret(path: str | Path) -> SecretKey:
    path = Path(path)
    seed = _read_line(path, SECRET_TAG)
    mode = path.stat().st_mode & 0o077
    if mode:
        raise ConfigError(f"{path}: secret key is readable by others (mode {oct(path.stat().st_mode & 0o777)}); chmod 600")
    return SecretKey(seed, str(path))


def load_public(path: str | Path) -> PublicKey:
    path = Path(path)
    return PublicKey(_read_line(path, PUBLIC_TAG), str(path))


def load_trusted(paths: Iterable[str | Path]) -> tuple[PublicKey, ...]:
    """Public keys from files and directories (every `*.pub` in a directory)."""
    keys: dict[str, PublicKey] = {}
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(p.glob("*.pub"))
            if len(files) > _MAX_KEYS:
                raise ConfigError(f"{p}: more than {_MAX_KEYS} trusted keys")
        elif p.exists():
            files = [p]
        else:
            raise ConfigError(f"{p}: no such trusted key file or directory")
        for f in files:
            k = load_public(f)
            keys.setdefault(k.id, k)
    return tuple(keys.values())
