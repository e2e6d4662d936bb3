"""`sva net` as a user runs it: pcap files to their end, a live interface until SIGTERM or
--duration, statistics at exit and on SIGUSR1, exit status 0 / 1 / 2 like `sva scan`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

SVA = [sys.executable, "-m", "sva"]
# No installed signature bundle: the built-in signatures/ (its test indicators) are used.
NO_BUNDLE = {**os.environ, "SVA_SIGS_DIR": "/nonexistent/sva-sigs"}
A, B = "02:00:00:77:00:01", "02:00:00:77:00:02"
INVENTORY = f"""
[[vm]]
name = "vm-a"
macs = ["{A}"]
ips = ["10.77.0.1"]

[[vm]]
name = "vm-b"
macs = ["{B}"]
ips = ["10.77.0.2"]
"""


def sva(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SVA, *args], capture_output=True, text=True, timeout=timeout, env=NO_BUNDLE)


def pcap(path: Path, packets: list[Any]) -> str:
    for i, p in enumerate(packets):
        p.time = 1_700_000_000 + i * 0.01
    wrpcap(str(path), packets)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("netcli")
    (d / "inv.toml").write_text(INVENTORY)
    clean = [Ether(src=A, dst=B) / IP(src="10.77.0.1", dst="10.77.0.2") / ICMP(seq=i) for i in range(5)]
    bad = clean + [Ether(src=A, dst=B) / IP(src="10.77.0.1", dst="10.77.0.2") / UDP(sport=5000, dport=53)
                   / DNS(rd=1, qd=DNSQR(qname="x.sva-c2.example"))]  # fmt: skip
    return {"inv": str(d / "inv.toml"), "clean": pcap(d / "clean.pcap", clean), "bad": pcap(d / "bad.pcap", bad),
            "dir": str(d)}  # fmt: skip


def test_clean_pcap_exits_0_with_statistics(files: dict[str, str]) -> None:
    r = sva("net", files["clean"], "--inventory", files["inv"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert f"stats pcap:{files['clean']}: 5 packets" in r.stderr and "drops: kernel 0, ring 0" in r.stderr


def test_findings_exit_1_human_and_json(files: dict[str, str]) -> None:
    r = sva("net", files["bad"], "--inventory", files["inv"])
    assert r.returncode == 1, r.stderr
    assert "NEW [HIGH] DNS lookup of a listed domain: vm-a: DNS query for x.sva-c2.example" in r.stdout
    assert "ATT&CK T1071.004" in r.stdout
    r = sva("net", f"pcap:{files['bad']}", "--inventory", files["inv"], "--json")
    assert r.returncode == 1, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 1
    alert = lines[0]
    assert alert["state"] == "new" and alert["finding"]["detector"] == "net_ioc" and alert["finding"]["rule"] == "SVA-NET-IOC-DNS"
    assert alert["finding"]["evidence"]["vm"] == "vm-a" and alert["vm"]["target"] == f"pcap:{files['bad']}"
    stats = json.loads(r.stderr.strip().splitlines()[-1])["stats"]
    assert stats["packets"] == 6 and stats["kernel_drops"] == 0


def test_signatures_from_the_active_bundle_or_a_directory(files: dict[str, str], tmp_path: Path) -> None:
    # An installed bundle as `sva sigs` leaves it: <store>/active -> bundles/<v>, files/ in the signatures layout.
    bundle = tmp_path / "store" / "bundles" / "7"
    (bundle / "files" / "ioc").mkdir(parents=True)
    (bundle / "files" / "ioc" / "custom.domains").write_text("x.sva-c2.example\n")
    (tmp_path / "store" / "active").symlink_to("bundles/7")
    env = {**os.environ, "SVA_SIGS_DIR": str(tmp_path / "store")}
    r = subprocess.run([*SVA, "net", files["bad"], "--inventory", files["inv"], "--json"], capture_output=True,
                       text=True, timeout=120, env=env)  # fmt: skip
    assert r.returncode == 1, r.stderr
    (alert,) = [json.loads(x) for x in r.stdout.splitlines()]
    assert alert["finding"]["evidence"]["ioc_list"] == "custom"  # not the built-in sva_test list
    r = sva("net", files["bad"], "--inventory", files["inv"], "--signatures", str(tmp_path / "store"))
    assert r.returncode == 0, r.stderr  # a directory without ioc/ or network/: nothing to match


def test_errors_exit_2_with_one_line_naming_the_source(files: dict[str, str]) -> None:
    bad_inv = Path(files["dir"]) / "bad.toml"
    bad_inv.write_text('[[vm]]\nname = "x"\nmacs = ["nope"]\n')
    r = sva("net", files["clean"], "--inventory", str(bad_inv))
    assert r.returncode == 2 and r.stderr.strip() == f"sva net: error: {bad_inv}:3: macs[0]: 'nope' is not a MAC address (aa:bb:cc:dd:ee:ff)"
    r = sva("net", str(Path(files["dir"]) / "missing.pcap"))
    assert r.returncode == 2 and "missing.pcap" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = sva("net", "iface:sva-no-such-if0")
    assert r.returncode == 2 and "sva-no-such-if0" in r.stderr
    r = sva("net", files["clean"], "--duration", "0")
    assert r.returncode == 2 and "--duration must be positive" in r.stderr
    r = sva("net", files["clean"], "--detectors", "net_nope")
    assert r.returncode == 2 and "net_nope" in r.stderr


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_live_interface_sigusr1_stats_and_clean_stop(bridge_lab: Any, stop_signal: int) -> None:
    lab = bridge_lab
    cmd = ["ip", "netns", "exec", lab.switch_ns, *SVA, "net", f"iface:{lab.monitor}", "--json"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=NO_BUNDLE)
    try:
        time.sleep(3)  # start-up: imports, rules, YARA
        lab.run("a", "ping", "-c", "3", "-i", "0.2", lab.vms["b"].ip)
        p.send_signal(signal.SIGUSR1)
        time.sleep(1.5)
        p.send_signal(stop_signal)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    stats = [json.loads(x)["stats"] for x in err.splitlines() if x.startswith('{"stats"')]
    assert len(stats) == 2  # one on SIGUSR1, one at exit
    assert stats[-1]["packets"] >= 6 and stats[-1]["kernel_drops"] == 0 and stats[-1]["source"] == f"iface:{lab.monitor}"
    assert out == ""


def test_live_interface_duration(bridge_lab: Any) -> None:
    lab = bridge_lab
    t0 = time.monotonic()
    r = subprocess.run(["ip", "netns", "exec", lab.switch_ns, *SVA, "net", f"iface:{lab.monitor}", "--duration", "1.5"],
                       capture_output=True, text=True, timeout=60, env=NO_BUNDLE)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "stopped: duration" in r.stderr and time.monotonic() - t0 < 30
