"""The bundle manifest: what a bundle is and every file it holds, as signed JSON.

    {"format": 1, "name": "acme-linux", "version": 42, "created": "2026-11-27T05:00:00Z",
     "min_sva_version": "0.1.0", "canary": "canary.bin",
     "files": [{"path": "memory/miners.yar", "kind": "memory-yara", "size": 1234, "sha256": "…"}]}

The signature covers these exact bytes, so the reader parses the manifest only after the
signature has verified; `Manifest.to_bytes` writes one canonical form (sorted keys) so
packing the same content twice signs the same bytes. `canary` names a file of kind
`canary` whose bytes some memory rule must match; null means the lab marker.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sva.errors import BundleError
from sva.sigs.model import BundleLimits, FileKind, RejectReason

FORMAT = 1
MAX_VERSION = 2**53  # JSON numbers beyond this lose precision in other languages
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_COMPONENT = re.compile(r"^[A-Za-z0-9_+@=,-][A-Za-z0-9._+@=,-]*$")  # no leading dot: no `..`, no hidden files
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SEMVER = re.compile(r"^(\d{1,6})\.(\d{1,6})\.(\d{1,6})$")


def check_path(path: str, limits: BundleLimits, source: str) -> str:
    """A bundle-relative file path that is safe to create under a staging directory:
    relative, `/`-separated, no empty, `.` or `..` components, no hidden names, no
    backslashes, NULs or other odd characters. Raises BundleError (unsafe-path)."""
    if not path or len(path) > limits.max_path_length:
        raise BundleError(source, RejectReason.UNSAFE_PATH, f"path {path[:80]!r}: empty or longer than {limits.max_path_length}")
    if path.startswith("/"):
        raise BundleError(source, RejectReason.UNSAFE_PATH, f"path {path!r} is absolute")
    parts = path.split("/")
    if ".." in parts:
        raise BundleError(source, RejectReason.UNSAFE_PATH, f"path {path!r} leaves the bundle (`..`)")
    if len(parts) > 16 or not all(_COMPONENT.match(p) for p in parts):
        raise BundleError(source, RejectReason.UNSAFE_PATH, f"path {path!r}: only plain names allowed (letters, digits, ._+@=,-; no leading dot)")
    return path


def parse_version(text: str) -> tuple[int, int, int]:
    m = _SEMVER.match(text)
    if not m:
        raise ValueError(f"{text!r} is not MAJOR.MINOR.PATCH")
    return int(m[1]), int(m[2]), int(m[3])


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the bundle's files/ directory
    kind: FileKind
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind.value, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    created: str
    min_sva_version: str
    files: tuple[FileEntry, ...]
    canary: str | None = None  # path of the canary file; None: the lab marker

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT, "name": self.name, "version": self.version, "created": self.created,
            "min_sva_version": self.min_sva_version, "canary": self.canary,
            "files": [f.to_json() for f in self.files],
        }  # fmt: skip
        return (json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode()

    def of_kind(self, kind: FileKind) -> tuple[FileEntry, ...]:
        return tuple(f for f in self.files if f.kind is kind)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def parse(cls, data: bytes, limits: BundleLimits, source: str) -> Manifest:
        """Validate every field; BundleError (bad-manifest or unsafe-path) naming it."""

        def bad(msg: str) -> BundleError:
            return BundleError(source, RejectReason.BAD_MANIFEST, f"manifest: {msg}")

        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise bad(f"not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise bad("not a JSON object")
        known = {"format", "name", "version", "created", "min_sva_version", "canary", "files"}
        extra = sorted(set(doc) - known)
        if extra:
            raise bad(f"unknown field(s) {', '.join(map(repr, extra[:5]))}")
        if doc.get("format") != FORMAT:
            raise bad(f"format {doc.get('format')!r} is not {FORMAT}")
        name = doc.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise bad(f"name {name!r}: 1-64 of letters, digits, '.', '_', '-'")
        version = doc.get("version")
        if type(version) is not int or not 1 <= version <= MAX_VERSION:
            raise bad(f"version {version!r}: an integer from 1 to 2^53")
        created = doc.get("created")
        if not isinstance(created, str) or not _rfc3339(created):
            raise bad(f"created {created!r}: an RFC 3339 UTC time (2026-11-27T05:00:00Z)")
        msv = doc.get("min_sva_version")
        try:
            parse_version(msv if isinstance(msv, str) else "")
        except ValueError:
            raise bad(f"min_sva_version {msv!r}: MAJOR.MINOR.PATCH") from None
        files_doc = doc.get("files")
        if not isinstance(files_doc, list) or len(files_doc) > limits.max_members:
            raise bad(f"files: a list of at most {limits.max_members} entries")
        files: list[FileEntry] = []
        seen: set[str] = set()
        for i, f in enumerate(files_doc):
            files.append(_entry(f, i, limits, source, bad))
            if files[-1].path in seen:
                raise bad(f"files[{i}]: {files[-1].path!r} listed twice")
            seen.add(files[-1].path)
        if sum(f.size for f in files) > limits.max_total_bytes:
            raise bad(f"files add up to more than {limits.max_total_bytes} bytes")
        canary = doc.get("canary")
        if canary is not None:
            if not isinstance(canary, str) or canary not in seen:
                raise bad(f"canary {canary!r} is not one of the bundle's files")
            if next(f for f in files if f.path == canary).kind is not FileKind.CANARY:
                raise bad(f"canary {canary!r} is not of kind {FileKind.CANARY.value}")
        if not any(f.kind is FileKind.MEMORY_YARA for f in files):
            raise bad("no memory-yara file: a bundle without memory rules would stop memory scanning")
        return cls(name, version, created, msv, tuple(files), canary)  # type: ignore[arg-type]


def _entry(f: object, i: int, limits: BundleLimits, source: str, bad: Any) -> FileEntry:
    if not isinstance(f, Mapping) or set(f) != {"path", "kind", "size", "sha256"}:
        raise bad(f"files[{i}]: an object with exactly path, kind, size, sha256")
    path, kind, size, digest = f["path"], f["kind"], f["size"], f["sha256"]
    if not isinstance(path, str):
        raise bad(f"files[{i}].path: not a string")
    check_path(path, limits, source)
    try:
        k = FileKind(kind)
    except ValueError:
        raise bad(f"files[{i}].kind {kind!r}: one of {', '.join(k.value for k in FileKind)}") from None
    if type(size) is not int or not 0 <= size <= limits.max_member_bytes:
        raise bad(f"files[{i}].size {size!r}: 0..{limits.max_member_bytes}")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise bad(f"files[{i}].sha256: 64 lower-case hex digits")
    return FileEntry(path, k, size, digest)


def _rfc3339(text: str) -> bool:
    if len(text) > 40 or not text.endswith("Z"):
        return False
    try:
        datetime.fromisoformat(text[:-1] + "+00:00")
    except ValueError:
        return False
    return True


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
