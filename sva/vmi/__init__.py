"""VMI access layer: one `Backend` protocol over live QEMU guests and snapshot files.

Targets are strings:
  qemu:/path/to/qmp.sock   a running QEMU with RAM in a shared memory-backend-file
  lab:NAME                 a running lab guest (resolved to its QMP socket)
  file:/path               a snapshot, format detected (raw, QEMU ELF core, LiME)
  raw:/path, elf:/path, lime:/path   a snapshot of that format
  libvmi:DOMAIN            a Xen domain through LibVMI (needs the libvmi extra)
  libvmi+file:/path        a raw image through LibVMI's File driver
  ivshmem:BDF|PATH?qmp=Q   inside the appliance VM: RAM from an ivshmem BAR, QMP via the proxy
A bare path is taken as qemu: when it is a unix socket and as file: otherwise.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from sva.errors import TargetError
from sva.vmi.base import (
    Backend,
    Capabilities,
    MappedBackend,
    MemoryMap,
    MemoryRegion,
    PauseRecord,
    Registers,
)

if TYPE_CHECKING:
    from sva.vmi.libvmi_backend import LibvmiBackend

SNAPSHOT_SCHEMES = {"file": "auto", "raw": "raw", "elf": "elf", "lime": "lime"}
LIBVMI_SCHEMES = ("libvmi", "libvmi+file")
SCHEMES = ("qemu", "lab", "ivshmem", *SNAPSHOT_SCHEMES, *LIBVMI_SCHEMES)

__all__ = [
    "Backend",
    "Capabilities",
    "MappedBackend",
    "MemoryMap",
    "MemoryRegion",
    "PauseRecord",
    "Registers",
    "open_target",
]


def open_target(spec: str, timeout: float = 5.0) -> MappedBackend | LibvmiBackend:
    """Open a VMI target string (see the module doc) as a read-only backend."""
    if not spec:
        raise TargetError("''", "empty target; use qemu:SOCKET, lab:NAME or file:PATH")
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in SCHEMES:
        try:
            is_sock = stat.S_ISSOCK(os.stat(spec).st_mode)
        except OSError:
            raise TargetError(
                spec, f"unknown target; use one of {', '.join(s + ':' for s in SCHEMES)} or an existing path"
            ) from None
        scheme, rest = ("qemu" if is_sock else "file"), spec
    if not rest:
        raise TargetError(spec, f"{scheme}: needs a {'name' if scheme in ('lab', 'libvmi') else 'path'}")
    if scheme == "qemu":
        from sva.vmi.qemu import QemuBackend

        return QemuBackend(rest, target=spec, timeout=timeout)
    if scheme == "lab":
        from sva import lab
        from sva.vmi.qemu import QemuBackend

        return QemuBackend(lab.get(rest).qmp_path, target=spec, timeout=timeout)
    if scheme == "ivshmem":
        from sva.vmi.ivshmem import open_ivshmem_target

        return open_ivshmem_target(rest, target=spec, timeout=timeout)
    if scheme in LIBVMI_SCHEMES:
        from sva.vmi.libvmi_backend import open_libvmi_target

        return open_libvmi_target(scheme, rest, target=spec, timeout=timeout)
    from sva.vmi.snapshot import open_snapshot

    return open_snapshot(rest, target=spec, format=SNAPSHOT_SCHEMES[scheme])
