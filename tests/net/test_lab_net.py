"""The lab guest (a real QEMU VM, infected scenario) seen through its QEMU mirror:
`sva net lab:NAME` names the guest when a command run inside it resolves a listed domain,
and the inventory comes from the lab and from QMP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sva import lab
from sva.lab import LabGuest
from sva.net.inventory import from_lab, from_qmp, whois

pytestmark = pytest.mark.lab
NO_BUNDLE = {**os.environ, "SVA_SIGS_DIR": "/nonexistent/sva-sigs"}  # the built-in signatures/ (test indicators)


def test_inventory_from_lab_and_qmp(lab_guest: LabGuest) -> None:
    inv = from_lab(lab_guest.name)
    vm = inv.vm(lab_guest.name)
    assert vm is not None and vm.macs == (lab_guest.mac.lower(),) and vm.learn
    assert whois(inv, mac=lab_guest.mac.lower())["vm"] == lab_guest.name
    q = from_qmp(lab_guest.qmp_path)
    assert q.vms[0].macs == (lab_guest.mac.lower(),) and q.vms[0].source == f"qmp:{lab_guest.qmp_path}"


def test_guest_lookup_of_listed_domain_is_seen_through_the_mirror(lab_guest: LabGuest) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "sva", "net", f"lab:{lab_guest.name}", "--json", "--duration", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=NO_BUNDLE,
    )  # fmt: skip
    try:
        time.sleep(4)  # the monitor is reading the mirror
        # busybox nslookup in the guest: the query leaves the guest's NIC whatever the answer.
        lab.exec_in(lab_guest.name, "nslookup beacon.sva-c2.example 10.0.2.3 >/dev/null 2>&1; true", timeout=30)
        time.sleep(2)  # a cycle or two after the query
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1, err
    alerts = [json.loads(x) for x in out.splitlines()]
    iocs = [a["finding"] for a in alerts if a["finding"]["detector"] == "net_ioc"]
    assert iocs, (alerts, err)
    # The guest's own traffic (DHCP, ARP with QEMU's user-net hosts) is no spoofing.
    assert not {a["finding"]["detector"] for a in alerts} & {"net_ip_spoof", "net_mac_spoof", "net_arp_spoof"}
    ev = iocs[0]["evidence"]
    assert ev["vm"] == lab_guest.name and ev["where"] == "dns_query" and ev["query"] == "beacon.sva-c2.example"
    assert ev["vm_resolved_by"] == "mac" and ev["indicator"] == "sva-c2.example"
    stats = json.loads(err.strip().splitlines()[-1])["stats"]
    assert stats["packets"] > 0 and stats["source"].startswith("qemu-mirror:")


def test_reverse_shell_in_the_guest_capture_is_found(lab_guest: LabGuest, tmp_path: Path) -> None:
    """The infected scenario's reverse shell, seen from the network: QEMU's own capture of the
    guest NIC since boot (filter-dump) holds the shell's banner going to the C2 address."""
    pcap = tmp_path / "guest.pcap"
    shutil.copyfile(lab_guest.pcap_path, pcap)  # QEMU keeps writing the original
    r = subprocess.run([sys.executable, "-m", "sva", "net", str(pcap), "--inventory", f"lab:{lab_guest.name}", "--json"],
                       capture_output=True, text=True, timeout=120, env=NO_BUNDLE)  # fmt: skip
    assert r.returncode == 1, r.stderr
    found = [json.loads(x)["finding"] for x in r.stdout.splitlines()]
    shells = [f for f in found if f["detector"] == "net_payload"]
    assert shells, found
    ev = shells[0]["evidence"]
    assert ev["signature"] == "network:SVA_Net_Shell_Banner" and ev["vm"] == lab_guest.name
    assert (ev["dst_ip"], ev["dst_port"]) == ("10.0.2.100", 4444) and shells[0]["mitre"] == ["T1059.004"]
    assert not {f["detector"] for f in found} & {"net_ip_spoof", "net_mac_spoof", "net_arp_spoof"}
