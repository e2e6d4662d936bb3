"""Build (and cache) the lab guest's initramfs: static busybox, virtio modules, /init.

The archive is written here as a newc cpio with fixed owners and times, so the same inputs
give the same bytes, and the cache key is a hash of those inputs. It is left uncompressed:
the kernel then has nothing to inflate, which under TCG is faster than moving fewer bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sva.errors import LabError
from sva.lab import initscript
from sva.lab.kernel import KernelImage
from sva.lab.paths import cache_root

BUSYBOX = Path("/bin/busybox")
FORMAT = 1
KEEP_CACHED = 16  # initramfs images kept, most recently used first
MAX_EXTRA_ENTRIES = 20000
MAX_EXTRA_BYTES = 512 << 20
_PT_INTERP = 3  # ELF program header type of a dynamic loader request

_DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "usr/lib", "dev", "proc", "sys", "tmp", "run", "root", "etc",
         "lib", "lib/modules", "var")


@dataclass(frozen=True)
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class CpioWriter:
    """A minimal newc ("070701") cpio archive writer."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1
        self._names: set[str] = set()

    def add(self, entry: _Entry) -> None:
        name = entry.name.strip("/")
        self._names.add(name)
        self._header(name, entry.mode, len(entry.data), entry.rdev)
        self._out.write(entry.data)
        self._pad()

    def _header(self, name: str, mode: int, size: int, rdev: tuple[int, int]) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        self._out.write(b"070701" + b"".join(b"%08x" % f for f in fields) + encoded)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def finish(self) -> bytes:
        self._header("TRAILER!!!", 0, 0, (0, 0))
        return self._out.getvalue()


def _check_busybox() -> bytes:
    try:
        data = BUSYBOX.read_bytes()
    except OSError as e:
        raise LabError(f"lab initramfs: cannot read {BUSYBOX}: {e.strerror}; install busybox-static") from None
    if _is_dynamic_elf(data):
        raise LabError(f"lab initramfs: {BUSYBOX} is dynamically linked; install busybox-static")
    return data


def _is_dynamic_elf(data: bytes) -> bool:
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return True
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == _PT_INTERP for i in range(min(phnum, 64)))


def _applets() -> list[str]:
    try:
        out = subprocess.run(
            [str(BUSYBOX), "--list-full"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LabError(f"lab initramfs: `{BUSYBOX} --list-full` failed: {e}") from None
    return [line.strip().strip("/") for line in out.splitlines() if line.strip()]


def _extra_entries(extra: Path) -> list[_Entry]:
    if not extra.is_dir():
        raise LabError(f"--initrd-extra {extra}: not a directory")
    entries: list[_Entry] = []
    total = 0
    for root, dirs, files in os.walk(extra):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            path = Path(root) / name
            rel = path.relative_to(extra).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                entries.append(_Entry(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode()))
            elif stat.S_ISDIR(st.st_mode):
                entries.append(_Entry(rel, stat.S_IFDIR | stat.S_IMODE(st.st_mode)))
            elif stat.S_ISREG(st.st_mode):
                total += st.st_size
                if total > MAX_EXTRA_BYTES:
                    raise LabError(f"--initrd-extra {extra}: more than {MAX_EXTRA_BYTES >> 20} MiB of files")
                entries.append(_Entry(rel, stat.S_IFREG | stat.S_IMODE(st.st_mode), path.read_bytes()))
            else:
                raise LabError(f"--initrd-extra {extra}: {rel} is not a file, directory or symlink")
            if len(entries) > MAX_EXTRA_ENTRIES:
                raise LabError(f"--initrd-extra {extra}: more than {MAX_EXTRA_ENTRIES} entries")
    return entries


def _entries(kernel: KernelImage, extra: Path | None) -> list[_Entry]:
    busybox = _check_busybox()
    entries = [_Entry(d, stat.S_IFDIR | 0o755) for d in _DIRS]
    entries[_DIRS.index("tmp")] = _Entry("tmp", stat.S_IFDIR | 0o1777)
    entries += [
        # The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
        _Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        _Entry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        _Entry("init", stat.S_IFREG | 0o755, initscript.render().encode()),
    ]
    dirs = set(_DIRS)
    for applet in _applets():
        if applet == "bin/busybox" or applet.endswith("/busybox"):
            continue
        parent = applet.rpartition("/")[0]
        if parent and parent not in dirs:
            dirs.add(parent)
            entries.append(_Entry(parent, stat.S_IFDIR | 0o755))
        target = os.path.relpath("bin/busybox", parent or ".")
        entries.append(_Entry(applet, stat.S_IFLNK | 0o777, target.encode()))
    lab = initscript.SCENARIO_DIR.strip("/")
    entries += [
        _Entry(lab, stat.S_IFDIR | 0o755),
        _Entry(f"{lab}/implant", stat.S_IFREG | 0o755, initscript.IMPLANT.encode()),
        _Entry(f"{lab}/xmrig", stat.S_IFREG | 0o755, initscript.XMRIG.encode()),
    ]
    moddir = initscript.MODULE_DIR.strip("/")
    entries.append(_Entry(moddir, stat.S_IFDIR | 0o755))
    names = []
    for mod in kernel.modules:
        try:
            data = mod.read_bytes()
        except OSError as e:
            raise LabError(f"lab initramfs: kernel module {mod}: {e.strerror}") from None
        entries.append(_Entry(f"{moddir}/{mod.name}", stat.S_IFREG | 0o644, data))
        names.append(mod.name)
    entries.append(_Entry(f"{moddir}/load.list", stat.S_IFREG | 0o644, "".join(f"{n}\n" for n in names).encode()))
    if extra is not None:
        entries += _extra_entries(extra)
    return entries


def _key(entries: list[_Entry]) -> str:
    h = hashlib.sha256(b"sva-lab-initramfs %d\n" % FORMAT)
    for e in entries:
        h.update(b"%s %o %d %d %s\n" % (e.name.encode(), e.mode, *e.rdev, hashlib.sha256(e.data).hexdigest().encode()))
    return h.hexdigest()[:32]


def build(kernel: KernelImage, extra: Path | None = None) -> Path:
    """Path of an initramfs for `kernel` (+ the `extra` tree), built now or taken from the cache."""
    entries = _entries(kernel, extra)
    cache = cache_root() / "initramfs"
    path = cache / f"{_key(entries)}.cpio"
    if path.is_file():
        os.utime(path)  # mark as recently used for pruning
        return path
    writer = CpioWriter()
    for e in entries:
        writer.add(e)
    data = writer.finish()
    cache.mkdir(parents=True, exist_ok=True)
    # Write-then-rename: a parallel `up` either sees the whole file or none.
    fd, tmp = tempfile.mkstemp(prefix=".build-", dir=cache)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _prune(cache)
    return path


def _prune(cache: Path) -> None:
    images = sorted(cache.glob("*.cpio"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[KEEP_CACHED:]:
        old.unlink(missing_ok=True)
