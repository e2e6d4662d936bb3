"""Getting bundles from a feed: HTTPS (certificates verified, conditional requests, size and
time limits) or a local directory, both with the same static layout:

    FEED/index.json        {"format": 1, "name": "acme-linux",
                            "latest": {"file": "acme-linux-42.tar.gz", "version": 42,
                                       "size": 123456, "sha256": "…"}}
    FEED/acme-linux-42.tar.gz

The index is a pointer, not an authority: it is not signed, the bundle is. What the index
says is used to skip downloads (a version not above the active one), to bound the
download (its size) and to tell a truncated or swapped download from a bad bundle (its
size and sha256) — a forged index can only make the appliance fetch another bundle that
must still verify, or fetch nothing, which anyone on the path can cause anyway.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from sva import __version__
from sva.errors import BundleError
from sva.sigs.model import RejectReason

INDEX = "index.json"
_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,200}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 64 << 10


@dataclass(frozen=True)
class FeedEntry:
    """What a feed's index says about its latest bundle."""

    name: str
    file: str
    version: int
    size: int
    sha256: str


@dataclass(frozen=True)
class IndexResult:
    """A fetched index (None when not modified) with the validators to send next time."""

    entry: FeedEntry | None
    etag: str | None
    last_modified: str | None


def parse_index(data: bytes, source: str, max_size: int) -> FeedEntry:
    def bad(msg: str) -> BundleError:
        return BundleError(source, RejectReason.FETCH_FAILED, f"feed index: {msg}")

    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("not JSON") from None
    latest = doc.get("latest") if isinstance(doc, dict) else None
    if not isinstance(latest, dict):
        raise bad("no 'latest' object")
    name, file, version, size, digest = (doc.get("name"), latest.get("file"), latest.get("version"),
                                         latest.get("size"), latest.get("sha256"))
    if not isinstance(file, str) or not _FILE.match(file):
        raise bad(f"latest.file {file!r}: a plain file name beside the index")
    if type(version) is not int or version < 1:
        raise bad(f"latest.version {version!r}: a positive integer")
    if type(size) is not int or not size > 0:
        raise bad(f"latest.size {size!r}: a positive integer")
    if size > max_size:
        raise BundleError(source, RejectReason.TOO_LARGE, f"feed index: the bundle is {size} bytes, over the download limit of {max_size}")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise bad("latest.sha256: 64 lower-case hex digits")
    return FeedEntry(str(name or ""), file, version, size, digest)


def write_index(feed_dir: Path, name: str, bundle: Path, version: int) -> Path:
    """Write FEED/index.json naming `bundle` (which must be in `feed_dir`) as the latest."""
    body = bundle.read_bytes()
    doc = {"format": 1, "name": name, "latest": {"file": bundle.name, "version": version, "size": len(body),
                                                  "sha256": hashlib.sha256(body).hexdigest()}}
    tmp = feed_dir / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, feed_dir / INDEX)
    return feed_dir / INDEX


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to https:// (a redirect must not switch off TLS)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if urlsplit(newurl).scheme != "https":
            raise BundleError(req.full_url, RejectReason.FETCH_FAILED, f"redirect to {newurl!r} is not https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class HttpsFeed:
    """One HTTPS feed: certificate verification always on; `ca_file` replaces the system CAs."""

    def __init__(self, url: str, *, ca_file: Path | None = None, timeout_s: float = 30.0,
                 max_download: int = 256 << 20, max_index: int = 64 << 10) -> None:
        self.index_url = url if url.endswith(".json") else url.rstrip("/") + "/" + INDEX
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _NoDowngrade())
        self.timeout_s = timeout_s
        self.max_download = max_download
        self.max_index = max_index

    def index(self, etag: str | None = None, last_modified: str | None = None) -> IndexResult:
        headers = {"User-Agent": f"sva/{__version__} sigs", "Accept": "application/json"}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        status, resp_headers, body = self._get(self.index_url, headers, self.max_index)
        if status == 304:
            return IndexResult(None, etag, last_modified)
        entry = parse_index(body, self.index_url, self.max_download)
        return IndexResult(entry, resp_headers.get("ETag"), resp_headers.get("Last-Modified"))

    def bundle(self, entry: FeedEntry) -> tuple[str, bytes]:
        url = urljoin(self.index_url, entry.file)
        _status, _h, body = self._get(url, {"User-Agent": f"sva/{__version__} sigs"}, entry.size, exact=entry.size)
        return url, body

    def _get(self, url: str, headers: dict[str, str], limit: int, exact: int | None = None) -> tuple[int, Any, bytes]:
        req = urllib.request.Request(url, headers=headers)
        deadline = time.monotonic() + 10 * self.timeout_s
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > limit:
                    raise BundleError(url, RejectReason.TOO_LARGE, f"{length} bytes, over the limit of {limit}")
                buf = bytearray()
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > limit:
                        raise BundleError(url, RejectReason.TOO_LARGE, f"more than {limit} bytes")
                    if time.monotonic() > deadline:
                        raise BundleError(url, RejectReason.FETCH_FAILED, f"download took longer than {10 * self.timeout_s:g} s")
                if length is not None and length.isdigit() and len(buf) < int(length):
                    raise BundleError(url, RejectReason.TRUNCATED,
                                      f"download ended after {len(buf)} of {length} bytes (connection closed early)")
                return resp.status, resp.headers, _check_exact(url, bytes(buf), exact)
        except BundleError:
            raise
        except urllib.error.HTTPError as e:
            if e.code == 304:
                return 304, e.headers, b""
            raise BundleError(url, RejectReason.FETCH_FAILED, f"HTTP {e.code} {e.reason}") from None
        except http.client.IncompleteRead as e:
            got = len(e.partial)
            raise BundleError(url, RejectReason.TRUNCATED,
                              f"download ended after {got} bytes{'' if exact is None else f' of {exact}'} (connection closed early)") from None
        except urllib.error.URLError as e:
            why = e.reason
            text = why.verify_message if isinstance(why, ssl.SSLCertVerificationError) else str(why)
            if isinstance(why, ssl.SSLCertVerificationError):
                text = f"TLS certificate not trusted: {text}"
            elif isinstance(why, ConnectionRefusedError):
                text = "connection refused (server down?)"
            raise BundleError(url, RejectReason.FETCH_FAILED, text) from None
        except TimeoutError:
            raise BundleError(url, RejectReason.FETCH_FAILED, f"no answer within {self.timeout_s:g} s") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise BundleError(url, RejectReason.FETCH_FAILED, f"{type(e).__name__}: {e}") from None


class LocalFeed:
    """A feed in a local directory (a mounted share, a USB stick on an air-gapped site)."""

    def __init__(self, directory: str | Path, *, max_download: int = 256 << 20, max_index: int = 64 << 10) -> None:
        self.dir = Path(directory)
        self.index_url = str(self.dir / INDEX)
        self.max_download = max_download
        self.max_index = max_index

    def index(self, etag: str | None = None, last_modified: str | None = None) -> IndexResult:
        path = self.dir / INDEX
        try:
            st = path.stat()
        except OSError as e:
            raise BundleError(str(path), RejectReason.FETCH_FAILED, f"cannot read the feed index: {e.strerror or e}") from None
        tag = f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'  # what a web server's ETag would be
        if etag == tag:
            return IndexResult(None, etag, last_modified)
        data = _read_limited(path, self.max_index)
        return IndexResult(parse_index(data, str(path), self.max_download), tag, formatdate(st.st_mtime, usegmt=True))

    def bundle(self, entry: FeedEntry) -> tuple[str, bytes]:
        path = self.dir / entry.file
        return str(path), _check_exact(str(path), _read_limited(path, entry.size), entry.size)


def _read_limited(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise BundleError(str(path), RejectReason.FETCH_FAILED, f"cannot read: {e.strerror or e}") from None
    if len(data) > limit:
        raise BundleError(str(path), RejectReason.TOO_LARGE, f"more than {limit} bytes")
    return data


def _check_exact(source: str, data: bytes, exact: int | None) -> bytes:
    if exact is not None and len(data) < exact:
        raise BundleError(source, RejectReason.TRUNCATED, f"got {len(data)} of the {exact} bytes the feed index announces")
    return data


def check_download(entry: FeedEntry, data: bytes, source: str) -> None:
    """The download is the file the index named (else it was swapped or damaged in transit)."""
    if len(data) != entry.size:
        kind = RejectReason.TRUNCATED if len(data) < entry.size else RejectReason.DOWNLOAD_MISMATCH
        raise BundleError(source, kind, f"got {len(data)} bytes, the feed index says {entry.size}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise BundleError(source, RejectReason.DOWNLOAD_MISMATCH, "SHA-256 differs from the feed index (damaged or swapped in transit)")


def open_feed(source: str, *, ca_file: Path | None, timeout_s: float, max_download: int,
              max_index: int) -> HttpsFeed | LocalFeed:
    if "://" in source:
        return HttpsFeed(source, ca_file=ca_file, timeout_s=timeout_s, max_download=max_download, max_index=max_index)
    return LocalFeed(source, max_download=max_download, max_index=max_index)
