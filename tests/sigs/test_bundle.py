"""Reading bundles is reading hostile input: each way of breaking one is refused with its own reason."""

from __future__ import annotations

import base64
import gzip
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from sva.errors import BundleError, ConfigError
from sva.sigs.bundle import read_bundle, write_bundle
from sva.sigs.keys import PublicKey, SecretKey, load_secret, load_trusted
from sva.sigs.manifest import FileEntry, Manifest, now_rfc3339
from sva.sigs.model import BundleLimits, FileKind, RejectReason

from .conftest import NEW_RULE


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}  # type: ignore[union-attr]


def retar(items: list[tuple[tarfile.TarInfo, bytes | None]], compress: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tf:
        for info, body in items:
            if body is not None:
                info.size = len(body)
            tf.addfile(info, io.BytesIO(body) if body is not None else None)
    return gzip.compress(buf.getvalue()) if compress else buf.getvalue()


def regular(name: str, body: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), body


def rebuilt(path: Path, change: Callable[[dict[str, bytes]], None]) -> bytes:
    m = members(path)
    change(m)
    return retar([regular(n, b) for n, b in m.items()])


def reason(data: bytes, trusted: tuple[PublicKey, ...], limits: BundleLimits | None = None) -> tuple[str, str]:
    with pytest.raises(BundleError) as ei:
        read_bundle(data, trusted, limits, "b.tar.gz")
    return ei.value.kind, str(ei.value)


def test_a_packed_bundle_verifies_and_lists_its_files(make_bundle, publisher_keys) -> None:
    path = make_bundle(2, {"extra/new.yar": NEW_RULE, "ioc/c2.domains": "evil.example\n"})
    b = read_bundle(path.read_bytes(), (publisher_keys[1],))
    assert b.version == 2 and b.key_id == publisher_keys[1].id
    kinds = {f.path: f.kind for f in b.manifest.files}
    assert kinds["extra/new.yar"] is FileKind.MEMORY_YARA and kinds["test/lab_marker.yar"] is FileKind.MEMORY_YARA
    assert kinds["ioc/c2.domains"] is FileKind.IOC_DOMAIN and kinds["README.md"] is FileKind.DOC
    assert b.contents["extra/new.yar"] == NEW_RULE.encode()


def test_tampered_file_is_refused(make_bundle, publisher_keys) -> None:
    path = make_bundle(2, {"extra/new.yar": NEW_RULE})

    def change(m: dict[str, bytes]) -> None:
        m["files/extra/new.yar"] = m["files/extra/new.yar"].replace(b"7f3c", b"7f3d")

    kind, msg = reason(rebuilt(path, change), (publisher_keys[1],))
    assert kind == RejectReason.TAMPERED_FILE and "files/extra/new.yar: SHA-256 differs" in msg


def test_extra_or_missing_file_is_refused(make_bundle, publisher_keys) -> None:
    path = make_bundle(2)
    kind, msg = reason(rebuilt(path, lambda m: m.update({"files/memory/evil.yar": b"rule x { condition: true }"})),
                       (publisher_keys[1],))
    assert kind == RejectReason.TAMPERED_FILE and "not in the signed manifest" in msg
    kind, msg = reason(rebuilt(path, lambda m: m.pop("files/test/lab_marker.yar")), (publisher_keys[1],))
    assert kind == RejectReason.TAMPERED_FILE and "missing from the archive" in msg


def test_tampered_manifest_is_refused(make_bundle, publisher_keys) -> None:
    path = make_bundle(2)

    def change(m: dict[str, bytes]) -> None:
        m["manifest.json"] = m["manifest.json"].replace(b'"version": 2', b'"version": 99')

    kind, msg = reason(rebuilt(path, change), (publisher_keys[1],))
    assert kind == RejectReason.BAD_SIGNATURE and "manifest was altered" in msg


def test_signature_by_an_untrusted_key_is_refused(make_bundle, publisher_keys, other_keys) -> None:
    path = make_bundle(2, key=other_keys[0])
    kind, msg = reason(path.read_bytes(), (publisher_keys[1],))
    assert kind == RejectReason.UNTRUSTED_KEY and other_keys[1].id in msg and "not a trusted key" in msg


def test_unsigned_bundle_is_refused(make_bundle, publisher_keys) -> None:
    path = make_bundle(2)
    kind, msg = reason(rebuilt(path, lambda m: m.pop("manifest.sig")), (publisher_keys[1],))
    assert kind == RejectReason.UNSIGNED and "not signed" in msg


def test_key_rotation_and_key_ids_are_only_hints(make_bundle, publisher_keys, other_keys) -> None:
    both = (publisher_keys[1], other_keys[1])
    assert read_bundle(make_bundle(3, key=other_keys[0]).read_bytes(), both).key_id == other_keys[1].id
    path = make_bundle(4)

    def forge_id(m: dict[str, bytes]) -> None:
        sig = json.loads(m["manifest.sig"])
        sig["signatures"][0]["key_id"] = "0000000000000000"
        m["manifest.sig"] = json.dumps(sig).encode()

    assert read_bundle(rebuilt(path, forge_id), both).key_id == publisher_keys[1].id


@pytest.mark.parametrize(("name", "what"), [
    ("files/../../../etc/cron.d/x", "leaves the bundle"),
    ("/etc/passwd", "is absolute"),
    ("files/./x.yar", "only plain names"),
    ("files/.hidden.yar", "only plain names"),
])  # fmt: skip
def test_path_traversal_in_archive_members_is_refused(make_bundle, publisher_keys, name, what) -> None:
    path = make_bundle(2)
    kind, msg = reason(rebuilt(path, lambda m: m.update({name: b"x"})), (publisher_keys[1],))
    assert kind == RejectReason.UNSAFE_PATH and what in msg


def test_links_devices_directories_and_duplicates_are_refused(make_bundle, publisher_keys) -> None:
    path = make_bundle(2)
    base = [regular(n, b) for n, b in members(path).items()]
    link = tarfile.TarInfo("files/memory/link.yar")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    hard = tarfile.TarInfo("files/memory/hard.yar")
    hard.type, hard.linkname = tarfile.LNKTYPE, "manifest.json"
    dev = tarfile.TarInfo("files/memory/dev")
    dev.type = tarfile.CHRTYPE
    folder = tarfile.TarInfo("files/memory")
    folder.type = tarfile.DIRTYPE
    for info, what in ((link, "symbolic link"), (hard, "hard link"), (dev, "device"), (folder, "directory")):
        kind, msg = reason(retar([*base, (info, None)]), (publisher_keys[1],))
        assert kind == RejectReason.BAD_ARCHIVE and what in msg, msg
    kind, msg = reason(retar([*base, base[-1]]), (publisher_keys[1],))
    assert kind == RejectReason.BAD_ARCHIVE and "appears twice" in msg


def test_size_and_count_limits_hold_before_anything_is_read(make_bundle, publisher_keys) -> None:
    path = make_bundle(2)
    bomb = retar([*[regular(n, b) for n, b in members(path).items()], regular("files/zeros.bin", bytes(8 << 20))])
    assert len(bomb) < 64 << 10  # tiny on the wire, 8 MiB unpacked
    kind, msg = reason(bomb, (publisher_keys[1],), BundleLimits(max_total_bytes=4 << 20))
    assert kind == RejectReason.BAD_ARCHIVE and "more than 4194304 bytes" in msg
    kind, msg = reason(path.read_bytes(), (publisher_keys[1],), BundleLimits(max_members=2))
    assert kind == RejectReason.BAD_ARCHIVE and "more than 2 members" in msg
    many = retar([regular(f"files/f{i}.yar", b"") for i in range(50)], compress=False)
    kind, _ = reason(many, (publisher_keys[1],), BundleLimits(max_members=10))
    assert kind == RejectReason.BAD_ARCHIVE


@pytest.mark.parametrize("data", [b"", b"not a tar at all" * 100, gzip.compress(b"x" * 1000), b"\x1f\x8b\x08garbage"])
def test_garbage_is_a_bad_archive_not_a_crash(publisher_keys, data) -> None:
    kind, _ = reason(data, (publisher_keys[1],))
    assert kind == RejectReason.BAD_ARCHIVE


def test_truncated_bundle_file_is_refused(make_bundle, publisher_keys) -> None:
    data = make_bundle(2).read_bytes()
    kind, msg = reason(data[: len(data) // 2], (publisher_keys[1],))
    assert kind == RejectReason.BAD_ARCHIVE and "truncated" in msg


def test_a_signed_manifest_with_a_traversal_path_is_still_refused(publisher_keys) -> None:
    bad = Manifest("x", 5, now_rfc3339(), "0.1.0", (FileEntry("../evil.yar", FileKind.MEMORY_YARA, 1, "0" * 64),))
    data = write_bundle(bad, {"../evil.yar": b"x"}, publisher_keys[0])
    kind, msg = reason(data, (publisher_keys[1],))
    assert kind == RejectReason.UNSAFE_PATH and "leaves the bundle" in msg


def test_signature_block_is_checked(make_bundle, publisher_keys) -> None:
    path = make_bundle(2)

    def short_sig(m: dict[str, bytes]) -> None:
        sig = json.loads(m["manifest.sig"])
        sig["signatures"][0]["signature"] = base64.b64encode(b"x" * 10).decode()
        m["manifest.sig"] = json.dumps(sig).encode()

    kind, msg = reason(rebuilt(path, short_sig), (publisher_keys[1],))
    assert kind == RejectReason.UNSIGNED and "64" in msg


def test_secret_key_files_are_private_and_public_keys_load(tmp_path: Path, publisher_keys) -> None:
    from sva.sigs.keys import generate

    secret, public = generate(tmp_path, "k")
    assert secret.stat().st_mode & 0o777 == 0o600
    assert load_trusted([tmp_path])[0].id == load_trusted([public])[0].id
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_secret(secret)
    with pytest.raises(ConfigError, match="exists"):
        generate(tmp_path, "k")
    (tmp_path / "bad.pub").write_text("ssh-ed25519 AAAA\n")
    with pytest.raises(ConfigError, match="bad.pub: not a sva-sigs-ed25519 key file"):
        load_trusted([tmp_path])


def test_the_same_key_signs_only_bundle_manifests(publisher_keys) -> None:
    secret: SecretKey = publisher_keys[0]
    # a raw Ed25519 signature over the manifest bytes (without sva's context) is refused
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    raw = Ed25519PrivateKey.from_private_bytes(secret.seed).sign(b"manifest")
    assert not secret.public.verify(raw, b"manifest") and secret.public.verify(secret.sign(b"manifest"), b"manifest")
