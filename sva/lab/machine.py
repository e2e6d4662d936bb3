"""The QEMU command line of a lab guest, and the KVM-or-TCG decision.

The VMI layer relies on these properties of a lab guest:
- its RAM is one `memory-backend-file` with share=on in `<rundir>/ram`, on q35, so the
  file is the live guest memory (RAM above 2 GiB sits at GPA 4 GiB);
- QMP is a unix socket at `<rundir>/qmp.sock`;
- its NIC's traffic is mirrored to `<rundir>/mirror.sock` (filter-mirror; a client that
  connects must keep reading, or QEMU, and the guest with it, blocks on the full socket)
  and also written to `<rundir>/net.pcap` (filter-dump) so tests have it without a reader.
User networking runs with restrict=on: the guest reaches nothing outside QEMU. Its one
"remote" peer, the C2 address of the infected scenario, is a guestfwd into `<rundir>/c2.log`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sva.errors import LabError
from sva.lab import initscript
from sva.lab.kernel import KernelImage
from sva.lab.paths import cache_root, file_lock, format_mem, runtime_root
from sva.lab.scenarios import C2_ADDRESS

QEMU = "qemu-system-x86_64"
ACCELS = ("auto", "tcg", "kvm")
KVM_PROBE_TIMEOUT = 8.0  # a working KVM boots the lab kernel to its shell in well under 2 s
# no_timer_check: on a loaded host a TCG guest can miss the IO-APIC timer check at boot
# ("IO-APIC + timer doesn't work!", a panic); skipping the check is the kernel's own remedy.
KERNEL_ARGS = "console=ttyS0 panic=-1 no_timer_check"


@dataclass(frozen=True)
class RunFiles:
    """Where a lab's QEMU keeps its sockets, RAM and logs."""

    rundir: Path

    @property
    def ram(self) -> Path:
        return self.rundir / "ram"

    @property
    def qmp(self) -> Path:
        return self.rundir / "qmp.sock"

    @property
    def control(self) -> Path:
        """A second QMP monitor for the lab's own use (`lab.reset`): the first one is
        whoever watches the guest's (sva's), and a QMP socket serves one client at a time."""
        return self.rundir / "control.sock"

    @property
    def serial(self) -> Path:
        return self.rundir / "serial.sock"

    @property
    def mirror(self) -> Path:
        return self.rundir / "mirror.sock"

    @property
    def pcap(self) -> Path:
        return self.rundir / "net.pcap"

    @property
    def console_log(self) -> Path:
        return self.rundir / "console.log"

    @property
    def c2_log(self) -> Path:
        return self.rundir / "c2.log"

    @property
    def pidfile(self) -> Path:
        return self.rundir / "qemu.pid"

    @property
    def qemu_log(self) -> Path:
        return self.rundir / "qemu.log"

    @property
    def serial_lock(self) -> Path:
        return self.rundir / "serial.lock"

    @property
    def state(self) -> Path:
        return self.rundir / "state.json"


def mac_address(name: str) -> str:
    """A locally administered QEMU-style MAC that differs between lab names."""
    h = hashlib.sha256(name.encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


def qemu_opt(path: Path) -> str:
    # Inside a key=value option string QEMU escapes a comma by doubling it; plain
    # arguments (-kernel, -initrd, -pidfile) take the path as it is.
    return str(path).replace(",", ",,")


def command(
    name: str, files: RunFiles, mem_size: int, kernel: KernelImage, initrd: Path, scenario: str, accel: str
) -> list[str]:
    mem = format_mem(mem_size)
    c2_ip, c2_port = C2_ADDRESS
    argv = [
        QEMU,
        "-name", f"sva-lab-{name}",
        "-machine", f"q35,accel={accel},memory-backend=ram0",
        "-m", mem,
        "-object", f"memory-backend-file,id=ram0,size={mem},mem-path={qemu_opt(files.ram)},share=on",
        "-smp", "1",
        "-kernel", str(kernel.vmlinuz),
        "-initrd", str(initrd),
        "-append", f"{KERNEL_ARGS} sva.name={name} sva.scenario={scenario}",
        "-display", "none",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        # logfile= keeps everything the guest printed, whether or not a client is attached.
        "-chardev",
        f"socket,id=serial0,path={qemu_opt(files.serial)},server=on,wait=off,logfile={qemu_opt(files.console_log)}",
        "-serial", "chardev:serial0",
        "-qmp", f"unix:{qemu_opt(files.qmp)},server=on,wait=off",
        "-qmp", f"unix:{qemu_opt(files.control)},server=on,wait=off",
        "-netdev", f"user,id=net0,restrict=on,guestfwd=tcp:{c2_ip}:{c2_port}-chardev:c2",
        "-chardev", f"file,id=c2,path={qemu_opt(files.c2_log)}",
        # romfile= : no iPXE option ROM, which only slows down a -kernel boot.
        "-device", f"virtio-net-pci,netdev=net0,mac={mac_address(name)},romfile=",
        "-chardev", f"socket,id=mirror0,path={qemu_opt(files.mirror)},server=on,wait=off",
        "-object", "filter-mirror,id=mirror0f,netdev=net0,queue=all,outdev=mirror0",
        "-object", f"filter-dump,id=dump0,netdev=net0,file={qemu_opt(files.pcap)}",
        "-pidfile", str(files.pidfile),
        "-daemonize",
    ]
    if accel == "kvm":
        argv[argv.index("-smp"):argv.index("-smp")] = ["-cpu", "host"]
    return argv


def qemu_version() -> str:
    if shutil.which(QEMU) is None:
        raise LabError(f"lab guest: {QEMU} is not installed (apt-get install qemu-system-x86)")
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LabError(f"lab guest: `{QEMU} --version` failed: {e}") from None
    return out.splitlines()[0] if out else "unknown"


# -- accelerator ------------------------------------------------------------------------


def choose_accel(accel: str, kernel: KernelImage, initrd: Path) -> str:
    if accel not in ACCELS:
        raise LabError(f"lab guest accelerator {accel!r} is not valid; choose one of {', '.join(ACCELS)}")
    if accel != "auto":
        return accel
    return "kvm" if kvm_works(kernel, initrd) else "tcg"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def kvm_works(kernel: KernelImage, initrd: Path) -> bool:
    """Whether a lab guest really boots to its shell under KVM; cached until the host reboots.

    /dev/kvm opening is not enough: on some hosts (nested virtualization) KVM guests hang
    or abort, so this boots the real lab kernel once and waits a few seconds for it.
    """
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError:
        return False
    cache = cache_root() / "kvm-probe.json"
    key = {"boot_id": _boot_id(), "qemu": qemu_version(), "kernel": kernel.release}
    with file_lock(cache_root() / ".kvm-probe.lock", KVM_PROBE_TIMEOUT * 3 + 30, "KVM probe"):
        try:
            saved = json.loads(cache.read_text())
            if {k: saved.get(k) for k in key} == key:
                return bool(saved["kvm_works"])
        except (OSError, ValueError, KeyError):
            pass
        ok = _probe_kvm(kernel, initrd)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({**key, "kvm_works": ok, "probed_at": time.time()}, indent=2) + "\n")
        return ok


def _probe_kvm(kernel: KernelImage, initrd: Path) -> bool:
    root = runtime_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kvm-probe-", dir=root) as tmp:
        log = Path(tmp) / "console.log"
        argv = [
            QEMU, "-machine", "q35,accel=kvm", "-cpu", "host", "-m", "128M", "-smp", "1",
            "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
            "-append", f"{KERNEL_ARGS} sva.name=kvmprobe sva.scenario=clean",
            "-display", "none", "-nodefaults", "-no-user-config", "-no-reboot",
            "-chardev", f"file,id=s0,path={qemu_opt(log)}", "-serial", "chardev:s0",
        ]  # fmt: skip
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        except OSError:
            return False
        try:
            deadline = time.monotonic() + KVM_PROBE_TIMEOUT
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if initscript.READY_LINE.encode() in log.read_bytes():
                        return True
                except OSError:
                    pass
                time.sleep(0.1)
            return False
        finally:
            proc.kill()
            # A vCPU stuck in the host kernel can delay the exit; then init reaps it later.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
