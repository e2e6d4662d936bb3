"""Fixtures for the symbols tests: a real Debian cloud kernel, and builders for small
BTF blobs, ELF files and bzImages made byte by byte.

The real kernel is Debian's current `linux-image-*-cloud-amd64-unsigned`, fetched with
apt-get and unpacked with dpkg-deb into $SVA_CACHE_DIR (default /var/cache/sva)
/testkernels, once. A `vmlinuz-*` already unpacked anywhere under the cache dir (the lab
code keeps Debian kernels there too) is used instead. Tests that need it skip, saying
why, when neither works.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sva.symbols.btf import Btf, BtfKind, parse_btf
from sva.symbols.kimage import KernelImage, load_kernel_image

CACHE_DIR = Path(os.environ.get("SVA_CACHE_DIR", "/var/cache/sva"))
TEST_KERNELS = CACHE_DIR / "testkernels"


# --- the real kernel -------------------------------------------------------------------


def _is_bzimage(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(0x206)
    except OSError:
        return False
    return path.stat().st_size > 1 << 20 and head[0x202:0x206] == b"HdrS"


def _cached_vmlinuz() -> Path | None:
    if not CACHE_DIR.is_dir():
        return None
    found = sorted(
        (p for p in CACHE_DIR.rglob("vmlinuz-*") if "cloud-amd64" in p.name and _is_bzimage(p)),
        key=lambda p: p.stat().st_mtime,
    )
    return found[-1] if found else None


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def _cloud_kernel_package() -> str | None:
    out = _run("apt-cache", "depends", "linux-image-cloud-amd64").stdout
    match = re.search(r"Depends: (linux-image-[\w.+-]+-cloud-amd64)\b", out)
    return f"{match.group(1)}-unsigned" if match else None


def _download_kernel() -> Path:
    """Fetch and unpack Debian's cloud kernel; pytest.skip with the reason if impossible."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("no apt-get/dpkg-deb here to fetch Debian's cloud kernel")
    package = _cloud_kernel_package()
    if package is None and os.geteuid() == 0:
        _run("apt-get", "update", "-q")
        package = _cloud_kernel_package()
    if package is None:
        pytest.skip("apt-cache does not know linux-image-cloud-amd64 (no Debian package lists?)")
    try:
        TEST_KERNELS.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=TEST_KERNELS) as tmp:
            got = _run("apt-get", "download", package, cwd=Path(tmp))
            debs = list(Path(tmp).glob("*.deb"))
            if got.returncode != 0 or not debs:
                pytest.skip(f"apt-get download {package} failed: {got.stderr.strip()[-300:]}")
            extract = Path(tmp) / "extract"
            unpacked = _run("dpkg-deb", "-x", str(debs[0]), str(extract))
            if unpacked.returncode != 0:
                pytest.skip(f"dpkg-deb -x {debs[0].name} failed: {unpacked.stderr.strip()}")
            target = TEST_KERNELS / debs[0].stem
            if not target.exists():
                # Moved in last, so a half-unpacked tree is never mistaken for a kernel.
                os.replace(extract / "boot", target)
    except OSError as exc:
        pytest.skip(f"cannot use {TEST_KERNELS} for the test kernel: {exc}")
    found = sorted(target.glob("vmlinuz-*"))
    if not found:
        pytest.skip(f"{package} holds no vmlinuz")
    return found[0]


@pytest.fixture(scope="session")
def debian_vmlinuz() -> Path:
    return _cached_vmlinuz() or _download_kernel()


@pytest.fixture(scope="session")
def debian_kernel(debian_vmlinuz: Path) -> KernelImage:
    return load_kernel_image(debian_vmlinuz)


@dataclass(frozen=True)
class ParsedBtf:
    btf: Btf
    blob: bytes
    seconds: float


@pytest.fixture(scope="session")
def debian_btf(debian_kernel: KernelImage) -> ParsedBtf:
    assert debian_kernel.btf is not None, "the Debian kernel has no .BTF section"
    start = time.perf_counter()
    btf = parse_btf(debian_kernel.btf, f"{debian_kernel.path}:.BTF")
    return ParsedBtf(btf, debian_kernel.btf, time.perf_counter() - start)


# --- small BTF blobs -------------------------------------------------------------------


@dataclass
class BtfBuilder:
    """Assemble a BTF blob record by record; each add_* returns the new type id."""

    records: list[bytes] = field(default_factory=list)
    strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))
    _offsets: dict[str, int] = field(default_factory=dict)
    endian: str = "<"

    def name(self, text: str) -> int:
        if not text:
            return 0
        if text not in self._offsets:
            self._offsets[text] = len(self.strings)
            self.strings += text.encode() + b"\0"
        return self._offsets[text]

    def raw(
        self,
        kind: int,
        name: str | int = "",
        vlen: int = 0,
        size_or_type: int = 0,
        extra: Iterable[int] = (),
        kind_flag: bool = False,
    ) -> int:
        """Any record; `name` may be a raw offset; `extra` is the kind data as u32 words."""
        name_off = name if isinstance(name, int) else self.name(name)
        info = (int(kind_flag) << 31) | ((kind & 0x1F) << 24) | vlen
        words = [name_off, info, size_or_type, *extra]
        self.records.append(struct.pack(f"{self.endian}{len(words)}I", *words))
        return len(self.records)

    def int_(self, name: str, size: int, bits: int | None = None, encoding: int = 0) -> int:
        word = (encoding << 24) | (bits if bits is not None else 8 * size)
        return self.raw(BtfKind.INT, name, 0, size, [word])

    def ptr(self, target: int) -> int:
        return self.raw(BtfKind.PTR, "", 0, target)

    def array(self, element: int, index: int, nelems: int) -> int:
        return self.raw(BtfKind.ARRAY, "", 0, 0, [element, index, nelems])

    def struct(
        self,
        name: str,
        size: int,
        members: Sequence[tuple[str, int, int] | tuple[str, int, int, int]],
        union: bool = False,
    ) -> int:
        """members: (name, type, bit_offset[, bitfield_size]); any bitfield sets kind_flag."""
        kind_flag = any(len(m) == 4 for m in members)
        extra: list[int] = []
        for m in members:
            offset = m[2] | (m[3] << 24 if len(m) == 4 else 0)  # type: ignore[misc]
            extra += [self.name(m[0]), m[1], offset]
        kind = BtfKind.UNION if union else BtfKind.STRUCT
        return self.raw(kind, name, len(members), size, extra, kind_flag)

    def enum(self, name: str, size: int, values: Sequence[tuple[str, int]], signed: bool) -> int:
        extra: list[int] = []
        for n, v in values:
            extra += [self.name(n), v & 0xFFFFFFFF]
        return self.raw(BtfKind.ENUM, name, len(values), size, extra, signed)

    def enum64(self, name: str, values: Sequence[tuple[str, int]], signed: bool) -> int:
        extra: list[int] = []
        for n, v in values:
            v &= (1 << 64) - 1
            extra += [self.name(n), v & 0xFFFFFFFF, v >> 32]
        return self.raw(BtfKind.ENUM64, name, len(values), 8, extra, signed)

    def ref(self, kind: BtfKind, target: int, name: str = "") -> int:
        return self.raw(kind, name, 0, target)

    def func_proto(self, ret: int, params: Sequence[tuple[str, int]]) -> int:
        extra: list[int] = []
        for n, t in params:
            extra += [self.name(n), t]
        return self.raw(BtfKind.FUNC_PROTO, "", len(params), ret, extra)

    def func(self, name: str, proto: int, linkage: int = 1) -> int:
        return self.raw(BtfKind.FUNC, name, linkage, proto)

    def var(self, name: str, type_id: int, linkage: int = 1) -> int:
        return self.raw(BtfKind.VAR, name, 0, type_id, [linkage])

    def datasec(self, name: str, size: int, entries: Sequence[tuple[int, int, int]]) -> int:
        extra = [w for e in entries for w in e]
        return self.raw(BtfKind.DATASEC, name, len(entries), size, extra)

    def build(
        self,
        *,
        hdr_len: int = 24,
        type_off: int = 0,
        str_off: int | None = None,
        version: int = 1,
        flags: int = 0,
        magic: int = 0xEB9F,
        type_len: int | None = None,
        str_len: int | None = None,
    ) -> bytes:
        types = b"".join(self.records)
        strings = bytes(self.strings)
        real_str_off = type_off + len(types) if str_off is None else str_off
        header = struct.pack(
            f"{self.endian}HBBIIIII",
            magic,
            version,
            flags,
            hdr_len,
            type_off,
            len(types) if type_len is None else type_len,
            real_str_off,
            len(strings) if str_len is None else str_len,
        )
        body = bytearray(max(type_off + len(types), real_str_off + len(strings)))
        body[type_off : type_off + len(types)] = types
        body[real_str_off : real_str_off + len(strings)] = strings
        return header + bytes(hdr_len - 24) + bytes(body)


@dataclass(frozen=True)
class SampleIds:
    """Type ids in `sample_builder`'s blob."""

    char: int
    int_: int
    u64: int
    list_head: int
    list_ptr: int
    task: int
    comm: int
    flags_union: int
    state_enum: int
    big_enum: int
    fwd: int
    typedef: int
    const: int
    volatile: int
    restrict: int
    type_tag: int
    proto: int
    func: int
    var: int
    datasec: int
    float_: int
    decl_tag: int
    member_tag: int
    matrix: int


def sample_builder(endian: str = "<") -> tuple[BtfBuilder, SampleIds]:
    """A small blob with every BTF kind, shaped like the kernel's own types."""
    b = BtfBuilder(endian=endian)
    char = b.int_("char", 1, encoding=2 | 1)
    int_ = b.int_("int", 4, encoding=1)
    u64 = b.int_("long long unsigned int", 8)
    list_ptr = b.ptr(len(b.records) + 2)  # a forward reference to list_head, added next
    list_head = b.struct("list_head", 16, [("next", list_ptr, 0), ("prev", list_ptr, 64)])
    comm = b.array(char, int_, 16)
    matrix = b.array(comm, int_, 3)  # char[3][16]
    flags_union = b.struct("flags", 4, [("raw", int_, 0), ("lo", int_, 0, 3)], union=True)
    state_enum = b.enum("state", 4, [("RUNNING", 0), ("DEAD", -1)], signed=True)
    big_enum = b.enum64("big", [("HUGE", 1 << 40), ("NEG", -2)], signed=False)
    fwd = b.raw(BtfKind.FWD, "mm_struct", 0, 0, kind_flag=False)
    typedef = b.ref(BtfKind.TYPEDEF, int_, "pid_t")
    const = b.ref(BtfKind.CONST, typedef)
    volatile = b.ref(BtfKind.VOLATILE, const)
    restrict = b.ref(BtfKind.RESTRICT, list_ptr)
    type_tag = b.ref(BtfKind.TYPE_TAG, list_ptr, "user")
    task = b.struct(
        "task_struct",
        64,
        [
            ("tasks", list_head, 0),
            ("pid", typedef, 128),
            ("tgid", volatile, 160),
            ("comm", comm, 192),
            ("on_cpu", u64, 320, 1),
            ("flag_bits", u64, 321, 7),
            ("mm", b.ptr(fwd), 384),
        ],
    )
    proto = b.func_proto(int_, [("task", b.ptr(task)), ("", 0)])
    func = b.func("do_exit", proto, linkage=1)
    var = b.var("current_task", b.ptr(task), linkage=1)
    datasec = b.datasec(".data..percpu", 64, [(var, 8, 8)])
    float_ = b.raw(BtfKind.FLOAT, "double", 0, 8)
    decl_tag = b.raw(BtfKind.DECL_TAG, "kfunc", 0, func, [0xFFFFFFFF])
    member_tag = b.raw(BtfKind.DECL_TAG, "rcu", 0, task, [6])
    ids = SampleIds(
        char, int_, u64, list_head, list_ptr, task, comm, flags_union, state_enum, big_enum,
        fwd, typedef, const, volatile, restrict, type_tag, proto, func, var, datasec, float_,
        decl_tag, member_tag, matrix,
    )  # fmt: skip
    return b, ids


# --- ELF files and bzImages ------------------------------------------------------------


def make_elf(
    sections: Sequence[tuple[str, int, bytes]],
    symbols: Sequence[tuple[str, int]] = (),
) -> bytes:
    """A little-endian ELF64 with these (name, sh_type, data) sections, and a .symtab."""
    sections = list(sections)
    if symbols:
        strtab = bytearray(b"\0")
        entries = [bytes(24)]
        for name, value in symbols:
            entries.append(struct.pack("<IBBHQQ", len(strtab), 0x12, 0, 1, value, 0))
            strtab += name.encode() + b"\0"
        sections.append((".strtab", 3, bytes(strtab)))
        sections.append((".symtab", 2, b"".join(entries)))
    names = bytearray(b"\0")
    name_offs = []
    for name, _, _ in [*sections, (".shstrtab", 3, b"")]:
        name_offs.append(len(names))
        names += name.encode() + b"\0"
    sections.append((".shstrtab", 3, bytes(names)))
    body = bytearray()
    placed = []
    for _, _, data in sections:
        placed.append(0x40 + len(body))
        body += data + bytes(-len(data) % 8)
    shoff = 0x40 + len(body)
    shnum = len(sections) + 1
    ehdr = (
        b"\x7fELF\x02\x01\x01" + bytes(9)
        + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, shnum, shnum - 1)
    )  # fmt: skip
    shdrs = bytearray(64)
    index = {name: i + 1 for i, (name, _, _) in enumerate(sections)}
    for i, (_, sh_type, data) in enumerate(sections):
        link = index[".strtab"] if sh_type == 2 else 0
        shdrs += struct.pack(
            "<IIQQQQIIQQ", name_offs[i], sh_type, 2, 0xFFFFFFFF81000000, placed[i], len(data),
            link, 0, 8, 24 if sh_type == 2 else 0,
        )  # fmt: skip
    return ehdr + bytes(body) + bytes(shdrs)


def make_bzimage(payload: bytes, *, setup_sects: int = 3, version: int = 0x020F) -> bytes:
    """A bzImage shell: boot header + 0x100 bytes of "decompressor" + the payload."""
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, version)
    struct.pack_into("<II", image, 0x248, 0x100, len(payload))
    return bytes(image) + bytes(0x100) + payload + bytes(0x40)


def size_trailer(data: bytes) -> bytes:
    """What the kernel build appends to every compressed payload."""
    return struct.pack("<I", len(data) & 0xFFFFFFFF)


def lz4_legacy(data: bytes, block: int = 8 << 20) -> bytes:
    """`lz4 -l`: the legacy frame format Debian's kernels are packed with."""
    import lz4.block

    out = bytearray(struct.pack("<I", 0x184C2102))
    for at in range(0, len(data), block):
        chunk = lz4.block.compress(data[at : at + block], store_size=False)
        out += struct.pack("<I", len(chunk)) + chunk
    return bytes(out)
