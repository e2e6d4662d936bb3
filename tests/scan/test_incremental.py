"""Incremental rescans on synthetic guests whose backing file the test rewrites."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sva.errors import ConfigError
from sva.scan import CompiledRuleSet, IncrementalConfig, IncrementalScanner, ProblemKind, ScanConfig
from sva.scan.incremental import BLOCK_PAGES, changed_indices, hash_pages, rehash
from sva.testing import synthetic_backend

from .conftest import poke, write_rules

MiB = 1 << 20
PAGE = 4096
TWO_PAGE = b"SVA-INCR-FIRST-HALF-" + b"SVA-INCR-SECOND-HALF"


@pytest.fixture
def rules(tmp_path: Path) -> CompiledRuleSet:
    return CompiledRuleSet.load(write_rules(tmp_path / "rules", "incr.yar", f"""
rule Two_Page {{ strings: $m = "{TWO_PAGE.decode()}" condition: $m }}
rule Single {{ strings: $s = "SVA-INCR-SINGLE-MARK" condition: $s }}
"""))


def test_hashes_and_diff() -> None:
    a = bytearray(os.urandom(10 * PAGE + 100))
    h1 = hash_pages(memoryview(a), seed=1)
    assert len(h1) == 11
    a[3 * PAGE + 17] ^= 1
    a[-1] ^= 1
    h2 = hash_pages(memoryview(a), seed=1)
    assert changed_indices(h1, h2) == [3, 10]
    assert hash_pages(memoryview(a), seed=2) != h2  # keyed


def test_two_level_rehash_finds_single_pages() -> None:
    a = bytearray(os.urandom(3 * BLOCK_PAGES * PAGE + 5))
    first, changed = rehash(memoryview(a), 9, None)
    assert changed == list(range(len(first.pages))) and len(first.blocks) == 4
    a[BLOCK_PAGES * PAGE + 2 * PAGE] ^= 0xFF  # page 18, in block 1
    a[-1] ^= 0xFF  # the short last page
    second, changed = rehash(memoryview(a), 9, first)
    assert changed == [BLOCK_PAGES + 2, 3 * BLOCK_PAGES]
    assert second.pages == hash_pages(memoryview(a), 9) and first.pages != second.pages
    assert rehash(memoryview(a), 9, second)[1] == []


def test_unchanged_guest_rescans_nothing(tmp_path: Path, rules: CompiledRuleSet) -> None:
    with synthetic_backend(tmp_path, [(0, 4 * MiB), (0x1_0000_0000, 2 * MiB)], seed=11) as b:
        poke(b, 0x1_0000_0000 + 0x3000, b"SVA-INCR-SINGLE-MARK")
        inc = IncrementalScanner(rules)
        first = inc.cycle(b)
        assert first.full and first.pages_total == 6 * MiB // PAGE
        assert first.rules_matched == {"incr:Single"}
        second = inc.cycle(b)
        assert not second.full and second.pages_changed == 0 and second.pages_rescanned == 0 and second.calls == 0
        assert second.hit_addresses("incr:Single") == [0x1_0000_0000 + 0x3000]  # carried forward

        # one changed page: that page and one page of context each side
        poke(b, 0x200000 + 5, b"x")
        third = inc.cycle(b)
        assert (third.pages_changed, third.pages_rescanned, third.calls) == (1, 3, 1)
        assert third.rules_matched == {"incr:Single"}

        # the marker's page is overwritten: its match goes
        poke(b, 0x1_0000_0000 + 0x3000, b"overwritten!")
        fourth = inc.cycle(b)
        assert fourth.matches == [] and fourth.pages_changed == 1


def test_match_across_a_changed_and_an_unchanged_page(tmp_path: Path, rules: CompiledRuleSet) -> None:
    with synthetic_backend(tmp_path, [(0, 2 * MiB)], seed=12) as b:
        half = len(TWO_PAGE) // 2
        start = 0x40000 - half  # first half ends page 0x3f, second half starts page 0x40
        poke(b, start, TWO_PAGE[:half])
        inc = IncrementalScanner(rules)
        assert inc.cycle(b).matches == []
        poke(b, 0x40000, TWO_PAGE[half:])  # only the second page changes
        r = inc.cycle(b)
        assert not r.full and r.pages_changed == 1
        assert r.hit_addresses("incr:Two_Page") == [start]
        assert b.read(start, len(TWO_PAGE)) == TWO_PAGE
        # and the other way round: the first page changes under a known match
        poke(b, 0x40000 - half, b"X")
        assert inc.cycle(b).matches == []
        poke(b, 0x40000 - half, TWO_PAGE[:1])
        assert inc.cycle(b).hit_addresses("incr:Two_Page") == [start]


def test_full_scan_on_new_rules_and_when_most_pages_change(tmp_path: Path, rules: CompiledRuleSet) -> None:
    with synthetic_backend(tmp_path, [(0, 2 * MiB)], seed=13) as b:
        inc = IncrementalScanner(rules)
        inc.cycle(b)
        assert not inc.cycle(b).full
        inc.rules = CompiledRuleSet.load(write_rules(tmp_path / "new", "n.yar", 'rule N { strings: $a = "zz-new" condition: $a }'))
        assert inc.cycle(b).full
        assert not inc.cycle(b).full
        poke(b, 0, os.urandom(2 * MiB))
        r = inc.cycle(b)
        assert r.full and r.pages_changed == 512
        periodic = IncrementalScanner(rules, incremental=IncrementalConfig(full_rescan_every=2))
        assert [periodic.cycle(b).full for _ in range(4)] == [True, True, False, True]


def test_blocks_that_timed_out_are_retried(tmp_path: Path) -> None:
    slow = " ".join(f"$h{n} = /[0-9a-fA-F]{{{n}}}/ fullword wide ascii" for n in (20, 32, 48, 64, 128, 256))
    rules = CompiledRuleSet.load(write_rules(tmp_path / "r", "slow.yar", f"rule Slow {{ strings: {slow} condition: any of them }}"))
    with synthetic_backend(tmp_path, [(0, 16 * MiB)], seed=14) as b:
        poke(b, 0, os.urandom(8 * MiB).hex().encode())
        # (all of RAM is the retried block: allow a rescan of all of it without a full scan)
        inc = IncrementalScanner(rules, ScanConfig(timeout_s=1), IncrementalConfig(max_rescan_fraction=1.0))
        first = inc.cycle(b)
        assert [p.kind for p in first.problems] == [ProblemKind.TIMEOUT]
        second = inc.cycle(b)  # nothing changed, but the block was never scanned
        assert not second.full and second.pages_rescanned == 16 * MiB // PAGE
        assert [p.kind for p in second.problems] == [ProblemKind.TIMEOUT]


def test_bad_incremental_config() -> None:
    with pytest.raises(ConfigError, match="max_rescan_fraction"):
        IncrementalConfig(max_rescan_fraction=0)


ZERO_TAIL_RULE = """
rule Zero_Tail { strings: $z = { 53 56 41 2D 5A 45 52 4F 00 00 00 00 00 00 00 00 00 00 00 00 } condition: $z }
rule Single { strings: $s = "SVA-INCR-SINGLE-MARK" condition: $s }
"""


def test_full_scans_skip_zero_blocks_but_keep_the_context_around_them(tmp_path: Path) -> None:
    """A mostly-zero guest: the all-zero 64 KiB blocks are not scanned, yet a string whose
    zero tail lies in a skipped block and one deep inside a non-zero block are both found,
    and skipping can be turned off."""
    rules = CompiledRuleSet.load(write_rules(tmp_path / "rules", "zero.yar", ZERO_TAIL_RULE))
    block = BLOCK_PAGES * PAGE
    with synthetic_backend(tmp_path, [(0, 4 * MiB)], seed=3) as b:
        poke(b, 0, bytes(4 * MiB))  # all zero
        poke(b, 5 * block - 8, b"SVA-ZERO")  # its zero tail runs into block 5, which stays zero
        poke(b, 20 * block + 100, b"SVA-INCR-SINGLE-MARK")
        r = IncrementalScanner(rules).cycle(b)
        assert r.full
        assert r.extra["zero_blocks_skipped"] == 64 - 2
        assert r.bytes_scanned < 4 * block  # two blocks and their context, not 4 MiB
        assert r.hit_addresses("zero:Zero_Tail") == [5 * block - 8]
        assert r.hit_addresses("zero:Single") == [20 * block + 100]
        full = IncrementalScanner(rules, incremental=IncrementalConfig(skip_zero_blocks=False)).cycle(b)
        assert full.bytes_scanned == 4 * MiB and full.extra["zero_blocks_skipped"] == 0
        assert sorted(m.key for m in full.matches) == sorted(m.key for m in r.matches)


def test_a_zero_block_written_after_hashing_is_still_scanned(tmp_path: Path, rules: CompiledRuleSet) -> None:
    """The hash says zero, the bytes say otherwise by scan time (a running guest): scanned."""
    block = BLOCK_PAGES * PAGE
    with synthetic_backend(tmp_path, [(0, 1 * MiB)], seed=4) as b:
        poke(b, 0, bytes(1 * MiB))
        inc = IncrementalScanner(rules)
        hashes, _changed = inc._hash(b, [], None)
        poke(b, 7 * block + 50, b"SVA-INCR-SINGLE-MARK")  # after hashing, before the scan
        ranges, skipped = inc._nonzero_ranges(b, hashes)
        assert skipped == 15
        assert any(lo <= 7 * block + 50 and 7 * block + 70 <= hi for lo, hi in ranges)


def test_first_hash_of_zero_blocks_equals_hashing_every_page() -> None:
    """The shortcut for all-zero blocks gives exactly the page hashes a page-by-page pass does."""
    block = BLOCK_PAGES * PAGE
    buf = bytearray(os.urandom(8 * block + 3 * PAGE))  # a short last block too
    buf[2 * block : 5 * block] = bytes(3 * block)
    buf[8 * block :] = bytes(3 * PAGE)  # a zero partial block: hashed, not assumed
    view = memoryview(bytes(buf))
    got, changed = rehash(view, seed=99, previous=None)
    assert got.pages == hash_pages(view, 99) and changed == list(range(len(got.pages)))
    assert got.blocks == hash_pages(view, 99, block)
