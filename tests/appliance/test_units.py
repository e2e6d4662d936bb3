"""The systemd units in appliance/systemd: sandbox exposure (systemd-analyze security,
offline, on the unit files themselves), `systemd-analyze verify`, the settings the admin
guide promises, and that sva really works under MemoryDenyWriteExecute."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sva.lab import LabGuest

UNITS_DIR = Path(__file__).resolve().parents[2] / "appliance" / "systemd"
UNITS = sorted(p.name for p in UNITS_DIR.glob("*.service"))
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (package systemd)")  # fmt: skip


def directives(unit: Path) -> dict[str, list[str]]:
    """`Section.Key` → every value, in order (systemd allows repeated keys)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{unit}: not a key=value line: {raw!r}"
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def test_the_expected_units_are_shipped() -> None:
    assert {"sva.service", "sva-host.service", "sva-qmp-proxy.service", "sva-qmp-proxy@.service"} <= set(UNITS)


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_at_most_2(unit: str, tmp_path: Path) -> None:
    # A template is analysed as one of its instances.
    name = unit.replace("@.", "@vm1.")
    shutil.copy(UNITS_DIR / unit, tmp_path / name)
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", name],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    assert m, p.stdout + p.stderr
    assert float(m[1]) <= MAX_EXPOSURE, p.stdout


@needs_analyze
def test_units_verify_cleanly(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point the copies at this checkout's sva.
    sva = Path(sys.executable).with_name("sva")
    names = []
    for unit in UNITS:
        name = unit.replace("@.", "@vm1.")
        (tmp_path / name).write_text((UNITS_DIR / unit).read_text().replace("/opt/sva/bin/sva", str(sva)))
        names.append(name)
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), p.stdout + p.stderr


@pytest.mark.parametrize("unit", ["sva.service", "sva-host.service"])
def test_daemon_units_run_sva_sandboxed(unit: str) -> None:
    d = directives(UNITS_DIR / unit)
    assert d["Service.User"] == ["sva"]
    assert d["Service.ExecStart"][-1].endswith("sva run --config /etc/sva/sva.toml")
    assert d["Service.StateDirectory"] == ["sva"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "LockPersonality",
                "RestrictNamespaces", "MemoryDenyWriteExecute", "RestrictSUIDSGID"):  # fmt: skip
        assert d[f"Service.{key}"] == ["yes"], key
    assert d["Service.ProtectSystem"] == ["strict"]
    assert d["Service.CapabilityBoundingSet"] == ["CAP_NET_RAW"]  # AF_PACKET capture, nothing more
    assert set(d["Service.RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_PACKET",
                                                                     "AF_NETLINK"}  # fmt: skip
    assert "@system-service" in d["Service.SystemCallFilter"]
    # /run/sva holds guests' QMP sockets and RAM files: systemd must not chown it to sva or
    # delete it when the daemon stops.
    assert d["Service.RuntimeDirectory"] != ["sva"]


def test_proxy_units_have_no_capabilities_and_no_network() -> None:
    for unit in ("sva-qmp-proxy.service", "sva-qmp-proxy@.service"):
        d = directives(UNITS_DIR / unit)
        assert d["Service.CapabilityBoundingSet"] == [""], unit
        assert d["Service.RestrictAddressFamilies"] == ["AF_UNIX"], unit
        assert d["Service.PrivateNetwork"] == ["yes"], unit
        assert " qmp-proxy " in d["Service.ExecStart"][0], unit


def test_sva_scans_under_memory_deny_write_execute(lab_guest: LabGuest) -> None:
    """MemoryDenyWriteExecute=yes must not break yara, volatility3 or the engine: run a real
    scan of the lab guest in a process the kernel forbids W+X mappings (PR_SET_MDWE, what
    systemd applies for that setting on kernels that have it)."""
    code = (
        "import ctypes, mmap, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        "    sys.exit(77)\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    sys.exit(78)\n"
        "except OSError:\n"
        "    pass\n"
        "from sva.cli import main\n"
        f"sys.exit(main(['scan', 'lab:{lab_guest.name}', '--json']))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if p.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3): cannot enforce W^X outside systemd here")
    assert p.returncode != 78, "W+X mapping was still allowed: the restriction is not in force"
    assert p.returncode == 1, p.stderr[-2000:]  # 1: findings (the lab guest is infected)
    detectors = {a["finding"]["detector"] for a in json.loads(p.stdout)["alerts"]}
    assert {"yara_memory", "process_policy"} <= detectors, detectors
