"""The daemon's config loader: every bad key or value fails naming the key; the shipped
example loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from sva.daemon.config import LogFormat, default_name, load
from sva.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "appliance" / "sva.example.toml"
GOOD = """
[appliance]
name = "host1"
management_address = "10.0.0.2"
[bus]
endpoint = "tcp://10.0.0.2:7755"
journal = "bus"
[defaults]
interval = 3
cpu_budget = 0.25
[[targets]]
name = "web01"
uri = "qemu:/run/sva/web01/qmp.sock"
[[targets]]
uri = "lab:db01"
interval = 10
[discovery]
patterns = ["/run/sva/lab/*/qmp.sock"]
[[network]]
source = "lab:db01"
[metrics]
port = 9108
"""


def _load(tmp_path: Path, text: str) -> object:
    p = tmp_path / "sva.toml"
    p.write_text(text)
    return load(p)


def test_good_config_becomes_a_typed_tree(tmp_path: Path) -> None:
    cfg = _load(tmp_path, GOOD)
    assert cfg.appliance.name == "host1" and cfg.appliance.log_format is LogFormat.JSON  # type: ignore[attr-defined]
    t0, t1 = cfg.targets  # type: ignore[attr-defined]
    assert (t0.name, t0.scan.interval, t0.scan.cpu_budget) == ("web01", 3.0, 0.25)
    assert (t1.name, t1.scan.interval) == ("db01", 10.0)  # name from the uri; own interval over [defaults]
    assert cfg.bus.journal == tmp_path / "bus"  # type: ignore[attr-defined]
    assert cfg.metrics_address == "10.0.0.2"  # type: ignore[attr-defined]
    assert cfg.network[0].name == "db01" and cfg.discovery.enabled  # type: ignore[attr-defined]


@pytest.mark.parametrize(("change", "key"), [
    ("[[targets]]\nuri = 'lab:x'\ninterval = 0\n", "targets[2].interval: must be > 0"),
    ("[[targets]]\nuri = 'lab:x'\ncpu_budget = 1.5\n", "targets[2].cpu_budget"),
    ("[[targets]]\nuri = 'lab:x'\nintervall = 3\n", "targets[2].intervall: unknown setting"),
    ("[[targets]]\nname = 'x'\n", "targets[2].uri: missing"),
    ("[[targets]]\nuri = 'http://x'\n", "targets[2].uri"),
    ("[[targets]]\nuri = 'lab:web01'\n", "targets[2].name: 'web01' is used twice"),
    ("[[targets]]\nuri = 'lab:x'\ndetectors = ['no_such_detector']\n", "targets[2].detectors"),
    ("[[targets]]\nuri = 'lab:x'\nrules = ['/nonexistent/rules']\n", "targets[2].rules[0]"),
    ("[[network]]\nsource = 'eth0'\n", "network[1].source"),
    ("[colour]\nx = 1\n", "colour: unknown setting"),
    ("[[targets]]\nuri = 'lab:x'\nsweep_period = 0\n", "targets[2].sweep_period: must be > 0"),
    ("[[targets]]\nuri = 'lab:x'\nsweep_every = 8\n", "targets[2].sweep_every: replaced by sweep_period"),
    ("[[targets]]\nuri = 'lab:x'\nyara_period = -1\n", "targets[2].yara_period: must be >= 0"),
])  # fmt: skip
def test_bad_values_name_the_key(tmp_path: Path, change: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, GOOD + change)
    assert key in str(e.value) and str(tmp_path / "sva.toml") in str(e.value)


@pytest.mark.parametrize(("old", "new", "key"), [
    ('management_address = "10.0.0.2"', 'management_address = "mgmt"', "appliance.management_address"),
    ('interval = 3\n', 'interval = "3"\n', "defaults.interval: expected a number"),
    ('port = 9108', 'port = 70000', "metrics.port"),
    ('journal = "bus"', 'journal = "bus"\nfsync = "sometimes"', "bus.fsync"),
    ('patterns = ["/run/sva/lab/*/qmp.sock"]', 'patterns = ["relative/*.sock"]', "discovery.patterns[0]"),
    ('[metrics]', '[signatures]\ninterval_s = -1\n[metrics]', "signatures.interval_s"),
])  # fmt: skip
def test_bad_section_values_name_the_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        _load(tmp_path, GOOD.replace(old, new, 1))


def test_sweep_period_is_spread_over_the_cycles_it_holds(tmp_path: Path) -> None:
    cfg = _load(tmp_path, GOOD + "[[targets]]\nuri = 'lab:fast'\ninterval = 0.25\n"
                "[[targets]]\nuri = 'lab:slow'\ninterval = 60\n[[targets]]\nuri = 'lab:own'\nsweep_period = 9\n")
    every = {t.name: t.scan.sweep_every for t in cfg.targets}  # type: ignore[attr-defined]
    # 40 s by default: 160 cycles at 4 Hz, 14 at 3 s; an interval longer than the period: every cycle
    assert (every["fast"], every["web01"], every["slow"], every["own"]) == (160, 14, 1, 3)


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sva.toml"):
        _load(tmp_path, "[bus\n")


def test_example_config_loads() -> None:
    cfg = load(EXAMPLE)
    assert cfg.targets and cfg.network and cfg.discovery.enabled and cfg.signatures is not None
    assert cfg.bus.endpoint.endswith(":7755") and cfg.metrics.port == 9108


def test_names_from_socket_paths() -> None:
    assert default_name("qemu:/run/sva/lab/web01/qmp.sock") == "web01"
    assert default_name("qemu:/var/lib/libvirt/qemu/domain-3-db01/monitor.sock") == "db01"
    assert default_name("lab:demo") == "demo"
