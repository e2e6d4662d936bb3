"""Where a guest's volatility3 symbol table comes from, and the cache that makes it instant.

Sources, in order of preference (`symbols_for_backend`):

1. an ISF in a configured directory (`isf_dirs`) whose `linux_banner` constant data is a
   banner found in guest RAM: a table someone made with care (dwarf2json) wins;
2. the cache: tables sva built before, keyed by banner and BTF sha256, and used only if
   guest RAM holds that BTF at its place relative to the banner (a match by banner alone
   could be a planted string or a rebuilt kernel with the same version);
3. a kernel image (`kernel`: a bzImage or vmlinux) and/or a real `system_map`, when given:
   BTF and kallsyms (or System.map) from the files; the image must be the guest's (its
   banner must be in guest RAM). A System.map alone takes the BTF from RAM, placed at
   `__start_BTF - linux_banner` from a banner, and the KASLR slide (to validate
   run-time pointers in sized arrays) from init_mm.pgd, which holds init_top_pgt;
4. the guest's own RAM: kallsyms, banner and BTF found there (`sva.symbols.guest`); no
   configuration at all.

Whatever is built goes to the cache as `<release>-<banner sha>-<BTF sha>.json.xz`
(volatility3 reads .json.xz) with a `.meta.json` beside it that the lookup reads, in
`${SVA_CACHE_DIR:-/var/cache/sva}/symbols/` (~/.cache/sva for non-root users). xz runs
at preset 0: ~0.3 s for a kernel table instead of seconds, for a file ~30% larger.

`-o FILE` / `write_isf` write a table as .json, .json.xz or .json.gz by suffix, through a
temporary file renamed into place.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from sva.errors import SymbolsError
from sva.symbols.btf import MAX_BTF_SIZE, Btf, BtfKind, BtfStruct, parse_btf
from sva.symbols.guest import (
    START_KERNEL_MAP,
    BannerHit,
    GuestReader,
    banner_at,
    kallsyms_array_symbols,
    locate_kernel,
    read_physical,
    scan_banners,
)
from sva.symbols.isf import FORMAT_VERSION, PRODUCER_VERSION, IsfReport, build_isf
from sva.symbols.kallsyms import KERNEL_HALF, Kallsyms, KernelSymbol, kallsyms_from_image
from sva.symbols.kimage import KernelImage, load_kernel_image
from sva.vmi.base import Backend

ISF_SUFFIXES = (".json", ".json.xz", ".json.gz", ".json.bz2")
MAX_ISF_FILES = 2000  # files looked at per configured directory tree
MAX_CACHE_ENTRIES = 1000
MAX_ISF_DECOMPRESSED = 2 << 30  # bytes read from one ISF while looking for its banner
MAX_SYSTEM_MAP = 64 << 20
MIN_SYSTEM_MAP_SYMBOLS = 256  # Debian's System.map is an 83-byte stub pointing at -dbg
XZ_PRESET = 0
_BANNER_KEY = b'"linux_banner"'
_CONSTANT_DATA = re.compile(rb'"constant_data"\s*:\s*"([A-Za-z0-9+/=]{1,1024})"')
_SYSTEM_MAP_LINE = re.compile(r"^([0-9a-fA-F]{1,16}) ([A-Za-z]) (\S{1,512})$")

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


class SymbolSource(StrEnum):
    ISF_DIR = "isf-dir"
    CACHE = "cache"
    KERNEL_IMAGE = "kernel-image"
    SYSTEM_MAP = "system-map"
    GUEST_RAM = "guest-ram"


@dataclass(frozen=True)
class SymbolTable:
    """A symbol table ready for volatility3, and where it came from."""

    path: Path
    source: SymbolSource
    banner: str
    btf_sha256: str | None
    seconds: float
    detail: str
    kaslr_slide: int | None = None  # this boot's, when the table was built from its RAM
    phys_base: int | None = None
    cached: bool = False  # written to (or read from) the cache

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "source": str(self.source),
            "banner": self.banner,
            "btf_sha256": self.btf_sha256,
            "seconds": round(self.seconds, 3),
            "detail": self.detail,
            "kaslr_slide": self.kaslr_slide,
            "phys_base": self.phys_base,
            "cached": self.cached,
        }


@dataclass
class BuiltIsf:
    """A freshly built table and what the cache needs to find it again."""

    isf: dict[str, Any]
    banner: bytes  # "\n\0" included
    btf: Btf
    source: SymbolSource
    detail: str
    banner_to_btf: int | None  # __start_BTF - linux_banner: where the BTF sits from the banner
    report: IsfReport = field(default_factory=IsfReport)
    banner_gpa: int | None = None  # where the banner is in guest RAM, if built from it
    kaslr_slide: int | None = None
    phys_base: int | None = None

    @property
    def banner_text(self) -> str:
        return _banner_text(self.banner)


def _banner_text(banner: bytes) -> str:
    return banner.rstrip(b"\0").rstrip(b"\n").decode("utf-8", "backslashreplace")


def _release(banner: bytes) -> str:
    parts = banner.split(b" ", 3)
    raw = parts[2] if len(parts) > 2 else b"unknown"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", raw.decode("ascii", "replace"))[:64]


def _symbols_source(kind: str, what: str, symbols: Iterable[KernelSymbol], slide: int) -> dict[str, str]:
    """metadata.linux.symbols entry; the hash covers names and link-time addresses, so it
    is the same whether the list came from RAM or from the image."""
    h = hashlib.sha256()
    for s in symbols:
        h.update(f"{s.name} {s.address if s.absolute else s.address - slide:x}\n".encode())
    return {"kind": kind, "name": what, "hash_type": "sha256", "hash_value": h.hexdigest()}


# -- building ----------------------------------------------------------------------------------


def build_from_memory(backend: Backend, progress: Progress | None = None) -> BuiltIsf:
    """Build a table from the guest's RAM alone."""
    say = progress or _quiet
    kernel = locate_kernel(backend, progress=say)
    say(f"banner at GPA 0x{kernel.banner_gpa:x}, BTF at GPA 0x{kernel.btf_gpa:x} "
        f"({kernel.btf.type_count} types); phys_base 0x{kernel.phys_base:x}")  # fmt: skip
    say("writing the symbol table")
    report = IsfReport()
    ks = kernel.kallsyms
    slide = kernel.link_slide
    isf = build_isf(
        kernel.btf,
        ks.symbols,
        kernel.banner,
        slide=slide,
        reader=GuestReader(backend, kernel),
        extra_symbols=kallsyms_array_symbols(ks, kernel.virtual),
        sources=[_symbols_source("symtab", f"kallsyms of {kernel.banner_text}", ks.symbols, slide)],
        report=report,
    )
    btf_start = ks.lookup("__start_BTF")
    banner_to_btf = kernel.btf_gpa - kernel.banner_gpa if btf_start is not None else None
    return BuiltIsf(
        isf=isf,
        banner=kernel.banner,
        btf=kernel.btf,
        source=SymbolSource.GUEST_RAM,
        detail=f"{backend.target} RAM: " + "; ".join(kernel.checks),
        banner_to_btf=banner_to_btf,
        report=report,
        kaslr_slide=kernel.kaslr_slide,
        phys_base=kernel.phys_base,
        banner_gpa=kernel.banner_gpa,
    )


class ImageReader:
    """`KernelReader` over a vmlinux's allocated sections (link-time addresses)."""

    def __init__(self, image: KernelImage) -> None:
        self._image = image
        self._sections = sorted(
            (s for s in image.sections if s.addr >= KERNEL_HALF and s.size), key=lambda s: s.addr
        )

    def read(self, address: int, size: int) -> bytes | None:
        for sec in self._sections:
            if sec.addr <= address and address + size <= sec.addr + sec.size:
                if not sec.has_data:
                    return None  # .bss: zero in the file, unknown at run time
                at = sec.offset + address - sec.addr
                return self._image.vmlinux[at : at + size]
        return None

    def read_upto(self, address: int, size: int) -> bytes | None:
        """Up to `size` bytes, fewer where the section ends."""
        for sec in self._sections:
            if sec.addr <= address < sec.addr + sec.size and sec.has_data:
                at = sec.offset + address - sec.addr
                return self._image.vmlinux[at : at + min(size, sec.addr + sec.size - address)]
        return None

    def virtual(self, file_offset: int | None) -> int | None:
        if file_offset is None:
            return None
        for sec in self._sections:
            if sec.has_data and sec.offset <= file_offset < sec.offset + sec.size:
                return sec.addr + file_offset - sec.offset
        return None


def parse_system_map(path: str | os.PathLike[str]) -> list[KernelSymbol]:
    """A System.map's symbols; SymbolsError for Debian's stub or anything malformed."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_SYSTEM_MAP + 1)
    except OSError as e:
        raise SymbolsError(name, f"cannot read System.map: {e.strerror or e}") from e
    if len(data) > MAX_SYSTEM_MAP:
        raise SymbolsError(name, f"larger than {MAX_SYSTEM_MAP >> 20} MiB: not a System.map")
    lines = data.count(b"\n")
    if lines < MIN_SYSTEM_MAP_SYMBOLS:
        raise SymbolsError(
            name,
            f"{lines} lines: not a real System.map (Debian ships a stub; the real one is in "
            "the -dbg package)",
        )
    symbols: list[KernelSymbol] = []
    for lineno, line in enumerate(data.decode("ascii", "replace").splitlines(), 1):
        m = _SYSTEM_MAP_LINE.match(line.strip())
        if m is None:
            raise SymbolsError(name, f"line {lineno}: not 'ADDRESS TYPE NAME': {line[:80]!r}")
        address = int(m.group(1), 16)
        kind = m.group(2)
        symbols.append(KernelSymbol(m.group(3), address, kind, kind in "aA" or address < KERNEL_HALF))
    return symbols


def build_from_image(
    kernel: str | os.PathLike[str] | KernelImage,
    system_map: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> BuiltIsf:
    """Build a table from a kernel image (bzImage or vmlinux), optionally with System.map."""
    say = progress or _quiet
    if isinstance(kernel, KernelImage):
        image = kernel
    else:
        say(f"unpacking {kernel}")
        image = load_kernel_image(kernel)
    if image.btf is None:
        raise SymbolsError(image.path, "no .BTF section: the kernel was built without CONFIG_DEBUG_INFO_BTF")
    btf = parse_btf(image.btf, f"{image.path}:.BTF")
    reader = ImageReader(image)
    ks: Kallsyms | None = None
    if system_map is not None:
        symbols: Sequence[KernelSymbol] = parse_system_map(system_map)
        source, what = SymbolSource.SYSTEM_MAP, f"{os.path.basename(system_map)} of "
        kind = "system-map"
    else:
        say("reading kallsyms from the image")
        ks = kallsyms_from_image(image.vmlinux, image.path)
        symbols, source, what, kind = ks.symbols, SymbolSource.KERNEL_IMAGE, "kallsyms of ", "symtab"
    by_name = {s.name: s for s in reversed(symbols)}
    banner_sym = by_name.get("linux_banner")
    if banner_sym is None:
        raise SymbolsError(image.path, "no linux_banner symbol")
    banner = banner_at(reader.read_upto, banner_sym.address)
    if banner is None:
        raise SymbolsError(image.path, f"no banner at linux_banner (0x{banner_sym.address:x})")
    start_btf = by_name.get("__start_BTF")
    btf_sec = image.section(".BTF")
    if start_btf is not None and btf_sec is not None and start_btf.address != btf_sec.addr:
        raise SymbolsError(image.path, "__start_BTF is not the .BTF section: symbols of another kernel?")
    extra = kallsyms_array_symbols(ks, reader.virtual) if ks is not None else []
    report = IsfReport()
    isf = build_isf(
        btf, symbols, banner, reader=reader, extra_symbols=extra, report=report,
        sources=[_symbols_source(kind, what + _banner_text(banner), symbols, 0)],
    )  # fmt: skip
    return BuiltIsf(
        isf=isf,
        banner=banner,
        btf=btf,
        source=source,
        detail=f"{image.path}" + (f" + {system_map}" if system_map is not None else ""),
        banner_to_btf=(start_btf.address - banner_sym.address) if start_btf is not None else None,
        report=report,
    )


# -- writing -----------------------------------------------------------------------------------


def _open_compressed(path: Path, mode: str) -> IO[bytes]:
    name = path.name
    if name.endswith(".xz"):
        return lzma.open(path, mode, preset=XZ_PRESET) if "w" in mode else lzma.open(path, mode)  # type: ignore[return-value]
    if name.endswith(".gz"):
        return gzip.open(path, mode, compresslevel=1) if "w" in mode else gzip.open(path, mode)  # type: ignore[return-value]
    if name.endswith(".bz2"):
        return bz2.open(path, mode)  # type: ignore[return-value]
    return open(path, mode)  # noqa: SIM115


def write_isf(isf: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a table as JSON (.json, .json.xz, .json.gz by suffix), atomically."""
    out = Path(path)
    if not any(out.name.endswith(s) for s in ISF_SUFFIXES):
        raise SymbolsError(str(out), f"a symbol table file must end in one of {', '.join(ISF_SUFFIXES)}")
    data = json.dumps(isf, separators=(",", ":"), check_circular=False).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=out.name, dir=out.parent)
    os.close(fd)
    try:
        with _open_compressed(Path(tmp), "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def load_isf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a table written by `write_isf` (or any .json/.json.xz/.json.gz ISF)."""
    p = Path(path)
    try:
        with _open_compressed(p, "rb") as f:
            return json.load(f)  # type: ignore[no-any-return]
    except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
        raise SymbolsError(str(p), f"cannot read symbol table: {e}") from e


def copy_table(src: Path, dst: str | os.PathLike[str]) -> Path:
    """Copy a table to `dst`, converting compression when the suffixes differ."""
    out = Path(dst)
    same = next((s for s in ISF_SUFFIXES[::-1] if src.name.endswith(s)), None)
    if same is not None and out.name.endswith(same):
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
        return out
    return write_isf(load_isf(src), out)


# -- the cache -----------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """${SVA_CACHE_DIR}/symbols; /var/cache/sva/symbols for root, else ~/.cache/sva/symbols."""
    env = os.environ.get("SVA_CACHE_DIR")
    if env:
        root = Path(env).absolute()
    elif os.geteuid() == 0:
        root = Path("/var/cache/sva")
    else:
        root = Path.home() / ".cache" / "sva"
    return root / "symbols"


def cache_key(banner: bytes, btf_sha256: str, source: SymbolSource | None = None) -> str:
    """`<release>-<banner sha>-<BTF sha>`; tables from a System.map (more symbols than
    kallsyms) are kept apart with a `-map` suffix. RAM and image builds are identical."""
    tag = "-map" if source is SymbolSource.SYSTEM_MAP else ""
    return f"{_release(banner)}-{hashlib.sha256(banner).hexdigest()[:12]}-{btf_sha256[:16]}{tag}"


def store(built: BuiltIsf, cache_dir: Path) -> Path:
    """Write a built table and its lookup record into the cache; returns the table's path."""
    key = cache_key(built.banner, built.btf.sha256, built.source)
    path = write_isf(built.isf, cache_dir / f"{key}.json.xz")
    meta = {
        "banner": base64.b64encode(built.banner).decode("ascii"),
        "btf_sha256": built.btf.sha256,
        "btf_size": built.btf.size,
        "banner_to_btf": built.banner_to_btf,
        "producer_version": PRODUCER_VERSION,
        "format": FORMAT_VERSION,
        "source": str(built.source),
        "detail": built.detail,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = cache_dir / f".{key}.meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, cache_dir / f"{key}.meta.json")
    return path


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    banner: bytes
    btf_sha256: str
    btf_size: int
    banner_to_btf: int | None
    source: str


def cache_entries(cache_dir: Path) -> Iterator[CacheEntry]:
    """The cache's usable entries (current producer version, table present); bounded."""
    try:
        metas = sorted(cache_dir.glob("*.meta.json"))[:MAX_CACHE_ENTRIES]
    except OSError:
        return
    for meta_path in metas:
        try:
            meta = json.loads(meta_path.read_text())
            table = meta_path.with_name(meta_path.name[: -len(".meta.json")] + ".json.xz")
            if meta.get("producer_version") != PRODUCER_VERSION or not table.is_file():
                continue
            yield CacheEntry(
                path=table,
                banner=base64.b64decode(meta["banner"]),
                btf_sha256=str(meta["btf_sha256"]),
                btf_size=int(meta["btf_size"]),
                banner_to_btf=None if meta["banner_to_btf"] is None else int(meta["banner_to_btf"]),
                source=str(meta.get("source", "?")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged record is a miss, not an error


def find_in_cache(
    backend: Backend,
    hits: Sequence[BannerHit],
    cache_dir: Path,
    sources: Iterable[SymbolSource] | None = None,
) -> CacheEntry | None:
    """The cached table whose banner and BTF are both in guest RAM, at the right distance
    (built from one of `sources`, if given)."""
    read = read_physical(backend)
    texts = {h.text for h in hits}
    allowed = None if sources is None else {str(s) for s in sources}
    for entry in cache_entries(cache_dir):
        if entry.banner not in texts or entry.banner_to_btf is None:
            continue
        if allowed is not None and entry.source not in allowed:
            continue
        if not 0 < entry.btf_size <= MAX_BTF_SIZE:
            continue
        for hit in hits:
            if hit.text != entry.banner:
                continue
            data = read(hit.gpa + entry.banner_to_btf, entry.btf_size)
            if data is not None and hashlib.sha256(data).hexdigest() == entry.btf_sha256:
                return entry
    return None


# -- configured ISF directories ---------------------------------------------------------------


def isf_banner(path: Path) -> bytes | None:
    """The linux_banner constant data of an ISF file, read as a stream; None if it has none."""
    tail = b""
    seen = 0
    try:
        with _open_compressed(path, "rb") as f:
            while seen < MAX_ISF_DECOMPRESSED:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                seen += len(chunk)
                buf = tail + chunk
                at = buf.find(_BANNER_KEY)
                if at >= 0:
                    window = buf[at : at + 4096]
                    if len(window) < 4096:
                        window += f.read(4096)
                    m = _CONSTANT_DATA.search(window)
                    return base64.b64decode(m.group(1)) if m else None
                tail = buf[-len(_BANNER_KEY) :]
    except (OSError, EOFError, lzma.LZMAError, ValueError):
        return None
    return None


def _isf_files(directory: Path) -> Iterator[Path]:
    count = 0
    for root, _dirs, files in os.walk(directory):
        for name in sorted(files):
            if name.endswith(ISF_SUFFIXES) and not name.startswith("."):
                count += 1
                if count > MAX_ISF_FILES:
                    return
                yield Path(root) / name


def _same_banner(a: bytes, b: bytes) -> bool:
    return a.rstrip(b"\0\n\r ") == b.rstrip(b"\0\n\r ")


def find_in_dirs(
    hits: Sequence[BannerHit], isf_dirs: Iterable[str | os.PathLike[str]], cache_dir: Path | None
) -> tuple[Path, bytes] | None:
    """An ISF in `isf_dirs` whose banner is one found in guest RAM (banners are indexed in
    the cache dir by path, size and mtime, so a big directory is read only once)."""
    index_path = cache_dir / "isf-dir-index.json" if cache_dir is not None else None
    index: dict[str, Any] = {}
    if index_path is not None:
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            index = {}
    changed = False
    found: tuple[Path, bytes] | None = None
    for directory in isf_dirs:
        d = Path(directory)
        if not d.is_dir():
            raise SymbolsError(str(d), "ISF directory does not exist")
        for path in _isf_files(d):
            try:
                st = path.stat()
            except OSError:
                continue
            key = str(path.absolute())
            stamp = [st.st_size, st.st_mtime_ns]
            rec = index.get(key)
            if isinstance(rec, dict) and rec.get("stamp") == stamp:
                banner = base64.b64decode(rec["banner"]) if rec.get("banner") else None
            else:
                banner = isf_banner(path)
                index[key] = {"stamp": stamp, "banner": base64.b64encode(banner).decode() if banner else None}
                changed = True
            if banner and any(_same_banner(banner, h.text) for h in hits):
                found = (path, banner)
                break
        if found:
            break
    if changed and index_path is not None:
        try:
            index_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = index_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, index_path)
        except OSError:
            pass  # the index only saves time
    return found


# -- preference ----------------------------------------------------------------------------------


def _usable_cache(cache_dir: Path | None, say: Progress) -> Path | None:
    if cache_dir is None:
        return None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        say(f"cache {cache_dir} unusable ({e.strerror}); building without it")
        return None
    return cache_dir


def _keep(built: BuiltIsf, cache_dir: Path | None, say: Progress) -> tuple[Path, bool]:
    if cache_dir is not None:
        say(f"storing it in {cache_dir}")
        try:
            return store(built, cache_dir), True
        except OSError as e:
            say(f"cannot write the cache ({e}); keeping the table in a temporary file")
    tmp = Path(tempfile.mkdtemp(prefix="sva-symbols-"))
    return write_isf(built.isf, tmp / f"{cache_key(built.banner, built.btf.sha256, built.source)}.json.xz"), False


def symbols_for_backend(
    backend: Backend,
    *,
    isf_dirs: Sequence[str | os.PathLike[str]] = (),
    kernel: str | os.PathLike[str] | None = None,
    system_map: str | os.PathLike[str] | None = None,
    cache_dir: Path | None | bool = True,
    progress: Progress | None = None,
) -> SymbolTable:
    """A volatility3 symbol table for the guest in `backend`, from the best source there is.

    `cache_dir`: True for `default_cache_dir()`, a Path, or False/None for no cache (the
    table then goes to a temporary directory). Raises SymbolsError naming the source.
    """
    say = progress or _quiet
    t0 = time.perf_counter()
    cache = _usable_cache(default_cache_dir() if cache_dir is True else (cache_dir or None), say)
    say(f"scanning {backend.target} RAM for kernel banners")
    hits = scan_banners(backend)
    if isf_dirs:
        match = find_in_dirs(hits, isf_dirs, cache)
        if match is not None:
            path, banner = match
            return SymbolTable(path, SymbolSource.ISF_DIR, _banner_text(banner), None,
                               time.perf_counter() - t0, f"banner matches {path}")  # fmt: skip
        say("no ISF in the configured directories matches the guest's banner")
    if cache is not None:
        # A System.map the caller gives has more symbols than kallsyms: only tables built
        # from one stand in for it. Image and RAM builds of one kernel are identical.
        wanted: tuple[SymbolSource, ...] | None = None
        if system_map is not None:
            wanted = (SymbolSource.SYSTEM_MAP,)
        elif kernel is not None:
            wanted = (SymbolSource.KERNEL_IMAGE, SymbolSource.GUEST_RAM)
        entry = find_in_cache(backend, hits, cache, wanted)
        if entry is not None:
            return SymbolTable(
                entry.path, SymbolSource.CACHE, _banner_text(entry.banner), entry.btf_sha256,
                time.perf_counter() - t0, f"banner and BTF found in guest RAM (built from {entry.source})",
                cached=True,
            )  # fmt: skip
    if kernel is not None or system_map is not None:
        built = _build_from_files(backend, hits, kernel, system_map, say)
    else:
        built = build_from_memory(backend, progress=say)
    path, cached = _keep(built, cache, say)
    return SymbolTable(
        path, built.source, built.banner_text, built.btf.sha256, time.perf_counter() - t0,
        built.detail, built.kaslr_slide, built.phys_base, cached,
    )  # fmt: skip


def _build_from_files(
    backend: Backend,
    hits: Sequence[BannerHit],
    kernel: str | os.PathLike[str] | None,
    system_map: str | os.PathLike[str] | None,
    say: Progress,
) -> BuiltIsf:
    if kernel is None:
        assert system_map is not None
        return build_from_system_map_and_memory(backend, hits, system_map, say)
    built = build_from_image(kernel, system_map, progress=say)
    if not any(h.text == built.banner for h in hits):
        raise SymbolsError(
            os.fspath(kernel),
            f"not the guest's kernel: its banner ({built.banner_text[:80]}...) is not in "
            f"{backend.target}'s RAM",
        )
    return built


def build_from_system_map_and_memory(
    backend: Backend, hits: Sequence[BannerHit], system_map: str | os.PathLike[str], say: Progress
) -> BuiltIsf:
    """Symbols from a real System.map, BTF from guest RAM (placed from the banner)."""
    symbols = parse_system_map(system_map)
    by_name = {s.name: s for s in reversed(symbols)}
    need = [by_name.get(n) for n in ("linux_banner", "__start_BTF", "__stop_BTF")]
    if any(s is None for s in need):
        raise SymbolsError(os.fspath(system_map), "needs linux_banner, __start_BTF and __stop_BTF")
    banner_sym, start, stop = need  # type: ignore[misc]
    delta, size = start.address - banner_sym.address, stop.address - start.address
    read = read_physical(backend)
    rejected: list[str] = []
    for hit in hits:
        data = read(hit.gpa + delta, size)
        if data is None or len(data) != size:
            continue
        try:
            btf = parse_btf(data, f"{backend.target}:BTF@0x{hit.gpa + delta:x}")
        except SymbolsError as e:
            rejected.append(f"0x{hit.gpa + delta:x}: {e.reason}")
            continue
        if btf.size != size:
            continue
        say(f"BTF at GPA 0x{hit.gpa + delta:x}, placed from the banner at 0x{hit.gpa:x}")
        # Link-time addresses map to RAM through the physical shift this placement gives.
        shift = hit.gpa - (banner_sym.address - START_KERNEL_MAP)
        reader = _ShiftReader(read, shift)
        slide = _slide_from_init_mm(btf, by_name, reader)
        say(f"KASLR slide from init_mm.pgd: {'unknown' if slide is None else hex(slide)}")
        report = IsfReport()
        isf = build_isf(
            btf, symbols, hit.text, reader=reader, report=report, pointer_slide=slide or 0,
            sources=[_symbols_source("system-map", f"{os.path.basename(system_map)} of "
                                     f"{_banner_text(hit.text)}", symbols, 0)],
        )  # fmt: skip
        return BuiltIsf(isf, hit.text, btf, SymbolSource.SYSTEM_MAP,
                        f"{system_map} + BTF from {backend.target} RAM", delta, report,
                        kaslr_slide=slide, banner_gpa=hit.gpa)  # fmt: skip
    why = "; ".join(rejected[:4]) or "no banner in guest RAM"
    raise SymbolsError(backend.target, f"no BTF where {system_map} places it: {why}")


def _slide_from_init_mm(btf: Btf, by_name: dict[str, KernelSymbol], reader: _ShiftReader) -> int | None:
    """The virtual KASLR slide, from the one pointer x86-64 keeps to a known symbol from
    boot on: init_mm.pgd == init_top_pgt (swapper_pg_dir). None when it does not fit."""
    init_mm, pgd_sym = by_name.get("init_mm"), by_name.get("init_top_pgt")
    mm = btf.find("mm_struct", BtfKind.STRUCT)
    offset = _member_offset(btf, mm, "pgd") if isinstance(mm, BtfStruct) else None
    if init_mm is None or pgd_sym is None or offset is None:
        return None
    raw = reader.read(init_mm.address + offset, 8)
    if raw is None:
        return None
    slide = int.from_bytes(raw, "little") - pgd_sym.address
    return slide if 0 <= slide < (1 << 30) and slide % 0x200000 == 0 else None


def _member_offset(btf: Btf, struct: BtfStruct, name: str, depth: int = 0) -> int | None:
    """Byte offset of member `name`, looking inside anonymous struct/union members too."""
    for m in struct.members:
        if m.name == name:
            return m.bit_offset // 8
        if not m.name and depth < 8:
            inner = btf.resolve(m.type_id)
            if isinstance(inner, BtfStruct):
                found = _member_offset(btf, inner, name, depth + 1)
                if found is not None:
                    return m.bit_offset // 8 + found
    return None


class _ShiftReader:
    def __init__(self, read: Callable[[int, int], bytes | None], shift: int) -> None:
        self._read, self._shift = read, shift

    def read(self, address: int, size: int) -> bytes | None:
        if not START_KERNEL_MAP <= address < START_KERNEL_MAP + (1 << 30):
            return None
        data = self._read((address - START_KERNEL_MAP + self._shift) & ((1 << 64) - 1), size)
        return data if data is not None and len(data) == size else None


def symbols_for_image(
    kernel: str | os.PathLike[str],
    *,
    system_map: str | os.PathLike[str] | None = None,
    cache_dir: Path | None | bool = True,
    progress: Progress | None = None,
) -> SymbolTable:
    """A table for a kernel image without a guest (cached like the others)."""
    say = progress or _quiet
    t0 = time.perf_counter()
    cache = _usable_cache(default_cache_dir() if cache_dir is True else (cache_dir or None), say)
    say(f"unpacking {kernel}")
    image = load_kernel_image(kernel)
    if cache is not None and image.btf is not None:
        # The BTF's hash identifies the build; the banner is read only to be shown.
        sha = hashlib.sha256(image.btf).hexdigest()
        wanted = str(SymbolSource.SYSTEM_MAP if system_map is not None else SymbolSource.KERNEL_IMAGE)
        for entry in cache_entries(cache):
            if entry.btf_sha256 == sha and (entry.source == wanted or
                                            (system_map is None and entry.source == "guest-ram")):  # fmt: skip
                return SymbolTable(entry.path, SymbolSource.CACHE, _banner_text(entry.banner), sha,
                                   time.perf_counter() - t0, f"already built from {entry.source}",
                                   cached=True)  # fmt: skip
    built = build_from_image(image, system_map, progress=say)
    path, cached = _keep(built, cache, say)
    return SymbolTable(path, built.source, built.banner_text, built.btf.sha256,
                       time.perf_counter() - t0, built.detail, cached=cached)  # fmt: skip
