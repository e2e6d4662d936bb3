"""CURVE keys for the bus: generation, authorization, loading, and the ZAP key check.

A key directory (default /etc/sva/keys, or $SVA_KEYS_DIR) looks like this; the files are
ZeroMQ certificates (the format `zmq.auth` and czmq's zcert read):

    server.key  server.key_secret         the publisher's keypair
    clients/NAME.key  clients/NAME.key_secret   client keypairs made here, for integrators
    authorized/NAME.key                   public keys of clients allowed to connect

Secret files are written 0600 and directories holding them 0700. The publisher's ZAP
handler consults `authorized/` on every connection, so `sva keys authorize` takes effect
without a restart; an unknown key completes no handshake and receives nothing.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from sva.errors import BusError

log = logging.getLogger(__name__)

DEFAULT_KEYS_DIR = "/etc/sva/keys"
_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def default_keys_dir() -> Path:
    return Path(os.environ.get("SVA_KEYS_DIR") or DEFAULT_KEYS_DIR)


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE keypair, Z85 text (40 characters each). `secret` is empty for a public-only key."""

    public: str
    secret: str = ""

    @classmethod
    def generate(cls) -> KeyPair:
        pub, sec = zmq.curve_keypair()
        return cls(pub.decode(), sec.decode())


def check_public_key(text: str, source: str = "public key") -> str:
    """A Z85 CURVE public key, stripped; BusError saying what is wrong otherwise."""
    key = text.strip().strip('"')
    if len(key) != 40:
        raise BusError(f"{source}: a CURVE key is 40 Z85 characters, got {len(key)}")
    if not _Z85_KEY.match(key):
        raise BusError(f"{source}: not a Z85-encoded CURVE key (bad characters)")
    try:
        z85.decode(key.encode())
    except (ValueError, KeyError, OverflowError) as e:
        raise BusError(f"{source}: not a Z85-encoded CURVE key ({e})") from None
    return key


def _banner(kind: str) -> str:
    now = datetime.now().isoformat(timespec="seconds")
    lines = [f"#   ****  Generated on {now} by sva  ****", f"#   ZeroMQ CURVE {kind} Certificate"]
    if kind == "**Secret**":
        lines.append("#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.")
    return "\n".join(lines) + "\n\n"


def _write_private(path: Path, text: str, mode: int) -> None:
    """Write via a temp file created with `mode`, then rename: never briefly world-readable."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        raise BusError(f"{path}: cannot write: {e.strerror}") from None


def write_certificate(base: Path, pair: KeyPair) -> tuple[Path, Path | None]:
    """Write BASE.key (0644) and, with a secret, BASE.key_secret (0600)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    pub_path = base.with_name(base.name + ".key")
    _write_private(pub_path, _banner("Public") + f'metadata\ncurve\n    public-key = "{pair.public}"\n', 0o644)
    if not pair.secret:
        return pub_path, None
    sec_path = base.with_name(base.name + ".key_secret")
    body = f'metadata\ncurve\n    public-key = "{pair.public}"\n    secret-key = "{pair.secret}"\n'
    _write_private(sec_path, _banner("**Secret**") + body, 0o600)
    return pub_path, sec_path


def load_certificate(path: str | os.PathLike[str], need_secret: bool = False) -> KeyPair:
    """Read a ZeroMQ certificate file (.key or .key_secret); BusError naming the file if bad."""
    p = Path(path)
    if not p.exists():
        raise BusError(f"key file {p} does not exist (create keys with `sva keys gen`)")
    try:
        pub, sec = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError) as e:
        raise BusError(f"key file {p}: cannot read a ZeroMQ certificate: {e}") from None
    if pub is None:
        raise BusError(f"key file {p}: no public-key line")
    public = check_public_key(pub.decode(errors="replace"), f"key file {p}")
    secret = ""
    if sec is not None:
        secret = check_public_key(sec.decode(errors="replace"), f"key file {p} (secret key)")
    if need_secret:
        if not secret:
            raise BusError(f"key file {p} holds no secret key (use the .key_secret file)")
        if zmq.curve_public(secret.encode()).decode() != public:
            raise BusError(f"key file {p}: its secret key does not belong to its public key")
        mode = p.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("secret key file %s is readable by others (mode %03o); chmod 600 it", p, mode)
    return KeyPair(public, secret)


def load_public_key(text_or_path: str) -> str:
    """A public key given as Z85 text or as the path of a certificate file."""
    candidate = text_or_path.strip()
    if os.path.exists(candidate):
        return load_certificate(candidate).public
    if len(candidate) == 40 or not ("/" in candidate or candidate.endswith((".key", ".key_secret"))):
        return check_public_key(candidate)
    return load_certificate(candidate).public  # names the missing file


@dataclass(frozen=True, slots=True)
class GeneratedKeys:
    server_public: Path
    server_secret: Path | None
    client_public: Path
    client_secret: Path | None
    authorized: Path
    server_created: bool


def generate(keys_dir: str | os.PathLike[str], client: str = "client", force: bool = False) -> GeneratedKeys:
    """Create the server keypair (unless present, or `force`) and a client keypair, and authorize the client."""
    d = Path(keys_dir)
    if not _NAME.match(client):
        raise BusError(f"client name {client!r}: use letters, digits, '.', '_' and '-' only")
    try:
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        for sub in ("clients", "authorized"):
            (d / sub).mkdir(exist_ok=True)
        os.chmod(d / "clients", 0o700)
    except OSError as e:
        raise BusError(f"key directory {d}: {e.strerror}") from None
    server_base = d / "server"
    created = force or not (d / "server.key_secret").exists()
    if created:
        spub, ssec = write_certificate(server_base, KeyPair.generate())
    else:
        load_certificate(d / "server.key_secret", need_secret=True)
        spub, ssec = d / "server.key", d / "server.key_secret"
    client_base = d / "clients" / client
    if (d / "clients" / f"{client}.key_secret").exists() and not force:
        raise BusError(f"client keypair {client_base}.key_secret exists; pick another --client name or --force")
    pair = KeyPair.generate()
    cpub, csec = write_certificate(client_base, pair)
    auth = authorize(d, pair.public, client)
    return GeneratedKeys(spub, ssec, cpub, csec, auth, created)


def authorize(keys_dir: str | os.PathLike[str], public_key: str, name: str | None = None) -> Path:
    """Allow a client public key: write authorized/NAME.key."""
    key = load_public_key(public_key)
    name = name or "client-" + re.sub(r"[^A-Za-z0-9]", "", key)[:12]
    if not _NAME.match(name):
        raise BusError(f"key name {name!r}: use letters, digits, '.', '_' and '-' only")
    auth_dir = Path(keys_dir) / "authorized"
    try:
        auth_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BusError(f"key directory {auth_dir}: {e.strerror}") from None
    for existing, pub in authorized_keys(auth_dir).items():
        if pub == key:
            return existing
    pub_path, _ = write_certificate(auth_dir / name, KeyPair(key))
    return pub_path


def authorized_keys(auth_dir: str | os.PathLike[str]) -> dict[Path, str]:
    """{file: public key} for every readable *.key in the directory; bad files are logged and skipped."""
    out: dict[Path, str] = {}
    d = Path(auth_dir)
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.key")):
        try:
            out[p] = load_certificate(p).public
        except BusError as e:
            log.warning("ignoring authorized key: %s", e)
    return out


class AuthorizedKeys:
    """ZAP CURVE credentials provider: is this client key in the authorized directory?

    Re-reads the directory when its modification time changes, so keys added or removed
    by `sva keys authorize` (or by hand) apply to the next connection.
    """

    _LOG_EVERY_S = 60.0  # a refused client retries every 100 ms: say so once a minute per key

    def __init__(self, auth_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(auth_dir)
        self._refused_logged: dict[str, float] = {}
        self._stamp: tuple[float, int] | None = None
        self._keys: frozenset[str] = frozenset()
        self._refresh()

    def _refresh(self) -> None:
        try:
            st = self.dir.stat()
            stamp = (st.st_mtime, st.st_ino)
        except OSError:
            stamp = (0.0, 0)
        if stamp != self._stamp:
            self._keys = frozenset(authorized_keys(self.dir).values())
            self._stamp = stamp

    @property
    def keys(self) -> frozenset[str]:
        self._refresh()
        return self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        text = key.decode(errors="replace")
        allowed = text in self.keys
        if not allowed:
            now = time.monotonic()
            if now - self._refused_logged.get(text, -self._LOG_EVERY_S) >= self._LOG_EVERY_S:
                if len(self._refused_logged) > 1000:
                    self._refused_logged.clear()
                self._refused_logged[text] = now
                log.warning("bus: refused CURVE client key %s (not in %s)", text, self.dir)
        return allowed
