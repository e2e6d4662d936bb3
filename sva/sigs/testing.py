"""Test factories for signature bundles: source directories, large generated rule sets, a
test CA and a real HTTPS feed server on loopback. Real objects, no mocks; used by
tests/sigs and bench/bench_sigs.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import ipaddress
import random
import shutil
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sva.lab.scenarios import MARKER
from sva.scan.rules import signatures_dir


def write_source(directory: Path, extra: dict[str, str | bytes] | None = None, *, builtin: bool = True) -> Path:
    """A publisher's source directory: a copy of the built-in signatures/ (unless
    `builtin=False`) plus `extra` files (relative path -> text or bytes)."""
    if builtin:
        shutil.copytree(signatures_dir(), directory, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    else:
        directory.mkdir(parents=True)
    for rel, body in (extra or {}).items():
        p = directory / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body.encode() if isinstance(body, str) else body)
    return directory


MARKER_RULE_TEXT = f"""
rule SVA_Lab_Marker_Canary
{{
    meta:
        description = "the lab marker (the pipeline's default canary)"
    strings:
        $m = "{MARKER}" ascii
    condition:
        $m
}}
"""


def generate_rules(directory: Path, count: int, per_file: int = 100, seed: int = 0) -> int:
    """`count` distinct, cheap rules (each one literal and one hex string, as typical IOC
    rules are) in files of `per_file` under `directory`, plus the lab-marker rule as canary.
    Returns the number of rules written."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    for f in range(-(-count // per_file)):
        parts = []
        for i in range(f * per_file, min(count, (f + 1) * per_file)):
            token = rng.randbytes(8).hex()
            hexstr = " ".join(f"{b:02X}" for b in rng.randbytes(10))
            parts.append(
                f'rule Gen_{i:05d} : generated\n{{\n    meta:\n        author = "sva.sigs.testing"\n'
                f'        mitre_attack = "T1059"\n    strings:\n        $s = "gen-ioc-{i:05d}-{token}" ascii wide\n'
                f"        $h = {{ {hexstr} }}\n    condition:\n        any of them\n}}\n"
            )
            written += 1
        (directory / f"gen_{f:03d}.yar").write_text("\n".join(parts))
    (directory / "zz_canary.yar").write_text(MARKER_RULE_TEXT)
    return written + 1


@dataclass
class LoopbackCA:
    """A CA and a server certificate for 127.0.0.1/localhost, as PEM files in `directory`."""

    directory: Path
    ca_file: Path = field(init=False)
    cert_file: Path = field(init=False)
    key_file: Path = field(init=False)

    def __post_init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self.directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sva test CA")])
        ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        pem = serialization.Encoding.PEM
        self.ca_file = self.directory / "ca.pem"
        self.cert_file = self.directory / "server.pem"
        self.key_file = self.directory / "server.key"
        self.ca_file.write_bytes(ca.public_bytes(pem))
        self.cert_file.write_bytes(cert.public_bytes(pem))
        self.key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))


class FeedServer:
    """A static HTTPS server for a feed directory, on 127.0.0.1 and a random port.

    Sends an ETag (SHA-256 of the file) and answers If-None-Match with 304. `truncate`
    names files sent with their full Content-Length but only half their bytes before the
    connection is closed. `requests` records (path, request headers, status) per request.
    `port` 0 picks a free one; a given port restarts a feed where a closed one was
    (HTTPServer binds with SO_REUSEADDR).
    """

    def __init__(self, directory: Path, ca: LoopbackCA, port: int = 0) -> None:
        self.directory = directory
        self.truncate: set[str] = set()
        self.requests: list[tuple[str, dict[str, str], int]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                name = self.path.lstrip("/").split("?", 1)[0]
                path = server.directory / name
                if "/" in name or not name or not path.is_file():
                    self._done(404, b"not found")
                    return
                body = path.read_bytes()
                etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
                if self.headers.get("If-None-Match") == etag:
                    self._done(304, b"", etag)
                    return
                if name in server.truncate:
                    server.requests.append((name, dict(self.headers), 200))
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self._done(200, body, etag)

            def _done(self, status: int, body: bytes, etag: str | None = None) -> None:
                server.requests.append((self.path.lstrip("/"), dict(self.headers), status))
                self.send_response(status)
                if etag:
                    self.send_header("ETag", etag)
                if status != 304:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if status != 304:
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(ca.cert_file, ca.key_file)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="sva-test-feed", daemon=True)
        self._thread.start()

    def statuses(self, name: str) -> list[int]:
        return [s for p, _h, s in self.requests if p == name]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> FeedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
