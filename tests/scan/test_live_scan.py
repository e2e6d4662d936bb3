"""YARA over real lab guests' RAM, read live through the QEMU backend."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from sva import lab
from sva.lab import exec_in, scenarios
from sva.scan import CompiledRuleSet, IncrementalScanner, PhysicalScanner, ScanReport, signatures_dir
from sva.vmi import open_target
from sva.vmi.base import MappedBackend

from .conftest import TESTDATA_YARA, write_rules

pytestmark = pytest.mark.lab

MARKER = scenarios.MARKER.encode()
# What the lab itself puts in every guest's RAM: its /init script holds the infected
# scenario's miner and reverse-shell command lines as text, whatever the scenario.
LAB_STRINGS = (b"pool.invalid", b"44AFFq5kSiGBoZ", b"/tmp/xmrig", b"mkfifo /tmp/f", b"10.0.2.100", MARKER)


@pytest.fixture(scope="module")
def default_rules() -> CompiledRuleSet:
    return CompiledRuleSet.default()


def test_default_rules_on_the_infected_guest(lab_guest, default_rules: CompiledRuleSet) -> None:
    with open_target(f"lab:{lab_guest.name}") as b, b.frozen():
        report = PhysicalScanner(default_rules).scan(b)
        assert report.problems == []
        marker_gpas = report.hit_addresses(f"test:{scenarios.MARKER_RULE}")
        assert marker_gpas, "the infected guest's marker was not found"
        for gpa in marker_gpas:
            assert b.read(gpa, len(MARKER)) == MARKER
        miner = report.by_rule()["memory:SVA_Linux_CoinMiner_Stratum_Cmdline"]
        data = b"".join(h.data for m in miner for h in m.hits)
        assert b"stratum+tcp://pool.invalid:3333" in data and b"--donate-level=1" in data
        for m in miner:
            assert m.author == "sva" and m.reference and m.techniques == ("T1496",)
            for h in m.hits:
                assert b.read(h.address, len(h.data)) == h.data
        assert report.bytes_scanned == b.memory_size


def test_incremental_rescan_finds_a_new_process(lab_guest, default_rules: CompiledRuleSet, tmp_path: Path) -> None:
    token = secrets.token_hex(8)
    marker = f"SVA-SCAN-INCR-{token}"
    extra = write_rules(tmp_path / "incr", "new_marker.yar",
                        f'rule New_Process_Marker {{ meta: author = "sva tests" strings: $m = "{marker}" condition: $m }}')  # fmt: skip
    rules = CompiledRuleSet.load(signatures_dir(), extra.parent)  # namespace "incr"
    inc = IncrementalScanner(rules)
    with open_target(f"lab:{lab_guest.name}") as b:
        first = inc.cycle(b)
        assert first.full and "incr:New_Process_Marker" not in first.rules_matched
        assert f"test:{scenarios.MARKER_RULE}" in first.rules_matched

        idle = inc.cycle(b)
        assert not idle.full
        assert idle.pages_total == b.memory_size // 4096
        assert idle.pages_rescanned is not None and idle.pages_rescanned < idle.pages_total // 50
        assert f"test:{scenarios.MARKER_RULE}" in idle.rules_matched  # carried forward

        # The marker exists only once the guest shell joins the pieces.
        pieces = [marker[i : i + 6] for i in range(0, len(marker), 6)]
        res = exec_in(lab_guest.name, f"SVA_SCAN_M={''.join(repr(p) for p in pieces)}; export SVA_SCAN_M; "
                                      "sleep 300 </dev/null >/dev/null 2>&1 & echo $!; unset SVA_SCAN_M")  # fmt: skip
        assert res.status == 0, res
        pid = int(res.output.strip().splitlines()[-1])
        try:
            with b.frozen():
                after = inc.cycle(b)
                assert not after.full and after.pages_rescanned < after.pages_total // 4
                gpas = after.hit_addresses("incr:New_Process_Marker")
                assert gpas, f"new marker not found; {after.pages_changed} pages changed"
                for gpa in gpas:
                    assert b.read(gpa, len(marker)) == marker.encode()
                assert f"test:{scenarios.MARKER_RULE}" in after.rules_matched
        finally:
            exec_in(lab_guest.name, f"kill {pid}", timeout=30)


def _intended(b: MappedBackend, report: ScanReport) -> list[str]:
    """Matches whose hits are not all inside text the lab itself put in RAM."""
    unexplained = []
    for m in report.matches:
        for h in m.hits:
            lo = max(h.address - 256, 0)
            around = b.read(lo, min(h.address + h.length + 256, b.memory_map.region_of(h.address).end) - lo)
            if not any(s in around for s in LAB_STRINGS):
                unexplained.append(f"{m.key} at 0x{h.address:x}: {h.data!r}")
                break
        else:
            if not m.hits:
                unexplained.append(f"{m.key} (block 0x{m.block_start:x})")
    return unexplained


def test_quiet_on_a_clean_guest(lab_guest, default_rules: CompiledRuleSet) -> None:
    sets = [TESTDATA_YARA / "elastic-linux", TESTDATA_YARA / "signature-base"]
    public = CompiledRuleSet.load(*sets) if all(s.is_dir() for s in sets) else None
    name = f"c{os.getpid()}"
    lab.up(name, scenario="clean")
    try:
        with open_target(f"lab:{name}") as b, b.frozen():
            report = PhysicalScanner(default_rules).scan(b)
            assert report.matches == [] and report.problems == []
            if public is not None:
                clean = PhysicalScanner(public).scan(b)
                assert clean.problems == [] and _intended(b, clean) == []
    finally:
        lab.down(name)
    if public is None:
        pytest.skip(f"default rules quiet on the clean guest; public rule sets not found at {TESTDATA_YARA}")
    # The infected guest: the public sets find nothing but what the lab planted on purpose.
    with open_target(f"lab:{lab_guest.name}") as b, b.frozen():
        infected = PhysicalScanner(public).scan(b)
        assert infected.problems == [] and _intended(b, infected) == []
