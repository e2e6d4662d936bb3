"""The nftables rulesets in appliance/nftables, syntax-checked and then loaded for real in a
throwaway network namespace, probed over a veth pair from a second namespace holding one
address inside the management subnet (10.0.2.0/24, the default) and one outside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NFT_DIR = Path(__file__).resolve().parents[2] / "appliance" / "nftables"
RULESETS = ("sva.nft", "sva-host.nft")

FW_MGMT, CL_MGMT = "10.0.2.15", "10.0.2.2"  # inside the management subnet
FW_OUT, CL_OUT = "192.168.77.1", "192.168.77.2"  # outside it
LISTEN_PORTS = (7755, 7756, 9108, 22, 2222)

needs_nft = pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed (scripts/setup.sh: nftables)")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

# Accepts on every port and answers "ok"; prints "ready" once all sockets listen.
LISTENER = """
import socket, sys, threading
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16); socks.append(s)
def serve(s):
    while True:
        c, _ = s.accept(); c.sendall(b"ok"); c.close()
for s in socks:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

# Tries each "SRC>DST:PORT" in parallel: open (got "ok"), refused, or timeout (dropped).
PROBE = """
import json, socket, sys, concurrent.futures as cf
def probe(spec):
    src, dst = spec.split(">"); host, port = dst.rsplit(":", 1)
    s = socket.socket(); s.settimeout(0.8)
    try:
        s.bind((src, 0)); s.connect((host, int(port)))
        return "open" if s.recv(2) == b"ok" else "closed"
    except socket.timeout:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    finally:
        s.close()
with cf.ThreadPoolExecutor(16) as ex:
    print(json.dumps(dict(zip(sys.argv[1:], ex.map(probe, sys.argv[1:])))))
"""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


@dataclass
class Netns:
    fw: str  # where the ruleset is loaded
    client: str

    def load(self, ruleset: str) -> None:
        sh("ip", "netns", "exec", self.fw, "nft", "flush", "ruleset")
        p = subprocess.run(["ip", "netns", "exec", self.fw, "nft", "-f", "-"], input=ruleset,
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        assert p.returncode == 0, p.stderr

    def probe(self, *specs: str) -> dict[str, str]:
        p = sh("ip", "netns", "exec", self.client, sys.executable, "-c", PROBE, *specs)
        result: dict[str, str] = json.loads(p.stdout)
        return result

    def ping(self, src: str, dst: str) -> bool:
        return sh("ip", "netns", "exec", self.client, "ping", "-c1", "-W1", "-I", src, dst, check=False).returncode == 0


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("needs root and nft")
    tag = f"{os.getpid() % 100000}"
    ns = Netns(f"svafw{tag}", f"svacl{tag}")
    listener = None
    try:
        for n in (ns.fw, ns.client):
            sh("ip", "netns", "add", n)
            sh("ip", "-n", n, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"vfw{tag}", "netns", ns.fw, "type", "veth", "peer", "name", f"vcl{tag}",
           "netns", ns.client)  # fmt: skip
        for n, dev, addrs in ((ns.fw, f"vfw{tag}", (FW_MGMT, FW_OUT)), (ns.client, f"vcl{tag}", (CL_MGMT, CL_OUT))):
            for a in addrs:
                sh("ip", "-n", n, "addr", "add", f"{a}/24", "dev", dev, "nodad")
            sh("ip", "-n", n, "link", "set", dev, "up")
        listener = subprocess.Popen(
            ["ip", "netns", "exec", ns.fw, sys.executable, "-c", LISTENER, *map(str, LISTEN_PORTS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        yield ns
    finally:
        if listener is not None:
            listener.kill()
            listener.wait(5)
        for n in (ns.fw, ns.client):
            sh("ip", "netns", "del", n, check=False)


@needs_nft
@pytest.mark.parametrize("name", RULESETS)
def test_ruleset_syntax(name: str) -> None:
    p = sh("nft", "-c", "-f", str(NFT_DIR / name), check=False)
    assert p.returncode == 0, p.stderr


@needs_root
@needs_nft
def test_appliance_ruleset_admits_only_the_management_subnet(netns: Netns) -> None:
    every = [f"{src}>{dst}:{port}" for src, dst in ((CL_MGMT, FW_MGMT), (CL_OUT, FW_OUT)) for port in LISTEN_PORTS]
    # Without rules everything is reachable: the drops below are the ruleset's doing.
    sh("ip", "netns", "exec", netns.fw, "nft", "flush", "ruleset")
    assert set(netns.probe(*every).values()) == {"open"}

    netns.load((NFT_DIR / "sva.nft").read_text())
    got = netns.probe(*every)
    for port in (7755, 7756, 9108):
        assert got[f"{CL_MGMT}>{FW_MGMT}:{port}"] == "open", port
        assert got[f"{CL_OUT}>{FW_OUT}:{port}"] == "timeout", port  # dropped, not even refused
    for port in (22, 2222):  # SSH is off; any other port is dropped, from anywhere
        assert got[f"{CL_MGMT}>{FW_MGMT}:{port}"] == "timeout", port
        assert got[f"{CL_OUT}>{FW_OUT}:{port}"] == "timeout", port
    assert netns.ping(CL_OUT, FW_OUT), "ICMP echo must pass (rate limited)"

    # What the appliance opens itself gets its replies (established).
    with subprocess.Popen(["ip", "netns", "exec", netns.client, sys.executable, "-c", LISTENER, "8080"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as peer:  # fmt: skip
        try:
            assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
            p = sh("ip", "netns", "exec", netns.fw, sys.executable, "-c", PROBE, f"{FW_OUT}>{CL_OUT}:8080")
            assert json.loads(p.stdout) == {f"{FW_OUT}>{CL_OUT}:8080": "open"}
        finally:
            peer.kill()


@needs_root
@needs_nft
def test_per_host_include_widens_the_management_set(netns: Netns, tmp_path: Path) -> None:
    (tmp_path / "mgmt.nft").write_text("add element inet sva mgmt_v4 { 192.168.77.0/24 }\n")
    text = (NFT_DIR / "sva.nft").read_text()
    assert 'include "/etc/sva/nftables.d/*.nft"' in text
    netns.load(text.replace("/etc/sva/nftables.d/", f"{tmp_path}/"))
    got = netns.probe(f"{CL_OUT}>{FW_OUT}:7755", f"{CL_OUT}>{FW_OUT}:2222")
    assert got == {f"{CL_OUT}>{FW_OUT}:7755": "open", f"{CL_OUT}>{FW_OUT}:2222": "timeout"}


@needs_root
@needs_nft
def test_host_ruleset_restricts_only_the_sva_ports(netns: Netns) -> None:
    netns.load((NFT_DIR / "sva-host.nft").read_text())
    got = netns.probe(f"{CL_MGMT}>{FW_MGMT}:7755", f"{CL_MGMT}>{FW_MGMT}:9108", f"{CL_OUT}>{FW_OUT}:7755",
                      f"{CL_OUT}>{FW_OUT}:9108", f"{CL_OUT}>{FW_OUT}:2222", f"{CL_OUT}>{FW_OUT}:22")  # fmt: skip
    assert got[f"{CL_MGMT}>{FW_MGMT}:7755"] == got[f"{CL_MGMT}>{FW_MGMT}:9108"] == "open"
    assert got[f"{CL_OUT}>{FW_OUT}:7755"] == got[f"{CL_OUT}>{FW_OUT}:9108"] == "timeout"
    # The host's other services are the host firewall's business, not ours.
    assert got[f"{CL_OUT}>{FW_OUT}:2222"] == got[f"{CL_OUT}>{FW_OUT}:22"] == "open"
    # Reloading replaces our table and nothing else.
    sh("ip", "netns", "exec", netns.fw, "nft", "add", "table", "inet", "someone_else")
    p = subprocess.run(["ip", "netns", "exec", netns.fw, "nft", "-f", str(NFT_DIR / "sva-host.nft")],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert p.returncode == 0, p.stderr
    tables = sh("ip", "netns", "exec", netns.fw, "nft", "list", "tables").stdout
    assert "inet someone_else" in tables and tables.count("inet sva_host") == 1
