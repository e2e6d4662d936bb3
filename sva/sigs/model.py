"""Closed sets and limits shared by the bundle reader, the pipeline and the CLI."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sva.errors import ConfigError

MiB = 1 << 20


class FileKind(enum.StrEnum):
    """What a file in a bundle is; decides how the pipeline checks and uses it."""

    MEMORY_YARA = "memory-yara"  # YARA rules for guest RAM (the engine's yara_matches fact)
    NETWORK_YARA = "network-yara"  # YARA rules for mirrored traffic payloads
    IOC_IP = "ioc-ip"  # `*.ips`: one IP address or prefix per line
    IOC_DOMAIN = "ioc-domain"  # `*.domains`: one domain name per line
    IOC_HASH = "ioc-hash"  # `*.hashes`: one MD5/SHA-1/SHA-256 hex digest per line
    CANARY = "canary"  # bytes some memory rule must match (the known-bad sample)
    DOC = "doc"  # licence and read-me texts that must travel with the rules (DRL 1.1)


class RejectReason(enum.StrEnum):
    """Why a bundle or an update was refused; the `kind` of a BundleError and of a
    `sva.sigs.rejected` event. One value per distinct failure so operators (and tests)
    can tell them apart without parsing text."""

    BAD_ARCHIVE = "bad-archive"  # not a tar, limits exceeded, links, devices, duplicates
    UNSAFE_PATH = "unsafe-path"  # absolute path, `..`, odd characters in a member name
    UNSIGNED = "unsigned"  # no manifest.sig
    UNTRUSTED_KEY = "untrusted-key"  # signed, but by no trusted key
    BAD_SIGNATURE = "bad-signature"  # a trusted key's signature does not verify: manifest altered
    BAD_MANIFEST = "bad-manifest"  # signed, but not a valid manifest
    TAMPERED_FILE = "tampered-file"  # a file's size or sha256 differs from the manifest
    NOT_NEWER = "not-newer"  # version not above the highest ever activated (rollback/replay)
    SVA_TOO_OLD = "sva-too-old"  # min_sva_version above this sva
    YARA_ERROR = "yara-error"  # a rule file does not compile
    IOC_INVALID = "ioc-invalid"  # a bad line in an IOC list
    SLOW_RULE = "slow-rule"  # a rule over the per-rule time budget on sample memory
    CANARY_FAILED = "canary-failed"  # matches clean memory, or misses the known-bad sample
    FETCH_FAILED = "fetch-failed"  # server down, TLS failure, HTTP error, bad feed index
    TRUNCATED = "truncated"  # the download ended early
    TOO_LARGE = "too-large"  # larger than the download limit
    DOWNLOAD_MISMATCH = "download-mismatch"  # the download's size/sha256 differ from the index
    STORE_FAILED = "store-failed"  # the state directory could not be written


# Rejections caused by the transport rather than by the bundle: worth retrying (with backoff),
# and the feed's ETag is not remembered so the next poll downloads again.
TRANSIENT = frozenset({
    RejectReason.FETCH_FAILED, RejectReason.TRUNCATED, RejectReason.DOWNLOAD_MISMATCH,
    RejectReason.STORE_FAILED,
})  # fmt: skip


@dataclass(frozen=True)
class BundleLimits:
    """Bounds on what a bundle may hold; a bundle over any of them is refused unread."""

    max_members: int = 20_000
    max_member_bytes: int = 64 * MiB
    max_total_bytes: int = 256 * MiB  # unpacked (after gzip), all members and tar headers
    max_manifest_bytes: int = 8 * MiB
    max_path_length: int = 255

    def __post_init__(self) -> None:
        for name in ("max_members", "max_member_bytes", "max_total_bytes", "max_manifest_bytes", "max_path_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"signatures.limits.{name}: must be at least 1, got {getattr(self, name)!r}")
