"""Loading rule sets: namespaces, include order, externals, file:line errors, metadata,
file-only flags, the slow-rule check, and the real public rule sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from sva.errors import SignatureError
from sva.scan import CompiledRuleSet, PhysicalScanner, SlowRulePolicy, discover
from sva.scan.rules import signatures_dir
from sva.scan.sample import backend_sample, synthetic_memory
from sva.testing import synthetic_backend

from .conftest import write_rules

BIG_NUMBERS = r"""
rule Big_Numbers_Like
{
    meta:
        author = "test"
    strings:
        $c0 = /[0-9a-fA-F]{32}/ fullword wide ascii
    condition:
        $c0
}
"""
CHEAP = """
rule Cheap_Rule
{
    meta:
        author = "Jane Analyst"
        reference = "https://example.org/cheap"
        mitre_attack = "T1059.004, T1496"
    strings:
        $a = "cheap-and-cheerful-marker"
    condition:
        $a
}
"""


def test_sets_namespaces_and_include_order(tmp_path: Path) -> None:
    # 000_common.yar defines a private rule another file of the set uses, as Yara-Rules does;
    # the same rule name in two sets is fine because each set is its own namespace.
    write_rules(tmp_path / "one", "000_common.yar", "private rule is_thing { condition: true }\n")
    write_rules(tmp_path / "one", "b_user.yar", 'rule Shared { strings: $a = "abc" condition: $a and is_thing }\n')
    write_rules(tmp_path / "two", "rules.yara", 'rule Shared { strings: $a = "xyz" condition: $a }\n')
    write_rules(tmp_path, "loose.yar", 'rule Loose { strings: $a = "loose" condition: $a }\n')
    (tmp_path / "README.md").write_text("not rules")
    sets = discover(tmp_path)
    assert [s.namespace for s in sets] == [tmp_path.name, "one", "two"]
    assert [f.name for f in sets[1].files] == ["000_common.yar", "b_user.yar"]
    rs = CompiledRuleSet.load(tmp_path)
    assert rs.errors == () and rs.rule_count == 4
    assert {k for k in rs.infos} == {f"{tmp_path.name}:Loose", "one:is_thing", "one:Shared", "two:Shared"}
    assert rs.infos["one:is_thing"].is_private
    report = PhysicalScanner(rs).scan_buffer(b"..abc..xyz..loose..")
    assert report.rules_matched == {"one:Shared", "two:Shared", f"{tmp_path.name}:Loose"}


def test_externals_defined_empty(tmp_path: Path) -> None:
    text = "\n".join(
        f'rule Uses_{name} {{ condition: {name} contains "evil" }}'
        for name in ("filename", "filepath", "extension", "filetype", "owner", "md5")
    )
    path = write_rules(tmp_path, "ext.yar", text)
    rs = CompiledRuleSet.load(path)
    assert rs.rule_count == 6 and rs.externals["filepath"] == ""
    assert PhysicalScanner(rs).scan_buffer(b"evil").matches == []
    # the caller can give them values
    rs2 = CompiledRuleSet.load(path, externals={"owner": "evil-owner"})
    assert PhysicalScanner(rs2).scan_buffer(b"x").rules_matched == {"ext:Uses_owner"}
    assert rs2.fingerprint != rs.fingerprint


def test_compile_errors_name_file_and_line(tmp_path: Path) -> None:
    d = tmp_path / "set"
    write_rules(d, "a_good.yar", CHEAP)
    bad = write_rules(d, "b_bad.yar", 'rule Ok { condition: true }\n\nrule Broken {\n  condition: $nope }\n')
    undefined = write_rules(d, "c_undefined.yar", "rule Uses { condition: not_a_rule_anywhere }\n")
    with pytest.raises(SignatureError) as exc:
        CompiledRuleSet.load(d, strict=True)
    err = exc.value
    assert str(err).startswith(f"{bad}:4: ") and "$nope" in str(err)
    assert (err.path, err.line) == (str(bad), 4)
    assert [(e.path, e.line) for e in err.errors] == [(str(bad), 4), (str(undefined), 1)]

    rs = CompiledRuleSet.load(d, strict=False)
    assert [str(e).split(": ")[0] for e in rs.errors] == [f"{bad}:4", f"{undefined}:1"]
    assert "undefined identifier" in rs.errors[1].message
    assert set(rs.infos) == {"set:Cheap_Rule"}  # the good file still loads
    assert PhysicalScanner(rs).scan_buffer(b"cheap-and-cheerful-marker").rules_matched == {"set:Cheap_Rule"}


def test_error_in_an_included_file(tmp_path: Path) -> None:
    write_rules(tmp_path / "inc", "broken.inc", "rule Inner { condition: \n")
    write_rules(tmp_path / "set", "a.yar", 'include "../inc/broken.inc"\nrule A { condition: true }\n')
    write_rules(tmp_path / "set", "b.yar", CHEAP)
    rs = CompiledRuleSet.load(tmp_path / "set", strict=False)
    assert len(rs.errors) == 1 and rs.errors[0].path.endswith("broken.inc")
    assert set(rs.infos) == {"set:Cheap_Rule"}


def test_metadata_warnings_and_file_only(tmp_path: Path) -> None:
    write_rules(tmp_path / "s", "000_base.yar", "private rule is_mz { condition: uint16(0) == 0x5a4d }\n")
    write_rules(tmp_path / "s", "rules.yar", CHEAP + BIG_NUMBERS + """
import "pe"
rule Small_File { strings: $a = "x1y2z3" condition: $a and filesize < 100KB }
rule Via_Private { strings: $a = "x1y2z3" condition: $a and is_mz }
rule Pe_Only { condition: pe.number_of_sections > 3 }
""")
    rs = CompiledRuleSet.load(tmp_path / "s")
    cheap = rs.info("s", "Cheap_Rule")
    assert cheap is not None and cheap.author == "Jane Analyst" and cheap.reference == "https://example.org/cheap"
    assert cheap.techniques == ("T1059.004", "T1496") and cheap.line == 2
    assert [str(w).rsplit(": ", 1)[1] for w in rs.warnings] == ['string "$c0" may slow down scanning']
    flagged = {i.name: i.file_conditions for i in rs.file_only}
    assert flagged == {
        "is_mz": ("offset-0 anchor (uintN(0))",),
        "Small_File": ("filesize",),
        "Via_Private": ("uses is_mz",),
        "Pe_Only": ("module pe",),
    }
    match = PhysicalScanner(rs).scan_buffer(b"--cheap-and-cheerful-marker--", base_address=0x1000).matches[0]
    assert (match.author, match.reference, match.techniques) == ("Jane Analyst", "https://example.org/cheap",
                                                                  ("T1059.004", "T1496"))  # fmt: skip
    assert match.hits[0].address == 0x1002


def test_slow_rule_flagged_then_refused(tmp_path: Path) -> None:
    d = tmp_path / "slowset"
    write_rules(d, "000_private.yar", 'private rule slow_private { strings: $h = /[0-9a-f]{40}/ fullword ascii '
                                      'condition: $h }\n')  # fmt: skip
    write_rules(d, "rules.yar", CHEAP + BIG_NUMBERS + 'rule Uses_Slow { strings: $a = "q" condition: $a and slow_private }\n')
    sample = synthetic_memory(1 << 20)
    policy = SlowRulePolicy(max_rule_ms_per_mib=10.0, sample_size=1 << 20)
    rs = CompiledRuleSet.load(d, slow_policy=policy, sample=sample)
    assert rs.cost is not None
    slow = {c.key: c for c in rs.cost.slow}
    assert "slowset:Big_Numbers_Like" in slow and "slowset:Cheap_Rule" not in slow
    assert slow["slowset:Big_Numbers_Like"].ms_per_mib > 10.0
    assert slow["slowset:Big_Numbers_Like"].path.endswith("rules.yar") and slow["slowset:Big_Numbers_Like"].line > 1
    assert "slowset:Big_Numbers_Like" in rs.infos  # flagged only: still loaded
    assert rs.cost.timings < 20

    refused = CompiledRuleSet.load(d, slow_policy=SlowRulePolicy(sample_size=1 << 20, refuse_slow=True), sample=sample)
    assert refused.cost is not None
    assert "slowset:Big_Numbers_Like" in refused.cost.refused
    assert "slowset:Big_Numbers_Like" not in refused.infos and "slowset:Cheap_Rule" in refused.infos
    if "slowset:slow_private" in refused.cost.refused:  # its user goes with it
        assert "slowset:Uses_Slow" in refused.cost.refused + refused.cost.refused_dependents
        assert "slowset:Uses_Slow" not in refused.infos
    hex_text = b" " + b"0123456789abcdef" * 2 + b" cheap-and-cheerful-marker"
    assert PhysicalScanner(refused).scan_buffer(hex_text).rules_matched == {"slowset:Cheap_Rule"}
    assert PhysicalScanner(rs).scan_buffer(hex_text).rules_matched == {"slowset:Cheap_Rule", "slowset:Big_Numbers_Like"}
    assert refused.fingerprint != rs.fingerprint


def test_samples(tmp_path: Path) -> None:
    a, b = synthetic_memory(256 * 1024, seed=1), synthetic_memory(256 * 1024, seed=1)
    assert a == b and len(a) == 256 * 1024 and a != synthetic_memory(256 * 1024, seed=2)
    big = synthetic_memory(1 << 20)
    assert big.count(bytes(4096)) > 50 and b"\x7fELF" in big  # zero pages and ELF headers among the kinds
    with synthetic_backend(tmp_path, [(0, 1 << 20), (0x1_0000_0000, 1 << 20)], seed=4) as guest:
        sample = backend_sample(guest, size=256 * 1024, piece=64 * 1024)
        assert len(sample) == 256 * 1024
        # pieces spread over both regions
        assert sample[:64] == guest.read(0, 64)
        assert sample[-65536:] == guest.read(0x1_0000_0000 + (1 << 19), 65536)


def test_default_bundle() -> None:
    rs = CompiledRuleSet.default()
    assert rs.errors == () and rs.warnings == ()
    assert set(rs.namespaces) >= {"memory", "test"}
    assert "test:SVA_Lab_Marker" in rs.infos
    # network/ holds flow-payload rules for `sva net`: not part of the memory rule set
    assert (signatures_dir() / "network").is_dir() and "network" not in rs.namespaces
    for info in rs.infos.values():
        assert info.author and info.description and info.file_conditions == ()
        if info.namespace == "memory":
            assert info.reference and info.techniques, info.key


# -- the real public rule sets ----------------------------------------------------------------


def test_public_rule_sets_compile(yara_testdata: Path) -> None:
    rs = CompiledRuleSet.load(yara_testdata)
    assert rs.namespaces == ("elastic-linux", "signature-base", "yara-rules")
    assert rs.errors == ()  # 12 signature-base files need the externals defined as ""
    assert rs.rule_count == 5096
    per_set = {ns: sum(1 for i in rs.infos.values() if i.namespace == ns) for ns in rs.namespaces}
    assert per_set == {"elastic-linux": 902, "signature-base": 3284, "yara-rules": 910}
    # all six warnings are Big_Numbers' slow strings; none says a set could not be split
    assert len(rs.warnings) == 6
    assert all(w.path.endswith("crypto_signatures.yar") and "slow down" in w.message for w in rs.warnings)
    # DRL 1.1: author and reference survive into what users see
    info = rs.info("signature-base", "Hacktool_Strings_p0wnedShell")
    assert info is not None and info.author == "Florian Roth" and info.reference
    assert info.file_conditions == ("filesize",)
    # about two thirds of signature-base only makes sense on files; elastic's rules are memory rules
    assert sum(1 for i in rs.file_only if i.namespace == "signature-base") > 2000
    assert sum(1 for i in rs.file_only if i.namespace == "elastic-linux") <= 1


def test_slow_rule_check_on_5096_rules_is_cheap(yara_testdata: Path) -> None:
    policy = SlowRulePolicy(max_rule_ms_per_mib=10.0, sample_size=1 << 20)
    rs = CompiledRuleSet.load(yara_testdata, slow_policy=policy)
    assert rs.cost is not None
    slow = {c.key for c in rs.cost.slow}
    big = {f"yara-rules:Big_Numbers{i}" for i in range(6)}
    # The six Big_Numbers regexes cost 5-10x the budget; the xor rules of signature-base
    # cost about a third of it. Timing noise on a shared machine may add a neighbour.
    assert len(big & slow) >= 5, rs.cost.to_json()
    assert all(k.startswith("yara-rules:") for k in slow), rs.cost.to_json()
    # bisecting, not timing 5096 rules one by one
    assert rs.cost.timings < 300 and rs.cost.unchecked == ()
