"""Bundle files: a (gzip-compressed) tar holding the signed manifest and the files it lists.

    manifest.json          the manifest (sva.sigs.manifest), exact signed bytes
    manifest.sig           {"format": 1, "signatures": [{"key_id", "algorithm": "ed25519", "signature"}]}
    files/<path>           every file the manifest lists, nothing else

A bundle comes from the network and is hostile until proven otherwise. `read_bundle`
never lets tarfile write anything: it decompresses with a size cap, walks the members
with a count cap, accepts only regular files with plain relative names (no absolute paths,
no `..`, no links, devices, directories or duplicates), keeps their bytes in memory within
the caps, checks the signature over the manifest's exact bytes with the trusted keys,
and only then parses the manifest and checks every file's size and SHA-256. Nothing from a
bundle is written to disk (`unpack`) or compiled before all of that passed.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from sva.errors import BundleError
from sva.sigs.keys import PublicKey, SecretKey
from sva.sigs.manifest import Manifest, check_path
from sva.sigs.model import BundleLimits, RejectReason

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FILES_PREFIX = "files/"
_MAX_SIG_BYTES = 64 << 10
_MAX_SIGNATURES = 16
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and every file hash have been checked."""

    manifest: Manifest
    manifest_bytes: bytes
    signature_bytes: bytes
    key_id: str  # the trusted key whose signature verified
    contents: Mapping[str, bytes] = field(hash=False)  # path (under files/) -> bytes
    sha256: str = ""  # of the bundle file as received

    @property
    def version(self) -> int:
        return self.manifest.version


def read_bundle(
    data: bytes, trusted: Sequence[PublicKey], limits: BundleLimits | None = None, source: str = "bundle"
) -> VerifiedBundle:
    """Verify a bundle file's bytes; BundleError with the reason if anything is wrong."""
    limits = limits or BundleLimits()
    members = _members(_decompressed(data, limits, source), limits, source)
    manifest_bytes = members.pop(MANIFEST, None)
    if manifest_bytes is None:
        raise BundleError(source, RejectReason.BAD_ARCHIVE, f"no {MANIFEST} in the bundle")
    sig_bytes = members.pop(SIGNATURE, None)
    if sig_bytes is None:
        raise BundleError(source, RejectReason.UNSIGNED, f"the bundle is not signed (no {SIGNATURE})")
    if len(manifest_bytes) > limits.max_manifest_bytes:
        raise BundleError(source, RejectReason.BAD_ARCHIVE, f"{MANIFEST} larger than {limits.max_manifest_bytes} bytes")
    key = verify_signature(manifest_bytes, sig_bytes, trusted, source)
    manifest = Manifest.parse(manifest_bytes, limits, source)
    contents = {name[len(FILES_PREFIX):]: body for name, body in members.items()}
    listed = {f.path for f in manifest.files}
    extra = sorted(set(contents) - listed)
    if extra:
        raise BundleError(source, RejectReason.TAMPERED_FILE, f"files/{extra[0]} is in the archive but not in the signed manifest")
    for f in manifest.files:
        body = contents.get(f.path)
        if body is None:
            raise BundleError(source, RejectReason.TAMPERED_FILE, f"files/{f.path} is in the manifest but missing from the archive")
        if len(body) != f.size:
            raise BundleError(source, RejectReason.TAMPERED_FILE,
                              f"files/{f.path} is {len(body)} bytes, the signed manifest says {f.size}")
        if hashlib.sha256(body).hexdigest() != f.sha256:
            raise BundleError(source, RejectReason.TAMPERED_FILE, f"files/{f.path}: SHA-256 differs from the signed manifest")
    return VerifiedBundle(manifest, manifest_bytes, sig_bytes, key.id, MappingProxyType(contents),
                          hashlib.sha256(data).hexdigest())


def verify_signature(manifest: bytes, sig_doc: bytes, trusted: Sequence[PublicKey], source: str) -> PublicKey:
    """The trusted key whose signature over `manifest` verifies; BundleError otherwise:
    untrusted-key when no signature claims a trusted key id, bad-signature when one does
    but does not verify (the manifest or the signature was changed)."""
    sigs = _parse_signatures(sig_doc, source)
    if not trusted:
        raise BundleError(source, RejectReason.UNTRUSTED_KEY, "no trusted publisher keys configured")
    by_id = {k.id: k for k in trusted}
    claimed = [(kid, sig) for kid, sig in sigs if kid in by_id]
    for kid, sig in claimed:
        if by_id[kid].verify(sig, manifest):
            return by_id[kid]
    if claimed:
        raise BundleError(source, RejectReason.BAD_SIGNATURE,
                          f"the signature by trusted key {claimed[0][0]} does not verify: the manifest was altered")
    # the id is only a hint: a signature whose id was changed still counts if it verifies
    for _kid, sig in sigs:
        for k in trusted:
            if k.verify(sig, manifest):
                return k
    ids = ", ".join(kid for kid, _ in sigs)
    raise BundleError(source, RejectReason.UNTRUSTED_KEY,
                      f"signed by key {ids}, which is not a trusted key (trusted: {', '.join(by_id)})")


def _parse_signatures(doc: bytes, source: str) -> list[tuple[str, bytes]]:
    def bad(msg: str) -> BundleError:
        return BundleError(source, RejectReason.UNSIGNED, f"{SIGNATURE}: {msg}")

    if len(doc) > _MAX_SIG_BYTES:
        raise bad("too large")
    try:
        d = json.loads(doc.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("not JSON") from None
    entries = d.get("signatures") if isinstance(d, dict) else None
    if not isinstance(entries, list) or not entries or len(entries) > _MAX_SIGNATURES:
        raise bad(f"no signatures (expected 1 to {_MAX_SIGNATURES})")
    out: list[tuple[str, bytes]] = []
    for e in entries:
        if not isinstance(e, dict) or e.get("algorithm") != "ed25519":
            raise bad("each signature needs algorithm ed25519")
        kid, sig = e.get("key_id"), e.get("signature")
        if not isinstance(kid, str) or not isinstance(sig, str) or len(kid) > 64 or len(sig) > 200:
            raise bad("each signature needs a key_id and a base64 signature")
        try:
            raw = base64.b64decode(sig, validate=True)
        except binascii.Error:
            raise bad("signature is not base64") from None
        if len(raw) != 64:
            raise bad(f"signature is {len(raw)} bytes, Ed25519 signatures are 64")
        out.append((kid, raw))
    return out


def _decompressed(data: bytes, limits: BundleLimits, source: str) -> bytes:
    if not data.startswith(_GZIP_MAGIC):
        if len(data) > limits.max_total_bytes:
            raise BundleError(source, RejectReason.BAD_ARCHIVE, f"archive larger than {limits.max_total_bytes} bytes")
        return data
    d = zlib.decompressobj(wbits=31)  # gzip framing
    try:
        out = d.decompress(data, limits.max_total_bytes + 1)
        if len(out) > limits.max_total_bytes or d.unconsumed_tail:
            raise BundleError(source, RejectReason.BAD_ARCHIVE,
                              f"archive unpacks to more than {limits.max_total_bytes} bytes")
        out += d.flush()
    except zlib.error as e:
        raise BundleError(source, RejectReason.BAD_ARCHIVE, f"corrupt gzip data: {e}") from None
    if not d.eof:
        raise BundleError(source, RejectReason.BAD_ARCHIVE, "gzip data ends early (truncated bundle)")
    if d.unused_data:
        raise BundleError(source, RejectReason.BAD_ARCHIVE, "trailing data after the gzip stream")
    return out


def _members(raw: bytes, limits: BundleLimits, source: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
            for count, m in enumerate(tf, 1):
                if count > limits.max_members:
                    raise BundleError(source, RejectReason.BAD_ARCHIVE, f"more than {limits.max_members} members")
                name = m.name
                if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    what = ("a symbolic link" if m.issym() else "a hard link" if m.islnk() else
                            "a directory" if m.isdir() else "a device or special file")
                    raise BundleError(source, RejectReason.BAD_ARCHIVE, f"member {name[:200]!r} is {what}: only regular files allowed")
                check_path(name, limits, source)
                if name not in (MANIFEST, SIGNATURE) and not name.startswith(FILES_PREFIX):
                    raise BundleError(source, RejectReason.BAD_ARCHIVE, f"unexpected member {name!r} (only {MANIFEST}, {SIGNATURE}, files/…)")
                if name in out:
                    raise BundleError(source, RejectReason.BAD_ARCHIVE, f"member {name!r} appears twice")
                if m.size > limits.max_member_bytes:
                    raise BundleError(source, RejectReason.BAD_ARCHIVE, f"member {name!r} is larger than {limits.max_member_bytes} bytes")
                total += m.size
                if total > limits.max_total_bytes:
                    raise BundleError(source, RejectReason.BAD_ARCHIVE, f"members add up to more than {limits.max_total_bytes} bytes")
                f = tf.extractfile(m)
                body = f.read(m.size + 1) if f is not None else b""
                if len(body) != m.size:
                    raise BundleError(source, RejectReason.BAD_ARCHIVE, f"member {name!r} is truncated")
                out[name] = body
    except BundleError:
        raise
    except (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError) as e:
        raise BundleError(source, RejectReason.BAD_ARCHIVE, f"not a valid tar archive: {e}") from None
    if not out:
        raise BundleError(source, RejectReason.BAD_ARCHIVE, "empty archive")
    return out


def unpack(bundle: VerifiedBundle, dest: Path) -> None:
    """Write a verified bundle under `dest` (which must not exist): manifest.json,
    manifest.sig and files/…; files are created exclusively and never through links."""
    dest.mkdir(mode=0o755)
    (dest / MANIFEST).write_bytes(bundle.manifest_bytes)
    (dest / SIGNATURE).write_bytes(bundle.signature_bytes)
    root = dest / "files"
    root.mkdir()
    for path, body in bundle.contents.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(body)


def write_bundle(manifest: Manifest, contents: Mapping[str, bytes], key: SecretKey) -> bytes:
    """A signed, gzip-compressed bundle file for `manifest` and its files' bytes.

    Member metadata is fixed (mtime 0, root, 0644) so the same input gives the same tar."""
    manifest_bytes = manifest.to_bytes()
    sig = {"format": 1, "signatures": [{
        "key_id": key.public.id, "algorithm": "ed25519",
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode(),
    }]}  # fmt: skip
    sig_bytes = (json.dumps(sig, indent=1, sort_keys=True) + "\n").encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, MANIFEST, manifest_bytes)
        _add(tf, SIGNATURE, sig_bytes)
        for f in manifest.files:
            _add(tf, FILES_PREFIX + f.path, contents[f.path])
    return gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)


def _add(tf: tarfile.TarFile, name: str, body: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    info.mode = 0o644
    info.mtime = 0
    tf.addfile(info, io.BytesIO(body))
