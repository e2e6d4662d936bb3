"""Lab guests: boot, find, use and stop small QEMU VMs for tests and demos.

A lab lives in `<runtime>/lab/<NAME>/`: QEMU's sockets, the RAM file, logs and a
state.json that is the only record of it (there is no daemon). Every operation re-reads
that record and checks that the recorded pid is still our QEMU for that lab before it
trusts or kills it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from sva.errors import LabError, SvaError
from sva.lab import initramfs, initscript, machine, scenarios, serial
from sva.lab import kernel as kernels
from sva.lab.machine import RunFiles
from sva.lab.paths import check_name, check_socket_path, file_lock, lab_dir, labs_dir, parse_mem
from sva.lab.serial import ExecResult

STATE_FORMAT = 1
BOOT_TIMEOUT = 120.0  # TCG boots in seconds; this allows for a loaded CI machine
_QEMU_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class GuestProcess:
    """A process as the guest kernel itself reports it (/proc/PID/stat and cmdline)."""

    pid: int
    ppid: int
    comm: str
    args: str = ""  # command line, arguments joined by spaces; empty for kernel threads


@dataclass(frozen=True)
class LabGuest:
    """A lab guest as recorded in its state.json. Paths are strings, ready for sockets."""

    name: str
    pid: int  # QEMU's pid
    runtime_dir: str
    qmp_path: str
    serial_path: str
    mem_path: str  # the RAM backing file (memory-backend-file, share=on)
    mem_size: int  # bytes
    mirror_path: str  # filter-mirror of the NIC's traffic (unix socket, QEMU is the server)
    scenario: str
    accel: str  # "tcg" or "kvm", what the guest actually runs with
    kernel_path: str
    kernel_version: str  # `uname -r` of the guest kernel
    kernel_package: str | None = None  # e.g. "linux-image-6.1.0-56-cloud-amd64-unsigned 6.1.192-2"
    system_map_path: str | None = None
    initrd_path: str = ""
    console_log: str = ""  # everything the guest printed on its serial console
    pcap_path: str = ""  # filter-dump of the NIC's traffic
    c2_log: str = ""  # what the guest sent to the scenario's C2 address
    net_capture: str = "filter-mirror+filter-dump"
    mac: str = ""
    network: bool = False  # the guest brought up eth0
    network_note: str = ""
    boot_seconds: float = 0.0  # QEMU start to shell answering
    started_at: float = 0.0  # time.time() when QEMU started

    def is_running(self) -> bool:
        return _is_our_qemu(self.pid, Path(self.qmp_path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabGuest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# -- process checks ---------------------------------------------------------------------


def _is_our_qemu(pid: int, qmp_path: Path) -> bool:
    """True if `pid` is alive and is the QEMU that serves `qmp_path` (pids get reused)."""
    if pid <= 0:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat_line[stat_line.rfind(")") + 2 : stat_line.rfind(")") + 3] in ("Z", "X"):
        return False
    if not argv or not os.path.basename(argv[0]).startswith(b"qemu-system"):
        return False
    needle = os.fsencode(machine.qemu_opt(qmp_path))
    return any(needle in arg for arg in argv)


def _stop(pid: int, qmp_path: Path, name: str) -> bool:
    """SIGTERM, then SIGKILL, our QEMU; False if it was not running."""
    if not _is_our_qemu(pid, qmp_path):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            raise LabError(f"lab {name}: not allowed to signal its qemu (pid {pid})") from None
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline:
            _reap(pid)
            if not _is_our_qemu(pid, qmp_path):
                return True
            time.sleep(0.05)
    raise LabError(f"lab {name}: its qemu (pid {pid}) survived SIGKILL for {_STOP_TIMEOUT:.0f}s")


def _reap(pid: int) -> None:
    # Normally not our child (QEMU daemonizes) and init reaps it.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# -- state ------------------------------------------------------------------------------


def _read_state(name: str) -> LabGuest | None:
    path = RunFiles(lab_dir(name)).state
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LabError(f"lab {name}: unreadable state file {path}: {e}") from None
    try:
        return LabGuest.from_dict(data)
    except TypeError as e:
        raise LabError(f"lab {name}: state file {path} is incomplete: {e}") from None


def _write_state(guest: LabGuest, files: RunFiles, argv: list[str]) -> None:
    tmp = files.state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"format": STATE_FORMAT, **guest.to_dict(), "qemu_argv": argv}, indent=2) + "\n")
    os.replace(tmp, files.state)


def _lab_lock(name: str) -> AbstractContextManager[None]:
    return file_lock(labs_dir() / f".{name}.lock", 60.0, f"lab {name}")


def _console_tail(files: RunFiles, lines: int = 20) -> str:
    try:
        text = files.console_log.read_bytes()[-16384:].decode("utf-8", "replace").replace("\r", "")
    except OSError:
        return "(no console output)"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"  | {line}" for line in tail) or "(no console output)"


def _remove_rundir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        raise LabError(f"could not remove lab runtime dir {path}")


# -- public API -------------------------------------------------------------------------


def up(
    name: str,
    scenario: str = "clean",
    mem: str | int = "256M",
    kernel: str = "auto",
    initrd_extra: str | Path | None = None,
    accel: str = "auto",
    timeout: float = BOOT_TIMEOUT,
) -> LabGuest:
    """Boot lab guest `name` and wait until its console shell answers."""
    check_name(name)
    mem_size = parse_mem(mem)
    scenarios.get(scenario)
    if accel not in machine.ACCELS:
        raise LabError(f"lab guest accelerator {accel!r} is not valid; choose one of {', '.join(machine.ACCELS)}")
    if kernels.debian_flavour(kernel) is None and not Path(kernel).is_file():
        raise LabError(f"kernel {kernel}: no such file (or use auto, debian:cloud, debian:generic)")
    extra = Path(initrd_extra) if initrd_extra is not None else None
    if extra is not None and not extra.is_dir():
        raise LabError(f"--initrd-extra {extra}: not a directory")
    existing = _read_state(name) if lab_dir(name).exists() else None
    if existing and existing.is_running():
        raise LabError(f"lab {name} is already running (qemu pid {existing.pid}); run `sva lab down {name}` first")
    machine.qemu_version()

    image = kernels.resolve(kernel)
    initrd = initramfs.build(image, extra)
    real_accel = machine.choose_accel(accel, image, initrd)

    with _lab_lock(name):
        rundir = lab_dir(name)
        files = RunFiles(rundir)
        if rundir.exists():
            old = _read_state(name)
            if old and old.is_running():
                raise LabError(f"lab {name} is already running (qemu pid {old.pid}); run `sva lab down {name}` first")
            _remove_rundir(rundir)  # a lab whose qemu died: its leftovers go
        for sock in (files.qmp, files.control, files.serial, files.mirror):
            check_socket_path(sock)
        labs_dir().mkdir(parents=True, exist_ok=True)
        rundir.mkdir(mode=0o700)
        try:
            return _boot(name, files, mem_size, image, initrd, scenario, real_accel, timeout)
        except BaseException:
            pid = _read_pid(files)
            if pid:
                with contextlib.suppress(LabError):  # the boot error matters more
                    _stop(pid, files.qmp, name)
            _remove_rundir(rundir)
            raise


def _read_pid(files: RunFiles) -> int:
    try:
        return int(files.pidfile.read_text().strip())
    except (OSError, ValueError):
        return 0


def _boot(
    name: str,
    files: RunFiles,
    mem_size: int,
    image: kernels.KernelImage,
    initrd: Path,
    scenario: str,
    accel: str,
    timeout: float,
) -> LabGuest:
    argv = machine.command(name, files, mem_size, image, initrd, scenario, accel)
    started = time.time()
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=_QEMU_START_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"lab {name}: qemu did not finish starting within {_QEMU_START_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        msg = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise LabError(f"lab {name}: qemu failed to start (status {proc.returncode}): {msg}")
    pid = _read_pid(files)
    if not pid:
        raise LabError(f"lab {name}: qemu started but wrote no pid to {files.pidfile}")
    guest = LabGuest(
        name=name,
        pid=pid,
        runtime_dir=str(files.rundir),
        qmp_path=str(files.qmp),
        serial_path=str(files.serial),
        mem_path=str(files.ram),
        mem_size=mem_size,
        mirror_path=str(files.mirror),
        scenario=scenario,
        accel=accel,
        kernel_path=str(image.vmlinuz),
        kernel_version=image.release,
        kernel_package=f"{image.package} {image.package_version}" if image.package else None,
        system_map_path=str(image.system_map) if image.system_map else None,
        initrd_path=str(initrd),
        console_log=str(files.console_log),
        pcap_path=str(files.pcap),
        c2_log=str(files.c2_log),
        mac=machine.mac_address(name),
        network_note=image.network_note,
        started_at=started,
    )
    # Recorded before the wait, so a lab whose `up` was interrupted can still be found and stopped.
    _write_state(guest, files, argv)
    ready = _wait_ready(guest, files, t0 + timeout, timeout)
    network = "net=on" in ready
    note = image.network_note if network else f"guest has no eth0 ({image.network_note})"
    guest = LabGuest.from_dict(
        {**guest.to_dict(), "network": network, "network_note": note, "boot_seconds": round(time.monotonic() - t0, 3)}
    )
    _write_state(guest, files, argv)
    return guest


def _wait_ready(guest: LabGuest, files: RunFiles, deadline: float, timeout: float) -> str:
    """Wait for init's ready line, then for the console shell to run a command. Returns the line."""
    marker = initscript.READY_LINE.encode()
    ready = b""
    while True:
        if not guest.is_running():
            raise LabError(
                f"lab {guest.name}: qemu exited during boot (kernel panic or QEMU error); "
                f"last console lines:\n{_console_tail(files)}"
            )
        if not ready:
            try:
                log = files.console_log.read_bytes()
            except FileNotFoundError:
                log = b""
            at = log.find(marker)
            if at >= 0 and b"\n" in log[at:]:
                ready = log[at : log.index(b"\n", at)].strip()
        if ready:
            wait = min(5.0, max(0.5, deadline - time.monotonic()))
            try:
                result = serial.execute(files.serial, files.serial_lock, guest.name, "echo ok", wait)
                if result.status == 0 and result.output.strip() == "ok":
                    return ready.decode("utf-8", "replace")
            except LabError:
                pass  # the shell may be between restarts; try again until the deadline
        if time.monotonic() >= deadline:
            raise LabError(
                f"lab {guest.name}: guest shell did not answer on the serial console within {timeout:g}s; "
                f"last console lines:\n{_console_tail(files)}"
            )
        time.sleep(0.1)


def get(name: str) -> LabGuest:
    """The running lab guest `name`; LabError if there is none."""
    check_name(name)
    guest = _read_state(name)
    if guest is None:
        raise LabError(f"no lab guest named {name!r} (see `sva lab list`)")
    if not guest.is_running():
        raise LabError(
            f"lab {name}: its qemu (pid {guest.pid}) is no longer running; `sva lab down {name}` cleans it up"
        )
    return guest


def list_guests(include_stopped: bool = False) -> list[LabGuest]:
    """Recorded lab guests, by name; only running ones unless `include_stopped`."""
    root = labs_dir()
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            guest = _read_state(entry.name)
        except LabError:
            continue
        if guest and (include_stopped or guest.is_running()):
            found.append(guest)
    return found


def down(name: str) -> bool:
    """Stop lab guest `name` and remove its runtime dir. True if a running qemu was stopped."""
    check_name(name)
    rundir = lab_dir(name)
    with _lab_lock(name):
        if not rundir.exists():
            raise LabError(f"no lab guest named {name!r} (see `sva lab list`)")
        files = RunFiles(rundir)
        try:
            guest = _read_state(name)
        except LabError:
            guest = None  # a corrupt record: the pid file still identifies the qemu
        pid = guest.pid if guest else _read_pid(files)
        stopped = _stop(pid, files.qmp, name) if pid else False
        _remove_rundir(rundir)
        return stopped


def reset(name: str) -> None:
    """Reset lab guest `name` in place, like the reset button: the same QEMU and RAM file,
    a new boot of its kernel and scenario (through the lab's control monitor, so it works
    while sva holds the guest's QMP socket)."""
    from sva.vmi.qmp import QmpClient

    guest = get(name)
    if not guest.is_running():
        raise LabError(f"lab {name} is not running")
    control = RunFiles(lab_dir(name)).control
    try:
        with QmpClient(str(control), timeout=10) as qmp:
            qmp.execute("set-action", {"reboot": "reset"})  # -no-reboot would make a reset exit QEMU
            qmp.execute("system_reset")
    except SvaError as e:
        raise LabError(f"lab {name}: cannot reset through {control}: {e}") from None


def exec_in(name: str, command: str, timeout: float = 30.0) -> ExecResult:
    """Run a shell command in the guest; its combined output and exit status."""
    guest = get(name)
    files = RunFiles(Path(guest.runtime_dir))
    try:
        return serial.execute(files.serial, files.serial_lock, name, command, timeout)
    except LabError:
        if not guest.is_running():
            raise LabError(f"lab {name}: its qemu (pid {guest.pid}) exited while running a command") from None
        raise


# Reads /proc with shell builtins where it can: every fork costs time under TCG.
_PS_SCRIPT = r"""echo "self $$"
for d in /proc/[0-9]*; do
  read -r s < "$d/stat" 2>/dev/null || continue
  printf 'P %s\n' "$s"
  printf 'A '; tr '\0' ' ' < "$d/cmdline"; echo
done 2>/dev/null
true
"""


def ps(name: str, timeout: float = 30.0) -> list[GuestProcess]:
    """The guest's processes as its own kernel reports them, without the ones this call starts."""
    result = exec_in(name, _PS_SCRIPT, timeout)
    if result.status != 0:
        raise LabError(f"lab {name}: listing processes failed (status {result.status}): {result.output[-200:]}")
    return parse_ps(result.output, name)


def parse_ps(output: str, name: str = "?") -> list[GuestProcess]:
    self_pid = -1
    procs: dict[int, GuestProcess] = {}
    last: int | None = None
    for line in output.splitlines():
        if line.startswith("self "):
            self_pid = int(line.split()[1])
        elif line.startswith("P "):
            stat_line = line[2:]
            open_at, close_at = stat_line.find("("), stat_line.rfind(")")
            rest = stat_line[close_at + 1 :].split()
            if open_at < 0 or close_at < open_at or len(rest) < 2:
                raise LabError(f"lab {name}: unexpected /proc/PID/stat line from the guest: {stat_line[:120]!r}")
            pid = int(stat_line[:open_at])
            procs[pid] = GuestProcess(pid=pid, ppid=int(rest[1]), comm=stat_line[open_at + 1 : close_at])
            last = pid
        elif line.startswith("A ") and last is not None:
            p = procs[last]
            procs[last] = GuestProcess(p.pid, p.ppid, p.comm, line[2:].rstrip())
    # Our own `sh -c` and what it forked are not part of the guest's picture.
    return [p for p in sorted(procs.values(), key=lambda p: p.pid) if self_pid not in (p.pid, p.ppid)]
