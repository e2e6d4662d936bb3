"""The lab guest's kernel: a current Debian kernel, fetched with apt and cached.

`--kernel auto` (= `debian:cloud`) follows the `linux-image-cloud-amd64` meta package to the
versioned image (e.g. linux-image-6.1.0-56-cloud-amd64); `debian:generic` follows
`linux-image-amd64` (e.g. linux-image-6.1.0-56-amd64). Either way the image's `-unsigned`
twin is downloaded with `apt-get download` (apt checks it against the signed archive
index), and the cache keeps only what a lab needs: vmlinuz, System.map, config and the
modules for virtio networking (the generic kernel needs the same eight as the cloud one).
The package has no modules.dep (depmod makes it at install time), so module dependencies
are read from each module's own .modinfo section.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sva.errors import LabError
from sva.lab.paths import cache_root, file_lock

# Debian kernel flavours a lab can boot: `debian:<flavour>` -> (meta package, release suffix).
FLAVOURS: dict[str, tuple[str, str]] = {
    "cloud": ("linux-image-cloud-amd64", "-cloud-amd64"),
    "generic": ("linux-image-amd64", "-amd64"),
}
DEFAULT_FLAVOUR = "cloud"
# The ABI part of a Debian kernel release before the flavour suffix, e.g. "6.1.0-56"; anchoring
# on it keeps "-amd64" from also matching "-cloud-amd64" or "-rt-amd64".
_ABI = r"[0-9][0-9.]*-[0-9]+"
META_PACKAGE = FLAVOURS[DEFAULT_FLAVOUR][0]
# What the guest needs as modules for a virtio-net-pci NIC; their dependencies follow.
NETWORK_MODULES = ("virtio_pci", "virtio_net")
CACHE_FORMAT = 2
KEEP_KERNELS = 3  # cached kernel versions kept, newest first
_APT_TIMEOUT = 120.0
_DOWNLOAD_TIMEOUT = 600.0


@dataclass(frozen=True)
class KernelImage:
    """A kernel ready to boot, with the modules to insmod (in order) for networking."""

    release: str  # `uname -r`, e.g. 6.1.0-56-cloud-amd64
    vmlinuz: Path
    system_map: Path | None
    config: Path | None
    package: str | None  # Debian package it came from, None for a user-supplied bzImage
    package_version: str | None
    modules: tuple[Path, ...]  # load order: dependencies first
    network_note: str  # where virtio networking comes from (or why there is none), for state


def kernels_dir() -> Path:
    return cache_root() / "kernels"


def debian_flavour(kernel: str) -> str | None:
    """The Debian flavour `kernel` names (`auto` is the cloud one), None for a file path."""
    if kernel == "auto":
        return DEFAULT_FLAVOUR
    if not kernel.startswith("debian:"):
        return None
    flavour = kernel[len("debian:") :]
    if flavour not in FLAVOURS:
        choices = ", ".join(f"debian:{f}" for f in FLAVOURS)
        raise LabError(f"lab kernel {kernel!r}: unknown Debian flavour; choose one of {choices}")
    return flavour


def resolve(kernel: str = "auto") -> KernelImage:
    """`auto`/`debian:cloud`/`debian:generic` for a cached/downloaded Debian kernel, else a bzImage path."""
    flavour = debian_flavour(kernel)
    if flavour is not None:
        return _debian_kernel(flavour)
    return _user_kernel(Path(kernel))


# -- user-supplied bzImage ------------------------------------------------------------


def bzimage_release(path: Path) -> str | None:
    """The release string an x86 bzImage carries in its setup header, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x8000)
    except OSError:
        return None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    (ptr,) = struct.unpack_from("<H", head, 0x20E)
    start = ptr + 0x200
    if ptr == 0 or start >= len(head):
        return None
    text = head[start : head.find(b"\0", start)].decode("ascii", "replace")
    return text.split()[0] if text.split() else None


def _user_kernel(path: Path) -> KernelImage:
    if not path.is_file():
        raise LabError(f"kernel {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(0x210)
    if len(head) < 0x206 or head[0x202:0x206] != b"HdrS":
        raise LabError(f"kernel {path}: not an x86 bzImage (no 'HdrS' setup header)")
    release = bzimage_release(path) or "unknown"
    cached = _cached_entries(release)
    if cached:
        entry = cached[0]
        mods = tuple(entry / "modules" / m for m in _read_meta(entry)["modules"])
        note = f"virtio networking modules from the cached {entry.name} kernel"
        if not mods and _read_meta(entry).get("network_builtin"):
            note = "virtio networking is built into the kernel"
        return KernelImage(
            release,
            path.resolve(),
            _opt(entry / f"System.map-{release}"),
            _opt(entry / f"config-{release}"),
            None,
            None,
            mods,
            note,
        )
    note = f"no cached modules for kernel {release}; networking is off unless virtio_net is built into it"
    return KernelImage(release, path.resolve(), None, None, None, None, (), note)


def _opt(p: Path) -> Path | None:
    return p if p.exists() else None


# -- Debian cloud kernel --------------------------------------------------------------


def _run(argv: list[str], timeout: float, what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise LabError(f"lab kernel: {what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"lab kernel: {what}: `{' '.join(argv)}` took longer than {timeout:.0f}s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise LabError(f"lab kernel: {what}: `{' '.join(argv)}` failed: {' / '.join(tail) or proc.returncode}")
    return proc.stdout


def _apt_lookup(flavour: str) -> tuple[str, str]:
    """(versioned image package, version of its -unsigned twin) from apt's lists."""
    meta, suffix = FLAVOURS[flavour]
    deps = _run(["apt-cache", "depends", meta], _APT_TIMEOUT, f"resolving {meta}")
    m = re.search(rf"^\s*\|?Depends:\s*(linux-image-({_ABI}{re.escape(suffix)}))\s*$", deps, re.M)
    if not m:
        raise LabError(f"lab kernel: apt-cache does not know what {meta} depends on")
    image = m[1]
    show = _run(
        ["apt-cache", "show", "--no-all-versions", f"{image}-unsigned"], _APT_TIMEOUT, f"looking up {image}-unsigned"
    )
    v = re.search(r"^Version:\s*(\S+)", show, re.M)
    if not v:
        raise LabError(f"lab kernel: apt-cache knows no package {image}-unsigned")
    return image, v[1]


def _apt_lookup_updating(flavour: str) -> tuple[str, str]:
    try:
        return _apt_lookup(flavour)
    except LabError:
        if os.geteuid() != 0:
            raise
    # Fresh machines have no package lists at all; one update is worth it.
    _run(["apt-get", "update", "-q"], 600.0, "apt-get update")
    return _apt_lookup(flavour)


def _cached_entries(release: str | None = None, flavour: str | None = None) -> list[Path]:
    """Complete cache entries, newest first, optionally only for one release or flavour."""
    root = kernels_dir()
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.name.startswith(".") or not _entry_ok(d):
            continue
        if release and _read_meta(d).get("release") != release:
            continue
        if flavour and _entry_flavour(d) != flavour:
            continue
        found.append(d)
    return sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)


def _read_meta(entry: Path) -> dict[str, Any]:
    try:
        meta = json.loads((entry / "kernel.json").read_text())
    except (OSError, ValueError) as e:
        raise LabError(f"lab kernel cache {entry}: unreadable kernel.json: {e}") from None
    if not isinstance(meta, dict):
        raise LabError(f"lab kernel cache {entry}: kernel.json is not an object")
    return meta


def _entry_flavour(entry: Path) -> str | None:
    """Which Debian flavour a cache entry holds, from its release, or None."""
    release = str(_read_meta(entry).get("release", ""))
    for flavour, (_meta, suffix) in FLAVOURS.items():
        if release.endswith(suffix) and re.fullmatch(_ABI, release.removesuffix(suffix)):
            return flavour
    return None


def _image_from_entry(entry: Path) -> KernelImage:
    info = _read_meta(entry)
    mods = tuple(entry / "modules" / m for m in info["modules"])
    if info.get("network_builtin"):
        note = "virtio networking is built into the kernel"
    elif mods:
        note = f"virtio_net and {len(mods) - 1} dependencies loaded as modules"
    else:
        note = "this kernel has no virtio_net; networking is off"
    return KernelImage(
        release=info["release"],
        vmlinuz=entry / f"vmlinuz-{info['release']}",
        system_map=_opt(entry / f"System.map-{info['release']}"),
        config=_opt(entry / f"config-{info['release']}"),
        package=info["package"],
        package_version=info["version"],
        modules=mods,
        network_note=note,
    )


def _debian_kernel(flavour: str) -> KernelImage:
    try:
        image, version = _apt_lookup_updating(flavour)
    except LabError as e:
        # Offline or without apt lists: the newest kernel of this flavour we already have still boots.
        cached = _cached_entries(flavour=flavour)
        if cached:
            return _image_from_entry(cached[0])
        raise LabError(f"{e} (and no kernel is cached in {kernels_dir()})") from None
    release = image[len("linux-image-") :]
    entry = kernels_dir() / f"{release}_{version}"
    if _entry_ok(entry):
        return _image_from_entry(entry)
    try:
        with file_lock(kernels_dir() / ".lock", _DOWNLOAD_TIMEOUT + 300, "lab kernel cache"):
            if not _entry_ok(entry):  # another process may have fetched it meanwhile
                _fetch(f"{image}-unsigned", version, release, entry)
                _prune()
    except LabError:
        # apt's lists can name a kernel the archive no longer serves (or the network is
        # gone): an older cached kernel of the same flavour is still a good lab kernel.
        cached = _cached_entries(flavour=flavour)
        if not cached:
            raise
        return _image_from_entry(cached[0])
    return _image_from_entry(entry)


def _prune() -> None:
    # Per flavour, so fetching one flavour never evicts the only kernel of another.
    by_flavour: dict[str | None, list[Path]] = {}
    for entry in _cached_entries():  # newest first
        by_flavour.setdefault(_entry_flavour(entry), []).append(entry)
    for entries in by_flavour.values():
        for old in entries[KEEP_KERNELS:]:
            shutil.rmtree(old, ignore_errors=True)


def _entry_ok(entry: Path) -> bool:
    """A complete cache entry written by this version of the cache layout."""
    try:
        return (entry / "kernel.json").is_file() and _read_meta(entry).get("format") == CACHE_FORMAT
    except LabError:
        return False


def _fetch(package: str, version: str, release: str, entry: Path) -> None:
    root = kernels_dir()
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        work = Path(tmp)
        argv = ["apt-get", "download", "-q", f"{package}={version}"]
        if os.geteuid() == 0:
            # The _apt sandbox user cannot write into root's cache dir; apt only warns, but noisily.
            argv[1:1] = ["-o", "APT::Sandbox::User=root"]
        _run(argv, _DOWNLOAD_TIMEOUT, f"downloading {package} {version}", cwd=work)
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise LabError(f"lab kernel: apt-get download left {len(debs)} .deb files for {package}, expected 1")
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(debs[0]), str(tree)], 300.0, f"unpacking {debs[0].name}")
        staged = work / "entry"
        (staged / "modules").mkdir(parents=True)
        # Named as in /boot, so other tools that look for vmlinuz-<release> find it too.
        for base in ("vmlinuz", "System.map", "config"):
            src = tree / "boot" / f"{base}-{release}"
            if not src.is_file():
                if base == "vmlinuz":
                    raise LabError(f"lab kernel: {package} {version} has no /boot/vmlinuz-{release}")
                continue
            shutil.copy2(src, staged / src.name)
        moddir = tree / "lib" / "modules" / release
        order, builtin = module_closure(moddir, NETWORK_MODULES)
        names = []
        for path in order:
            name = module_name(path) + ".ko"
            _copy_module(path, staged / "modules" / name)
            names.append(name)
        meta = {
            "format": CACHE_FORMAT,
            "release": release,
            "package": package,
            "version": version,
            "modules": names,
            "network_builtin": all(m in builtin for m in NETWORK_MODULES),
        }
        (staged / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
        if entry.exists():
            shutil.rmtree(entry)
        os.rename(staged, entry)


# -- modules ---------------------------------------------------------------------------


def module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def modinfo(path: Path) -> dict[str, str]:
    """Key=value pairs from a module's .modinfo ELF section (the fields modinfo(8) prints)."""
    data = _module_bytes(path)
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise LabError(f"kernel module {path}: not a 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, stroff, strsize = section(shstrndx)
    for i in range(shnum):
        name_off, off, size = section(i)
        end = data.find(b"\0", stroff + name_off)
        if data[stroff + name_off : end] == b".modinfo":
            fields: dict[str, str] = {}
            for item in data[off : off + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep and key not in fields:
                    fields[key] = value
            return fields
    raise LabError(f"kernel module {path}: no .modinfo section")


def _module_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".zst"):
        try:
            return subprocess.run(
                ["zstd", "-dc", str(path)], capture_output=True, check=True, timeout=60
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise LabError(f"kernel module {path}: cannot decompress with zstd: {e}") from None
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    return raw


def _copy_module(src: Path, dst: Path) -> None:
    # busybox insmod reads plain ELF only, so compressed modules are unpacked here.
    dst.write_bytes(_module_bytes(src))


def module_closure(moddir: Path, wanted: tuple[str, ...]) -> tuple[list[Path], set[str]]:
    """Module files to load for `wanted`, dependencies first, and which of them are built in."""
    builtin: set[str] = set()
    bfile = moddir / "modules.builtin"
    if bfile.is_file():
        builtin = {module_name(Path(line.strip())) for line in bfile.read_text().splitlines() if line.strip()}
    files: dict[str, Path] = {}
    kdir = moddir / "kernel"
    if kdir.is_dir():
        for p in kdir.rglob("*.ko*"):
            files.setdefault(module_name(p), p)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, depth: int) -> None:
        if name in seen or name in builtin:
            return
        if depth > 32:
            raise LabError(f"kernel modules in {moddir}: dependency chain through {name} is too deep")
        seen.add(name)
        path = files.get(name)
        if path is None:
            raise LabError(f"kernel modules in {moddir}: {name} is neither a module nor built in")
        for dep in filter(None, modinfo(path).get("depends", "").split(",")):
            visit(dep.replace("-", "_"), depth + 1)
        order.append(path)

    for name in wanted:
        visit(name, 0)
    return order, builtin
