"""The child process that holds LibVMI, and the pipe protocol the appliance speaks to it.

LibVMI is C, and some of its failure paths crash the process that calls it (on a missing
file, `vmi_init`'s clean-up runs the File driver's destroy twice and segfaults). So the
appliance never loads it: it runs this file as a child (`python libvmi_worker.py`, by
path, so it needs nothing of sva on its import path) and turns a dead child into a
TargetError.

Protocol, over the child's stdin (requests) and its original stdout (answers):
  request  = u32 big-endian length + JSON object {"op": ..., arguments}
  answer   = u32 big-endian length + one kind byte + body
             b"J" JSON result | b"B" raw bytes | b"E" JSON {"kind", "message", ...}
The first answer is unsolicited: a hello {"protocol", "pid", "python"} or, when the
libvmi package cannot be imported, an error of kind "import". A request `sync` echoes a
token: after an exchange was cut short the parent finds the frame boundary again by it.

LibVMI prints its errors (and the odd stray byte) to stdout, which would corrupt the
answers; so the child moves the answer channel to a private descriptor and points fd 1 at
stderr before importing LibVMI. The parent keeps that output to quote it in errors.

Binding defects of the PyPI `libvmi` 3.7.1 package worked around here:
- `AccessContext.to_ffi` sets `pid` after `dtb`, which share a union, so the page-table
  base it passes is zeroed; and it never sets the ABI `version` (1 in LibVMI 0.15), so
  LibVMI prints "access context version mismatch".
  `_kernel_context` fills `access_context_t` itself (version 1, only the union member
  the translation mechanism reads).
- `Libvmi.read_ksym` converts with `ffi.string`, cutting the data at its first NUL byte.
  `read_ksym` here translates the symbol and reads through `_kernel_context`.
- `Libvmi.get_va_pages` reads a `dtb` field `page_info_t` does not have (AttributeError).
  Nothing here needs it.
- The register numbers LibVMI has for IDTR/GDTR are not in the binding's cdef; `_REG`
  holds them as libvmi.h defines them (cross-checked against the ones it does export).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

PROTOCOL = 1
HEADER = struct.Struct(">I")
MAX_REQUEST = 1 << 20  # a JSON request is small; anything bigger is a broken pipe
MAX_CHUNK = 16 << 20  # bytes one read request may ask for
KIND_JSON, KIND_BYTES, KIND_ERROR = b"J", b"B", b"E"

ACCESS_CONTEXT_VERSION = 1  # libvmi.h; the binding's cdef does not export it
# LibVMI reg_t numbers from libvmi.h that the binding's cdef leaves out.
_REG = {"idtr_limit": 45, "gdtr_limit": 46, "idtr_base": 55, "gdtr_base": 56}
_REG_CHECK = {"CR3": 20, "MSR_EFER": 74}  # exported ones: if these moved, so did _REG
_REG_OK = True  # cleared at start-up when _REG_CHECK does not hold

# What LibVMI's init errors mean for the appliance's user.
_OPEN_HINTS = {
    "DRIVER_NOT_DETECTED": "no LibVMI driver recognises the target",
    "DRIVER": "the driver could not start; for Xen: run in dom0, with /dev/xen and xenstore reachable",
    "VM_NOT_FOUND": "no such domain",
}

MAX_TASKS = 1 << 16  # a task list longer than this is a corrupt or hostile guest
WALK_SECONDS = 10.0
TASK_COMM_LEN = 16


class WorkerError(Exception):
    """An error to send back as an E answer."""

    def __init__(self, kind: str, message: str, **data: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.data = data


# -- framing (used by both sides) --------------------------------------------------------


def encode_request(op: str, **args: Any) -> bytes:
    body = json.dumps({"op": op, **args}).encode()
    return HEADER.pack(len(body)) + body


def encode_answer(kind: bytes, body: bytes) -> bytes:
    return HEADER.pack(len(body) + 1) + kind + body


def _read_exact(fd: int, n: int) -> bytes | None:
    """n bytes from fd, or None at end of file."""
    chunks: list[bytes] = []
    while n > 0:
        got = os.read(fd, min(n, 1 << 20))
        if not got:
            return None
        chunks.append(got)
        n -= len(got)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# -- LibVMI session ----------------------------------------------------------------------


def open_libvmi(driver: str, name: str) -> Any:
    """A `libvmi.Libvmi` for a raw memory file (driver "file") or a Xen domain ("xen").

    Partial init: the driver only. Paging is set up here for Xen (from the vCPU's
    control registers); for a file LibVMI can only do it with an OS, in `init_linux`.
    """
    from libvmi import INIT_DOMAINNAME, Libvmi, VMIMode

    mode = {"file": VMIMode.FILE, "xen": VMIMode.XEN}.get(driver)
    if mode is None:
        raise WorkerError("usage", f"unknown LibVMI driver {driver!r}")
    vmi = Libvmi(name, init_flags=INIT_DOMAINNAME, mode=mode, partial=True)
    if driver == "xen":
        vmi.init_paging(0)
    return vmi


class Session:
    """One LibVMI instance and the operations the appliance asks of it."""

    def __init__(self, open_vmi: Callable[[str, str], Any]) -> None:
        self.open_vmi = open_vmi
        self.vmi: Any = None
        self.driver = ""
        self.kpgd = 0
        self.offsets: dict[str, int] = {}

    def _need(self) -> Any:
        if self.vmi is None:
            raise WorkerError("usage", "no LibVMI instance is open")
        return self.vmi

    def op_open(self, driver: str, name: str) -> dict[str, Any]:
        if self.vmi is not None:
            raise WorkerError("usage", "a LibVMI instance is already open")
        try:
            self.vmi = self.open_vmi(driver, name)
        except WorkerError:
            raise
        except Exception as e:  # LibvmiError carries the init error's name only
            hint = _OPEN_HINTS.get(str(e), "")
            raise WorkerError(
                "open", f"LibVMI could not open {driver} target {name!r}: {e}" + (f" ({hint})" if hint else "")
            ) from None
        self.driver = driver
        vmi = self.vmi
        return {
            "memsize": int(vmi.get_memsize()),
            "max_physical_address": int(vmi.get_max_physical_address()),
            "vcpus": int(vmi.get_num_vcpus()),
            "page_mode": _page_mode_name(vmi),
        }

    def op_read_pa(self, addr: int, size: int) -> bytes:
        vmi = self._need()
        if not 0 <= size <= MAX_CHUNK or addr < 0:
            raise WorkerError("usage", f"read of {size} bytes at {addr:#x} refused")
        # padding=True returns what was read even on failure: short means it failed there.
        data, got = vmi.read_pa(addr, size, padding=True)
        if got < size:
            raise WorkerError("memory", f"LibVMI could not read guest-physical {addr + got:#x}", addr=addr + got)
        return bytes(data)

    def op_regs(self, vcpu: int) -> dict[str, int]:
        vmi = self._need()
        if not _REG_OK:
            raise WorkerError("registers", "this libvmi build numbers its registers differently than libvmi.h 0.15")
        try:
            regs = vmi.get_vcpuregs(vcpu).cffi_regs.x86
            out = {
                name: int(getattr(regs, name))
                for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10",
                             "r11", "r12", "r13", "r14", "r15", "rip", "rflags", "cr0", "cr2", "cr3",
                             "cr4", "msr_efer", "fs_base", "gs_base")  # fmt: skip
            }
            for name, reg in _REG.items():
                out[name] = int(vmi.get_vcpureg(reg, vcpu))
        except WorkerError:
            raise
        except Exception as e:
            raise WorkerError("registers", f"LibVMI could not read the registers of vCPU {vcpu}: {e}") from None
        return out

    def op_pause(self) -> dict[str, Any]:
        try:
            self._need().pause_vm()
        except WorkerError:
            raise
        except Exception as e:
            raise WorkerError("control", f"LibVMI could not pause the guest: {e}") from None
        return {}

    def op_resume(self) -> dict[str, Any]:
        try:
            self._need().resume_vm()
        except WorkerError:
            raise
        except Exception as e:
            raise WorkerError("control", f"LibVMI could not resume the guest: {e}") from None
        return {}

    # -- Linux ------------------------------------------------------------------------

    def op_init_linux(self, config: str) -> dict[str, Any]:
        from libvmi import LibvmiInitError, VMIConfig

        vmi = self._need()
        ostype, err = vmi.init_os(VMIConfig.STRING, config)
        if ostype.name != "LINUX":
            try:
                why = LibvmiInitError(err).name
            except ValueError:
                why = str(err)
            raise WorkerError("os", f"LibVMI could not initialise Linux (init error {why})")
        info = {name: int(vmi.get_offset(name)) for name in
                ("kpgd", "linux_kaslr", "linux_init_task", "linux_tasks", "linux_mm", "linux_pid",
                 "linux_name", "linux_pgd")}  # fmt: skip
        self.kpgd = info["kpgd"]
        self.offsets = info
        info["page_mode"] = _page_mode_name(vmi)
        return info

    def _kernel_context(self, addr: int) -> Any:
        """An access_context_t for a kernel virtual address, filled correctly."""
        from _libvmi import ffi, lib

        ctx = ffi.new("access_context_t *")
        ctx.version = ACCESS_CONTEXT_VERSION
        ctx.translate_mechanism = lib.VMI_TM_PROCESS_DTB
        ctx.addr = addr
        ctx.dtb = self.kpgd  # and nothing after it: pid shares this union
        return ctx

    def read_kernel(self, addr: int, size: int) -> bytes:
        from _libvmi import ffi, lib

        vmi = self._need()
        if not self.kpgd:
            raise WorkerError("usage", "kernel virtual reads need init_linux first")
        buf = ffi.new("char[]", size)
        got = ffi.new("size_t *")
        status = lib.vmi_read(vmi.vmi, self._kernel_context(addr), size, buf, got)
        if status != lib.VMI_SUCCESS or got[0] != size:
            raise WorkerError("memory", f"LibVMI could not read kernel address {addr + got[0]:#x}", addr=addr + got[0])
        return bytes(ffi.buffer(buf, size))

    def op_read_kernel(self, addr: int, size: int) -> bytes:
        if not 0 <= size <= MAX_CHUNK:
            raise WorkerError("usage", f"read of {size} bytes refused")
        return self.read_kernel(addr, size)

    def op_read_ksym(self, name: str, size: int) -> bytes:
        vmi = self._need()
        if not 0 <= size <= MAX_CHUNK:
            raise WorkerError("usage", f"read of {size} bytes refused")
        try:
            addr = vmi.translate_ksym2v(name)
        except Exception:
            raise WorkerError("symbol", f"LibVMI does not know kernel symbol {name!r}") from None
        return self.read_kernel(addr, size)

    def op_processes(self, limit: int = MAX_TASKS, seconds: float = WALK_SECONDS) -> dict[str, Any]:
        """Walk init_task.tasks with the offsets and addresses LibVMI's Linux support holds.

        Each process's page-table base comes from LibVMI's own pid lookup (`pid_to_dtb`);
        kernel threads have no mm and get none. Bounded in entries and time; a cycle that
        does not return to init_task is reported, not followed.
        """
        vmi = self._need()
        if not self.offsets:
            raise WorkerError("usage", "the process list needs init_linux first")
        o = self.offsets
        limit = max(1, min(int(limit), MAX_TASKS))
        deadline = time.monotonic() + min(float(seconds), 60.0)
        init_task = o["linux_init_task"]
        head = init_task + o["linux_tasks"]
        task, seen, out = init_task, set(), []
        while True:
            if task in seen:
                raise WorkerError("walk", f"task list loops at {task:#x} without returning to init_task")
            if len(out) >= limit:
                raise WorkerError("walk", f"task list longer than {limit} entries")
            if time.monotonic() > deadline:
                raise WorkerError("walk", f"task list walk took longer than {seconds} s")
            seen.add(task)
            pid = int.from_bytes(self.read_kernel(task + o["linux_pid"], 4), "little", signed=True)
            comm = self.read_kernel(task + o["linux_name"], TASK_COMM_LEN).split(b"\0", 1)[0]
            mm = int.from_bytes(self.read_kernel(task + o["linux_mm"], 8), "little")
            dtb = None
            if mm and pid > 0:
                try:
                    dtb = int(vmi.pid_to_dtb(pid))
                except Exception:
                    dtb = None
            out.append({"pid": pid, "comm": comm.decode("utf-8", "backslashreplace"), "task": task, "mm": mm,
                        "dtb": dtb})  # fmt: skip
            nxt = int.from_bytes(self.read_kernel(task + o["linux_tasks"], 8), "little")
            if nxt == head:
                break
            task = nxt - o["linux_tasks"]
        return {"processes": out}

    # -- lifetime ---------------------------------------------------------------------

    def op_sync(self, token: str) -> dict[str, Any]:
        """Echo a token: the parent finds the answer stream's frame boundary again by it."""
        return {"sync": token}

    def op_close(self) -> dict[str, Any]:
        if self.vmi is not None:
            vmi, self.vmi = self.vmi, None
            vmi.destroy()
        return {}

    def op__debug_abort(self) -> dict[str, Any]:
        """Crash on purpose, as LibVMI's own faults do: tests prove the parent survives."""
        os.abort()


def _page_mode_name(vmi: Any) -> str:
    try:
        return str(vmi.get_page_mode(0).name)
    except Exception:
        return "UNKNOWN"


def serve(req_fd: int, ans_fd: int, open_vmi: Callable[[str, str], Any] = open_libvmi) -> int:
    """Answer requests until close or end of input; returns the exit status."""
    session = Session(open_vmi)
    while True:
        head = _read_exact(req_fd, HEADER.size)
        if head is None:
            session.op_close()
            return 0
        (n,) = HEADER.unpack(head)
        if n > MAX_REQUEST:
            return 2
        body = _read_exact(req_fd, n)
        if body is None:
            return 2
        op = "?"
        try:
            request = json.loads(body)
            op = str(request.pop("op"))
            handler = getattr(session, f"op_{op}", None)
            if handler is None:
                raise WorkerError("usage", f"unknown request {op!r}")
            result = handler(**request)
            if isinstance(result, bytes):
                answer = encode_answer(KIND_BYTES, result)
            else:
                answer = encode_answer(KIND_JSON, json.dumps(result).encode())
        except WorkerError as e:
            answer = encode_answer(KIND_ERROR, json.dumps({"kind": e.kind, "message": str(e), **e.data}).encode())
        except Exception as e:  # a bug or a binding surprise: report it, keep serving
            answer = encode_answer(
                KIND_ERROR, json.dumps({"kind": "internal", "message": f"{op}: {type(e).__name__}: {e}"}).encode()
            )
        try:
            _write_all(ans_fd, answer)
        except BrokenPipeError:  # the appliance went away: so do we
            session.op_close()
            return 0
        if op == "close":
            return 0


def _hello(ans_fd: int, check_binding: bool) -> bool:
    """Say hello; with `check_binding`, first import the binding, or say why it cannot be."""
    global _REG_OK
    if check_binding:
        try:
            import libvmi  # noqa: F401  (the package the parent asked for)
            from _libvmi import lib
        except ImportError as e:
            err = {"kind": "import", "message": str(e), "python": sys.version.split()[0]}
            _write_all(ans_fd, encode_answer(KIND_ERROR, json.dumps(err).encode()))
            return False
        _REG_OK = all(getattr(lib, name, None) == value for name, value in _REG_CHECK.items())
    hello = {"protocol": PROTOCOL, "pid": os.getpid(), "python": sys.version.split()[0]}
    _write_all(ans_fd, encode_answer(KIND_JSON, json.dumps(hello).encode()))
    return True


def main(open_vmi: Callable[[str, str], Any] | None = None) -> int:
    """Run as the worker on fds 0/1/2. `open_vmi` replaces LibVMI (test stand-ins only)."""
    # Ctrl-C in the appliance's terminal reaches us too; the parent decides (and it may
    # still need us to resume a paused guest).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
    ans_fd = os.dup(1)
    os.dup2(2, 1)  # LibVMI writes errors to stdout: keep them out of the answers
    if not _hello(ans_fd, check_binding=open_vmi is None):
        return 0
    return serve(0, ans_fd, open_vmi or open_libvmi)


if __name__ == "__main__":
    sys.exit(main())
