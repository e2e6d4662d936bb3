"""Publisher side: turn a directory of rules and IOC lists into a signed bundle.

The directory's layout decides each file's kind (`sva.sigs.content.classify`); an optional
`manifest.toml` beside the rules gives defaults (`name`, `min_sva_version`). Everything the
appliance will check is checked here first — every rule compiles, IOC lists parse, no rule
is too slow, the canary matches and clean memory does not — so a publisher never signs a
bundle every appliance would refuse.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sva import __version__
from sva.errors import BundleError, ConfigError
from sva.scan.cost import SlowRulePolicy
from sva.scan.sample import synthetic_memory
from sva.sigs.bundle import VerifiedBundle, read_bundle, write_bundle
from sva.sigs.content import ContentReport, check_content, classify
from sva.sigs.keys import SecretKey
from sva.sigs.manifest import FileEntry, Manifest, check_path, now_rfc3339
from sva.sigs.model import BundleLimits, FileKind

SOURCE_MANIFEST = "manifest.toml"


@dataclass(frozen=True)
class PackResult:
    path: Path
    manifest: Manifest
    report: ContentReport
    skipped: tuple[str, ...]  # files in the directory that are not part of the bundle


def collect(src: Path, limits: BundleLimits) -> tuple[dict[str, tuple[FileKind, bytes]], list[str]]:
    """The bundle's files from a source directory: path -> (kind, bytes), and what was skipped."""
    if not src.is_dir():
        raise ConfigError(f"{src}: not a directory")
    files: dict[str, tuple[FileKind, bytes]] = {}
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(src).as_posix()
            if name.startswith(".") or rel == SOURCE_MANIFEST:
                continue
            kind = classify(rel)
            if kind is None:
                skipped.append(rel)
                continue
            if full.is_symlink() or not full.is_file():
                raise ConfigError(f"{full}: a bundle holds regular files only (no links)")
            try:
                check_path(rel, limits, str(src))
            except BundleError as e:
                raise ConfigError(f"{full}: {e.reason}") from None
            if len(files) >= limits.max_members - 2:
                raise ConfigError(f"{src}: more than {limits.max_members - 2} files")
            files[rel] = (kind, full.read_bytes())
    return files, skipped


def source_defaults(src: Path) -> dict[str, object]:
    path = src / SOURCE_MANIFEST
    if not path.exists():
        return {}
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    known = {"name", "min_sva_version", "version", "description"}
    for k in doc:
        if k not in known:
            raise ConfigError(f"{path}: {k}: unknown key (known: {', '.join(sorted(known))})")
    return doc


def pack(src: Path, key: SecretKey, out: Path, *, name: str | None = None, version: int | None = None,
         min_sva_version: str | None = None, limits: BundleLimits | None = None,
         policy: SlowRulePolicy | None = None, sample: bytes | None = None, check: bool = True) -> PackResult:
    """Validate `src` and write the signed bundle to `out`. `check=False` skips the content
    checks (only for building deliberately bad bundles in tests)."""
    limits = limits or BundleLimits()
    defaults = source_defaults(src)
    name = name or str(defaults.get("name") or "")
    version = version if version is not None else defaults.get("version")  # type: ignore[assignment]
    if not name:
        raise ConfigError(f"{src}: no bundle name (--name, or name in {SOURCE_MANIFEST})")
    if not isinstance(version, int):
        raise ConfigError(f"{src}: no bundle version (--version N)")
    files, skipped = collect(src, limits)
    canary = next((p for p, (k, _) in files.items() if k is FileKind.CANARY), None)
    entries = tuple(FileEntry(p, k, len(b), hashlib.sha256(b).hexdigest()) for p, (k, b) in sorted(files.items()))
    manifest = Manifest(name, version, now_rfc3339(),
                        min_sva_version or str(defaults.get("min_sva_version") or __version__), entries, canary)
    # parse what we would sign, so the publisher gets the appliance's own error messages
    manifest = Manifest.parse(manifest.to_bytes(), limits, str(src))
    contents = {p: b for p, (_k, b) in files.items()}
    report = None
    if check:  # before signing: nothing the appliances would refuse gets a signature
        report = validate_files(manifest, contents, policy or SlowRulePolicy(), sample, str(src))
    data = write_bundle(manifest, contents, key)
    read_bundle(data, (key.public,), limits, str(src))  # the bundle reads back as an appliance reads it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return PackResult(out, manifest, report, tuple(skipped))  # type: ignore[arg-type]


def validate(bundle: VerifiedBundle, policy: SlowRulePolicy, sample: bytes | None, source: str) -> ContentReport:
    """The appliance's content checks on a verified bundle (`sva sigs verify --check`)."""
    return validate_files(bundle.manifest, bundle.contents, policy, sample, source)


def validate_files(manifest: Manifest, contents: Mapping[str, bytes], policy: SlowRulePolicy,
                   sample: bytes | None, source: str) -> ContentReport:
    """The appliance's content checks on a bundle's files, laid out in a throw-away directory."""
    with tempfile.TemporaryDirectory(prefix="sva-sigs-check-") as tmp:
        root = Path(tmp) / "files"
        for path, body in contents.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(body)
        return check_content(root, manifest, policy=policy,
                             sample=sample if sample is not None else synthetic_memory(policy.sample_size),
                             source=source)
