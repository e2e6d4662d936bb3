"""The VM inventory: the TOML file (errors at file:line), lookups, and learning rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from sva.errors import InventoryError
from sva.net.inventory import Inventory, Learner, load_inventory, loads_inventory, normalize_mac, whois

GOOD = """\
[[vm]]
name = "web1"
macs = ["52:54:00:AA:bb:01"]
ips = ["10.0.0.10", "fd00::10/128"]
port = "vnet0"
port_traffic = "from_vm"
group = "web"

[[vm]]
name = "dhcp1"
macs = ["52-54-00-aa-bb-02"]
learn = true

[[gateway]]
name = "router"
ips = ["10.0.0.1"]
macs = ["52:54:00:00:00:01"]
"""


def test_file_loads_and_lookups_work(tmp_path: Path) -> None:
    (tmp_path / "inv.toml").write_text(GOOD)
    inv = load_inventory(tmp_path / "inv.toml")
    web = inv.vm("web1")
    assert web is not None and web.macs == ("52:54:00:aa:bb:01",) and web.group == "web"
    assert web.source == f"{tmp_path}/inv.toml:1"
    assert inv.vm_by_mac("52:54:00:aa:bb:02") is inv.vm("dhcp1")
    assert inv.vm_by_port("vnet0") is web and inv.vm_by_port("") is None
    assert inv.sender_vm("vnet0", "de:ad:be:ef:00:01") is web  # the port wins over the MAC
    assert inv.may_send_from(web, "10.0.0.10") and inv.may_send_from(web, "fd00::10")
    assert not inv.may_send_from(web, "10.0.0.11")
    owner = inv.owner_of_ip("10.0.0.1")
    assert owner is not None and (owner.kind, owner.name) == ("gateway", "router")
    assert inv.owner_of_ip("10.9.9.9") is None and inv.owner_of_ip("not an ip") is None
    assert whois(inv, mac="52:54:00:aa:bb:02") == {"vm": "dhcp1", "vm_group": "default", "vm_resolved_by": "mac"}
    assert whois(inv, ip="10.0.0.10")["vm"] == "web1"
    assert whois(inv, mac="52:54:00:00:00:01") == {"gateway": "router"}


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('[[vm]]\nname = "a"\nmacs = ["52:54:00:00:00:zz"]\n', 3, "macs[0]: '52:54:00:00:00:zz' is not a MAC address"),
        ('[[vm]]\nname = "a"\nmacs = ["52:54:00:00:00:01"]\nips = [\n  "10.0.0.1",\n  "10.0.0.300",\n]\n', 6,
         "ips[1]: '10.0.0.300' is not an IP address or prefix"),
        ('[[vm]]\nname = "a"\nmacs = ["52:54:00:00:00:01"]\nlearn = "yes"\n', 4, "learn: expected true or false"),
        ('[[vm]]\nname = "a"\nmacs = ["52:54:00:00:00:01"]\nmac = []\n', 4, "unknown key 'mac'"),
        ('[[vm]]\nname = "a"\n', 1, "vm 'a': needs at least one MAC"),
        ('[[vm]]\nmacs = ["52:54:00:00:00:01"]\n', 1, "missing required key 'name'"),
        ('[[vm]]\nname = "a"\nmacs = ["52:54:00:00:00:01"]\n\n[[vm]]\nname = "a"\nmacs = ["52:54:00:00:00:02"]\n', 6,
         "VM 'a' defined twice (first at"),
        ('[[vm]]\nname = "a"\nmacs = ["52:54:00:00:00:01"]\n[[vm]]\nname = "b"\nmacs = ["52:54:00:00:00:01"]\n', 6,
         "MAC 52:54:00:00:00:01 is already VM 'a'"),
        ('[[vm]]\nname = "a"\nmacs = ["52:54:00:00:00:01"]\nport_traffic = "in"\n', 4, "port_traffic: 'in' is not one of"),
        ('[vms]\n', 1, "unknown top-level key 'vms'"),
        ('[[vm]\n', 1, "invalid TOML"),
        ('[[gateway]]\nname = "gw"\n', 1, "gateway 'gw': needs at least one address"),
    ],
)  # fmt: skip
def test_errors_name_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = tmp_path / "inv.toml"
    path.write_text(text)
    with pytest.raises(InventoryError) as e:
        load_inventory(path)
    assert str(e.value).startswith(f"{path}:{line}: "), str(e.value)
    assert message in str(e.value)


def test_unreadable_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match=r"missing\.toml: cannot read"):
        load_inventory(tmp_path / "missing.toml")
    (tmp_path / "bin.toml").write_bytes(b'[[vm]]\nname = "\xff"\n')
    with pytest.raises(InventoryError, match=r"bin\.toml:2: not UTF-8"):
        load_inventory(tmp_path / "bin.toml")


def test_learning_only_where_allowed_and_never_someone_elses_address() -> None:
    inv = loads_inventory(GOOD)
    learner = Learner(inv, max_per_vm=2)
    # web1 does not learn; dhcp1 does.
    assert not learner.dhcp_ack("52:54:00:aa:bb:01", "10.0.0.99", 1.0)
    assert learner.dhcp_ack("52:54:00:aa:bb:02", "10.0.0.20", 1.0)
    assert learner.inventory.may_send_from(learner.inventory.vm("dhcp1"), "10.0.0.20")  # type: ignore[arg-type]
    owner = learner.inventory.owner_of_ip("10.0.0.20")
    assert owner is not None and owner.name == "dhcp1" and owner.learned
    # Addresses owned by a VM or the gateway are never learned by someone else.
    assert not learner.dhcp_ack("52:54:00:aa:bb:02", "10.0.0.10", 2.0)
    assert not learner.dhcp_ack("52:54:00:aa:bb:02", "10.0.0.1", 2.0)
    assert learner.refused == 2
    # A first ARP binds only while the VM has no address at all.
    assert not learner.first_arp("", "52:54:00:aa:bb:02", "10.0.0.21", 3.0)
    assert learner.dhcp_ack("52:54:00:aa:bb:02", "10.0.0.22", 4.0)
    assert not learner.dhcp_ack("52:54:00:aa:bb:02", "10.0.0.23", 5.0)  # the per-VM limit (2)
    assert learner.inventory.learned_ips("dhcp1") == ("10.0.0.20", "10.0.0.22")
    assert not learner.dhcp_ack("52:54:00:aa:bb:02", "0.0.0.0", 6.0)


def test_first_arp_learning() -> None:
    inv = loads_inventory('[[vm]]\nname = "n"\nmacs = ["02:00:00:00:00:01"]\nlearn = true\n')
    learner = Learner(inv)
    assert not learner.first_arp("", "02:00:00:00:00:09", "10.1.1.1", 1.0)  # not its MAC
    assert learner.first_arp("", "02:00:00:00:00:01", "10.1.1.1", 1.0)
    assert not learner.first_arp("", "02:00:00:00:00:01", "10.1.1.2", 2.0)  # only the first
    assert learner.inventory.learned_ips("n") == ("10.1.1.1",)


def test_merge_refuses_a_vm_defined_twice() -> None:
    a = loads_inventory('[[vm]]\nname = "x"\nmacs = ["02:00:00:00:00:01"]\n', "a.toml")
    b = loads_inventory('[[vm]]\nname = "x"\nmacs = ["02:00:00:00:00:02"]\n', "b.toml")
    with pytest.raises(InventoryError, match=r"VM 'x' is also defined by a.toml:1"):
        a.merged(b)
    assert len(a.merged(Inventory()).vms) == 1


def test_normalize_mac() -> None:
    assert normalize_mac("AA-bb-CC-00-11-22") == "aa:bb:cc:00:11:22"
    assert normalize_mac("aa:bb:cc:00:11") is None
