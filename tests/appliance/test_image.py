"""The appliance image end to end: build it, boot it under QEMU (TCG) next to a lab guest,
and receive a detection about that guest from the appliance's bus on the host.

What is real here: the image from appliance/build-image.sh (cached under
/var/cache/sva/appliance; the first build downloads Debian packages and takes ~2 min), its
read-only root and config disk, the lab guest's RAM attached read-only through
`ivshmem-plain` over `memory-backend-file,readonly=on`, QMP reached through a slirp
`guestfwd` (one socat per connection on the host), the sva service under systemd inside,
and a CurveZMQ subscriber on the host over `hostfwd`. It is slow (boot + Python under TCG):
run it alone with

    .venv/bin/pytest -q -m appliance tests/appliance/test_image.py
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sva import lab
from sva.bus import BusSubscriber, security_from_keys_dir
from sva.bus.keys import generate

pytestmark = [pytest.mark.lab, pytest.mark.appliance, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "appliance" / "build-image.sh"
SVA = Path(sys.executable).with_name(
    "sva"
)  # the checkout's CLI, for the host-side proxy
SVA_UID = 990  # appliance/build-image.sh creates the sva user with this uid
QMP_FWD = (
    "10.0.2.100",
    4444,
)  # where the appliance finds the guest's QMP (slirp guestfwd)
BUILD_TIMEOUT = 1200.0
DETECTION_TIMEOUT = 900.0
FW_MARK = "sva-test-fw-drop: "  # boot + first cycle under TCG, on a shared 2-core machine


@dataclass(frozen=True)
class Image:
    dir: Path
    build_seconds: float

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.img"


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def image() -> Image:
    if os.geteuid() != 0:
        pytest.skip(
            "building the image needs root (mmdebstrap, chroot, file ownership)"
        )
    for tool in ("qemu-system-x86_64", "mkfs.ext4"):
        _need(tool)
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(BUILD)], check=False, capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        offline = ("Could not resolve", "Temporary failure resolving", "Failed to fetch", "Unable to connect")
        if "mmdebstrap failed" in proc.stderr and any(m in proc.stderr for m in offline):
            pytest.skip(
                f"Debian's mirror is unreachable: {proc.stderr.strip().splitlines()[-1]}"
            )
        pytest.fail(
            f"build-image.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    out = Path(proc.stdout.strip().splitlines()[-1])
    for f in ("rootfs.img", "vmlinuz", "initrd.img"):
        assert (out / f).is_file(), f"build-image.sh made no {f} in {out}"
    print(f"\nappliance image {out} ready in {seconds:.0f} s")
    return Image(out, seconds)


@pytest.fixture(scope="module")
def guest() -> Iterator[lab.LabGuest]:
    """A lab guest of our own: the appliance holds its QMP for the whole test."""
    name = f"img{os.getpid()}"
    g = lab.up(name, scenario="infected")
    try:
        yield g
    finally:
        lab.down(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config_disk(tmp: Path, keys: Path) -> Path:
    """The per-host configuration as the appliance reads it: an ext4 disk labelled sva-config."""
    root = tmp / "config"
    root.mkdir()
    (root / "sva.toml").write_text(
        f"""\
[appliance]
name = "appliance-test"
management_address = "0.0.0.0"
log_format = "text"

[bus]
endpoint = "tcp://0.0.0.0:7755"
keys_dir = "/etc/sva/keys"
journal = "/var/lib/sva/bus"

[defaults]
interval = 5.0
cpu_budget = 1.0
detectors = ["yara_memory"]

[[targets]]
name = "labvm"
uri = "ivshmem:00:04.0?qmp=tcp:{QMP_FWD[0]}:{QMP_FWD[1]}"
"""
    )
    shutil.copytree(keys, root / "keys", ignore=shutil.ignore_patterns("clients"))
    # A per-host firewall addition, as admins set their management subnet: here it closes
    # the metrics port and logs what it drops, so the test sees the ruleset really applied.
    (root / "nftables.d").mkdir()
    (root / "nftables.d" / "test.nft").write_text(
        f'insert rule inet sva input tcp dport 9108 log prefix "{FW_MARK}" drop\n'
    )
    for p in [root, *root.rglob("*")]:
        os.chown(p, SVA_UID, SVA_UID)
    # The same loader as in the appliance: a bad key fails here, naming it, not after a boot.
    check = subprocess.run([str(SVA), "run", "--check", "--config", str(root / "sva.toml")],
                           check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0, check.stderr
    img = tmp / "config.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-L", "sva-config", "-d", str(root), str(img), "16M"],
        check=True,
    )
    return img


@pytest.fixture(scope="module")
def appliance(
    image: Image, guest: lab.LabGuest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("appliance")
    keys = tmp / "keys"
    generate(keys, client="hostsub")
    config = _config_disk(tmp, keys)
    bus_port, replay_port, metrics_port = _free_port(), _free_port(), _free_port()
    console = tmp / "console.log"
    # Each connection the appliance makes to QMP_FWD spawns one allow-list proxy session
    # on the host (`sva qmp-proxy --stdio`): the appliance never sees the raw monitor.
    # slirp runs the command without a shell (split at spaces) with one socket as stdin,
    # stdout *and* stderr: a script sends the proxy's log to a file so it cannot interleave
    # with QMP, and its stdout through a pipe (`| cat`) because its asyncio stdio
    # transports cannot share one socket (reported to host-kit).
    fwd = tmp / "qmp-fwd.sh"
    fwd.write_text(
        f"#!/bin/sh\n{SVA} qmp-proxy --upstream {guest.qmp_path} --stdio 2>>{tmp / 'qmp-proxy.log'} | cat\n"
    )
    fwd.chmod(0o755)
    assert "," not in str(fwd) and " " not in str(fwd), (
        "QEMU would split the -netdev option"
    )
    netdev = (
        "user,id=mgmt,net=10.0.2.0/24,"
        f"hostfwd=tcp:127.0.0.1:{bus_port}-:7755,hostfwd=tcp:127.0.0.1:{replay_port}-:7756,"
        f"hostfwd=tcp:127.0.0.1:{metrics_port}-:9108,"
        f"guestfwd=tcp:{QMP_FWD[0]}:{QMP_FWD[1]}-cmd:{fwd}"
    )
    argv = [
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-cpu", "max", "-smp", "2", "-m", "1024",
        "-display", "none", "-nodefaults", "-no-user-config",
        "-kernel", str(image.dir / "vmlinuz"), "-initrd", str(image.dir / "initrd.img"),
        # The journal goes to the console too: the test shows it when no alert comes.
        "-append", "root=LABEL=sva-root ro console=ttyS0 systemd.show_status=1 systemd.journald.forward_to_console=1 panic=-1",
        "-drive", f"file={image.rootfs},format=raw,if=virtio,readonly=on",
        "-drive", f"file={config},format=raw,if=virtio,readonly=on",
        "-object", f"memory-backend-file,id=g1,mem-path={guest.mem_path},size={guest.mem_size},share=on,readonly=on",
        "-device", "ivshmem-plain,memdev=g1,addr=0x4",
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=mgmt",
        "-serial", f"file:{console}", "-no-reboot",
    ]  # fmt: skip
    qemu_log = tmp / "qemu.log"
    with qemu_log.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield {"proc": proc, "console": console, "keys": keys, "bus_port": bus_port, "qemu_log": qemu_log,
               "replay_port": replay_port, "metrics_port": metrics_port, "booted": time.monotonic(),
               "proxy_log": tmp / "qmp-proxy.log"}  # fmt: skip
    finally:
        proc.kill()
        proc.wait(timeout=10)
        print(
            "\n--- appliance console (tail) ---\n"
            + "\n".join(_console(console).splitlines()[-60:])
        )


def _console(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def test_appliance_reports_the_lab_guest(appliance: dict, guest: lab.LabGuest) -> None:
    sec = security_from_keys_dir(appliance["keys"], client="hostsub")
    deadline = appliance["booted"] + DETECTION_TIMEOUT
    alert = None
    with BusSubscriber(
        f"tcp://127.0.0.1:{appliance['bus_port']}", f"tcp://127.0.0.1:{appliance['replay_port']}",
        security=sec, since=0, replay_timeout=10.0,
    ) as sub:  # fmt: skip
        while time.monotonic() < deadline and alert is None:
            if appliance["proc"].poll() is not None:
                pytest.fail(
                    f"the appliance VM exited: {appliance['qemu_log'].read_text()[-2000:]}"
                )
            ev = sub.recv(timeout=2.0)
            if (
                ev is not None
                and ev.type.value == "alert"
                and "SVA_Lab_Marker" in repr(ev.payload)
            ):
                alert = ev
    console = _console(appliance["console"])
    assert alert is not None, (
        f"no lab-marker alert from the appliance within {DETECTION_TIMEOUT:.0f} s; console tail:\n"
        + "\n".join(console.splitlines()[-40:])
    )
    took = time.monotonic() - appliance["booted"]
    print(f"\nfirst detection {took:.0f} s after the appliance VM started")
    assert "labvm" in repr(alert.payload), alert.payload
    # The service really ran under systemd in the appliance.
    assert re.search(r"Started .*sva", console), "the console shows no started sva service"
    # The appliance's QEMU maps the guest's RAM read-only and shared (readonly=on).
    maps = Path(f"/proc/{appliance['proc'].pid}/maps").read_text().splitlines()
    ram = [line.split()[1] for line in maps if line.endswith(" " + guest.mem_path)]
    assert ram and all(perms == "r--s" for perms in ram), ram
    # sva needed nothing outside the proxy's allow-list.
    proxy_log = appliance["proxy_log"].read_text() if appliance["proxy_log"].exists() else ""
    assert "refused" not in proxy_log, proxy_log[-2000:]
    # The firewall: the bus above came through (management subnet), the metrics port is
    # closed by the config disk's addition, and the appliance's kernel logged the drop.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{appliance['metrics_port']}/metrics", timeout=15).read()
    deadline = time.monotonic() + 30
    while FW_MARK not in _console(appliance["console"]) and time.monotonic() < deadline:
        time.sleep(1)
    assert FW_MARK in _console(appliance["console"]), "no firewall drop logged for the metrics port"
