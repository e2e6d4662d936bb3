"""Physical scans on synthetic guests: chunk boundaries, multi-region maps, ranges, caps,
timeouts, zero copies."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sva.errors import ConfigError
from sva.scan import CompiledRuleSet, PhysicalScanner, ProblemKind, ScanConfig
from sva.testing import make_raw_file, synthetic_backend
from sva.vmi.snapshot import open_snapshot

from .conftest import poke, write_rules

MiB = 1 << 20
MARKER = b"SVA-SCAN-BOUNDARY-MARKER-5f3c9e0a7d21"
MARKER_RULE = f"""
rule Boundary_Marker
{{
    meta:
        author = "sva tests"
        reference = "tests/scan"
    strings:
        $m = "{MARKER.decode()}"
    condition:
        $m
}}
"""


@pytest.fixture(scope="module")
def marker_rules(tmp_path_factory: pytest.TempPathFactory) -> CompiledRuleSet:
    return CompiledRuleSet.load(write_rules(tmp_path_factory.mktemp("rules"), "marker.yar", MARKER_RULE))


def test_marker_across_chunk_boundary_found_once(tmp_path: Path, marker_rules: CompiledRuleSet) -> None:
    raw = make_raw_file(tmp_path / "guest.raw", 8 * MiB, seed=7)
    chunk = MiB
    with open(raw, "r+b") as f:
        for off in (chunk - 10, 3 * chunk - 1, 5 * chunk, 6 * chunk - len(MARKER)):
            f.seek(off)  # across a boundary, ending one past it, starting on one, ending on one
            f.write(MARKER)
    with open_snapshot(str(raw)) as b:
        report = PhysicalScanner(marker_rules, ScanConfig(chunk_size=chunk, overlap=4096)).scan(b)
        hits = report.hit_addresses("marker:Boundary_Marker")
        assert hits == [chunk - 10, 3 * chunk - 1, 5 * chunk, 6 * chunk - len(MARKER)]
        for gpa in hits:
            assert b.read(gpa, len(MARKER)) == MARKER
        assert report.calls == 8 and report.bytes_scanned == 8 * MiB and report.problems == []
        m = report.matches[0]
        assert m.block_end - m.block_start == chunk + 4096  # each call sees the next 4 KiB too
        assert m.hits[0].data == MARKER and m.hits[0].length == len(MARKER)


@settings(max_examples=40, deadline=None)
@given(
    chunk_pages=st.integers(16, 40),
    overlap=st.sampled_from([64, 4096]),
    positions=st.lists(st.integers(0, 400 * 1024 - len(MARKER)), min_size=1, max_size=6),
    base=st.sampled_from([0, 0x1_0000_0000]),
)
def test_every_instance_exactly_once(marker_rules: CompiledRuleSet, chunk_pages: int, overlap: int,
                                     positions: list[int], base: int) -> None:  # fmt: skip
    buf = bytearray(400 * 1024)
    placed = []
    for p in sorted(set(positions)):
        if placed and p < placed[-1] + len(MARKER):
            continue  # no overlapping copies
        buf[p : p + len(MARKER)] = MARKER
        placed.append(p)
    scanner = PhysicalScanner(marker_rules, ScanConfig(chunk_size=chunk_pages * 4096, overlap=overlap))
    report = scanner.scan_buffer(buf, base_address=base)
    assert report.hit_addresses("marker:Boundary_Marker") == [base + p for p in placed]


def test_regions_above_4gib_get_their_gpas(tmp_path: Path, marker_rules: CompiledRuleSet) -> None:
    low, high = 0x0, 0x1_0000_0000
    with synthetic_backend(tmp_path, [(low, 2 * MiB), (0x200000 * 3, MiB), (high, 3 * MiB)], seed=3) as b:
        want = [low + 0x1234, high + 0x10, high + 2 * MiB + 5]
        for gpa in want:
            poke(b, gpa, MARKER)
        # Its first 8 bytes end the middle region; the rest would be at the next GPA, which is
        # not RAM (and the next region's first bytes are elsewhere in the file): no match.
        poke(b, 0x600000 + MiB - 8, MARKER[:8])
        poke(b, high, MARKER[8:16])
        report = PhysicalScanner(marker_rules, ScanConfig(chunk_size=MiB)).scan(b)
        assert report.hit_addresses("marker:Boundary_Marker") == want
        for gpa in want:
            assert b.read(gpa, len(MARKER)) == MARKER


def test_scan_ranges(tmp_path: Path, marker_rules: CompiledRuleSet) -> None:
    with synthetic_backend(tmp_path, [(0, 2 * MiB), (0x1_0000_0000, MiB)], seed=5) as b:
        poke(b, 0x5000 - 8, MARKER)  # across two pages given as separate ranges
        poke(b, 0x1_0000_0000 + 0x100, MARKER)
        scanner = PhysicalScanner(marker_rules)
        r = scanner.scan_ranges(b, [(0x5000, 0x1000), (0x4000, 0x1000)])
        assert r.hit_addresses("marker:Boundary_Marker") == [0x5000 - 8]
        # a range running off the end of RAM: scanned where it is RAM, the rest reported
        r = scanner.scan_ranges(b, [(0x1_0000_0000, 2 * MiB), (3 * MiB, 4096)])
        assert r.hit_addresses("marker:Boundary_Marker") == [0x1_0000_0000 + 0x100]
        gaps = sorted((p.start, p.end) for p in r.problems)
        assert gaps == [(3 * MiB, 3 * MiB + 4096), (0x1_0000_0000 + MiB, 0x1_0000_0000 + 2 * MiB)]
        assert {p.kind for p in r.problems} == {ProblemKind.UNREADABLE}
        with pytest.raises(ValueError):
            scanner.scan_ranges(b, [(0, -1)])


def test_match_caps(tmp_path: Path) -> None:
    rules = CompiledRuleSet.load(write_rules(tmp_path, "many.yar", 'rule Many { strings: $a = "NEEDLE" condition: $a }'))
    buf = (b"NEEDLE" + bytes(4090)) * 64  # 64 instances, one per page
    cfg = ScanConfig(chunk_size=64 * 1024, overlap=4096, max_hits_per_match=3, max_matches_per_rule=2, max_data=4)
    r = PhysicalScanner(rules, cfg).scan_buffer(buf)
    assert len(r.matches) == 2 and r.overflow == {"many:Many": 2}  # 4 chunks of 16 instances
    assert [len(m.hits) for m in r.matches] == [3, 3] and [m.hits_omitted for m in r.matches] == [13, 13]
    assert r.matches[0].hits[0].data == b"NEED" and r.matches[0].hits[0].length == 6


def test_timeout_becomes_a_problem(tmp_path: Path) -> None:
    # Big_Numbers-style regexes on hex text cost ~10 s per MiB here; the scan has 1 s.
    slow = " ".join(f"$h{n} = /[0-9a-fA-F]{{{n}}}/ fullword wide ascii" for n in (20, 32, 48, 64, 128, 256))
    rules = CompiledRuleSet.load(write_rules(tmp_path, "slow.yar", f"rule Slow {{ strings: {slow} condition: any of them }}"))
    hex_text = os.urandom(8 * MiB).hex().encode()  # 16 MiB
    r = PhysicalScanner(rules, ScanConfig(chunk_size=16 * MiB, timeout_s=1)).scan_buffer(hex_text, base_address=0x4000)
    assert r.matches == []
    assert [(p.kind, p.start, p.end) for p in r.problems] == [(ProblemKind.TIMEOUT, 0x4000, 0x4000 + 16 * MiB)]
    assert "timed out" in str(r.problems[0])


def test_views_are_scanned_in_place(marker_rules: CompiledRuleSet) -> None:
    # A copy of the 32 MiB buffer would show up in Python's allocations.
    buf = bytearray(32 * MiB)
    buf[-len(MARKER) :] = MARKER
    scanner = PhysicalScanner(marker_rules)
    tracemalloc.start()
    try:
        r = scanner.scan_buffer(memoryview(buf))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.hit_addresses("marker:Boundary_Marker") == [32 * MiB - len(MARKER)]
    assert peak < MiB


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chunk_size"):
        ScanConfig(chunk_size=1000)
    with pytest.raises(ConfigError, match="timeout_s"):
        ScanConfig(timeout_s=0)
    with pytest.raises(ConfigError, match="overlap"):
        ScanConfig(chunk_size=64 * 1024, overlap=64 * 1024)
    # the default overlap is the rule set's longest possible match
    long = CompiledRuleSet.load(write_rules(tmp_path, "long.yar", f'rule Long {{ strings: $a = "{"A" * 6000}" wide condition: $a }}'))
    assert long.longest_literal == 12000
    assert PhysicalScanner(long).overlap == 12000
    buf = bytearray(256 * 1024)
    buf[65536 - 100 : 65536 - 100 + 12000] = "A".encode("utf-16-le") * 6000
    report = PhysicalScanner(long, ScanConfig(chunk_size=64 * 1024)).scan_buffer(buf)
    assert report.hit_addresses("long:Long") == [65536 - 100]
