"""The guest's processes and kernel modules, read with volatility3 from outside the guest.

Guest structures are hostile: the task list walk is bounded in count, strings in length,
and a task whose fields cannot be read yields what could be read (and `None` for the
rest) instead of stopping the walk.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from sva.engine.facts import ProcessInfo
from sva.errors import SvaError
from sva.guest.context import GuestContext

MAX_TASKS = 65536
MAX_ARGV_BYTES = 4096
MAX_MODULES = 4096


def canonical(address: int) -> int:
    """volatility3 keeps 48-bit addresses; show kernel ones as the CPU does (sign-extended)."""
    return address | 0xFFFF000000000000 if address & (1 << 47) else address


def _string(obj: object, length: int) -> str:
    return str(obj.cast("string", max_length=length, errors="replace"))  # type: ignore[attr-defined]


def _argv(gc: GuestContext, task: object) -> tuple[str, ...]:
    """argv from the process's own memory (mm->arg_start..arg_end), bounded."""
    try:
        mm = task.mm  # type: ignore[attr-defined]
        if not mm:
            return ()
        start, end = int(mm.arg_start), int(mm.arg_end)
        if not 0 < end - start:
            return ()
        layer_name = task.add_process_layer()  # type: ignore[attr-defined]
        if layer_name is None:
            return ()
        size = min(end - start, MAX_ARGV_BYTES)
        data = gc.context.layers[layer_name].read(start, size, pad=True)
    except Exception:  # noqa: BLE001 - any unreadable field of a hostile task
        return ()
    parts = data.rstrip(b"\0").split(b"\0")
    return tuple(p.decode("utf-8", "replace") for p in parts)


def _exe(gc: GuestContext, task: object) -> tuple[str | None, bool]:
    """The mapped executable's path and whether it was deleted."""
    from volatility3.framework.symbols.linux import LinuxUtilities

    try:
        mm = task.mm  # type: ignore[attr-defined]
        if not mm or not mm.exe_file:
            return None, False
        exe_file = mm.exe_file.dereference()
        path = LinuxUtilities.path_for_file(gc.context, task, exe_file)
        dentry = exe_file.f_path.dentry.dereference()
        # An unlinked file's dentry is unhashed (d_hash.pprev is NULL).
        deleted = not int(dentry.d_hash.pprev) and path not in ("/", "")
    except Exception:  # noqa: BLE001
        return None, False
    return (path or None), bool(deleted)


def _uid(task: object) -> int | None:
    try:
        uid = task.cred.dereference().uid  # type: ignore[attr-defined]
        # volatility3's cred extension already unwraps kuid_t on some versions.
        return int(uid if isinstance(uid, int) else uid.val)
    except Exception:  # noqa: BLE001
        return None


def list_processes(gc: GuestContext, details: bool = True) -> tuple[ProcessInfo, ...]:
    """Every task on the kernel's task list (thread-group leaders), sorted by pid."""
    from volatility3.plugins.linux import pslist

    out: list[ProcessInfo] = []
    tasks = pslist.PsList.list_tasks(gc.context, gc.module.name)
    for task in itertools.islice(tasks, MAX_TASKS):
        try:
            pid = int(task.pid)
            comm = _string(task.comm, 16)
        except Exception:  # noqa: BLE001 - a task we cannot even name is skipped
            continue
        try:
            ppid = int(task.real_parent.tgid) if task.real_parent else 0
        except Exception:  # noqa: BLE001
            ppid = -1
        try:
            start = int(task.start_time)
        except Exception:  # noqa: BLE001
            start = None
        argv: tuple[str, ...] = ()
        exe, deleted = None, False
        if details:
            argv = _argv(gc, task)
            exe, deleted = _exe(gc, task)
        out.append(
            ProcessInfo(
                pid=pid,
                ppid=ppid,
                comm=comm,
                argv=argv,
                uid=_uid(task),
                exe=exe,
                exe_deleted=deleted,
                start_time=start,
                task_address=canonical(int(task.vol.offset)),
            )
        )
    return tuple(sorted(out, key=lambda p: p.pid))


@dataclass(frozen=True)
class KernelModule:
    name: str
    address: int
    size: int | None


def list_modules(gc: GuestContext) -> tuple[KernelModule, ...]:
    """Modules on the kernel's module list."""
    from volatility3.framework.symbols.linux.utilities.modules import Modules

    out: list[KernelModule] = []
    for mod in itertools.islice(Modules.list_modules(gc.context, gc.module.name), MAX_MODULES):
        try:
            name = mod.get_name() or "?"
        except Exception:  # noqa: BLE001
            name = "?"
        try:
            size: int | None = int(mod.get_core_size())
        except Exception:  # noqa: BLE001
            size = None
        out.append(KernelModule(str(name), canonical(int(mod.vol.offset)), size))
    return tuple(out)


def unavailable_reason(e: BaseException) -> str:
    return str(e) if isinstance(e, SvaError) else f"{type(e).__name__}: {e}"
