"""Cutting YARA text into rules: braces inside literals, dependencies, file-only conditions."""

from __future__ import annotations

import yara
from hypothesis import given, settings
from hypothesis import strategies as st

from sva.scan.source import RuleGraph, file_only_reasons, longest_literal, parse_source

TRICKY = r'''
import "pe"
// rule Commented { condition: true }
/* rule Blocked { condition: true } } */
private rule base_check { condition: uint16(0) == 0x5a4d }
rule Braces : tag1 tag2 {
    meta:
        description = "a } brace and a { brace, and condition: inside text"
    strings:
        $hex = { 4D 5A [2-4] ( 90 | 00 ) ?? }   // hex braces balance
        $re = /a\/b{2,3}}/                       // a brace in a regex
        $txt = "quote \" and } brace" wide
    condition:
        base_check and ($hex or $re or $txt) and filesize < 1MB
}
global rule Everywhere { condition: true }
rule Star { condition: any of (Brace*) and Everywhere }
'''


def test_cuts_rules_like_libyara() -> None:
    parsed = parse_source(TRICKY, "tricky.yar")
    assert parsed.problems == ()
    assert [u.name for u in parsed.rules] == ["base_check", "Braces", "Everywhere", "Star"]
    assert [r.identifier for r in yara.compile(source=TRICKY)] == [u.name for u in parsed.rules]
    braces = parsed.rules[1]
    assert braces.tags == ("tag1", "tag2") and braces.line == 6
    assert braces.text.startswith("rule Braces") and braces.text.endswith("}")
    assert parsed.imports == ("pe",)
    assert parsed.rules[0].is_private and parsed.rules[2].is_global
    # each rule's text compiles on its own once its dependencies come along
    graph = RuleGraph(parsed.rules)
    for u in parsed.rules:
        yara.compile(source=graph.render(graph.closure([u.name])))


def test_dependencies_and_wildcards() -> None:
    graph = RuleGraph(parse_source(TRICKY, "tricky.yar").rules)
    closure = [u.name for u in graph.closure(["Star"])]
    assert closure == ["base_check", "Braces", "Everywhere", "Star"]  # Brace* plus its private dep
    assert graph.dependents({"base_check"}) == {"Braces", "Star"}


def test_file_only_reasons() -> None:
    assert file_only_reasons("filesize < 1MB and $a") == ("filesize",)
    assert file_only_reasons("uint16(0) == 0x5a4d") == ("offset-0 anchor (uintN(0))",)
    assert file_only_reasons("uint32be(0x0) == 1") == ("offset-0 anchor (uintN(0))",)
    assert file_only_reasons("$a at 0") == ("string at offset 0",)
    assert file_only_reasons("$a in (0 .. 255)") == ("string in a range from offset 0",)
    assert file_only_reasons("pe.imphash() == \"x\" or elf.type == 2") == ("module pe", "module elf")
    assert file_only_reasons("$a and #b > 2 and uint16(@a[1]) == 3 and $c at 10") == ()


def test_longest_literal() -> None:
    assert longest_literal('$a = "abcd"\n$b = "xy" wide\n') == 4
    assert longest_literal('$a = "abcdef" wide\n') == 12
    assert longest_literal(r'$a = "\x41\x42C"' + "\n") == 3
    assert longest_literal("$h = { 01 02 [4-8] 03 }\n") == 11
    assert longest_literal("$h = { 01 [-] 02 }\n") > 4096


@settings(max_examples=60, deadline=None)
@given(
    names=st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True), min_size=1, max_size=6, unique=True),
    junk=st.sampled_from(['"}{"', '"\\"}"', "/}{2}/", "{ 41 [1-2] 42 }", '"//"', '"/*"']),
)
def test_generated_sets_cut_like_libyara(names: list[str], junk: str) -> None:
    kw = {"rule", "private", "global", "import", "include", "condition", "strings", "meta", "true",
          "false", "and", "or", "not", "all", "any", "of", "them", "at", "in", "for", "filesize"}  # fmt: skip
    names = [n for n in names if n.lower() not in kw and not n.startswith(("uint", "int"))]
    if not names:
        return
    text = "\n".join(
        f"rule {n} {{ meta: m = {junk if junk.startswith(chr(34)) else chr(34) + 'x' + chr(34)} "
        f"strings: $a = {junk} condition: $a }} // }}"
        for n in names
    )
    try:
        expected = [r.identifier for r in yara.compile(source=text)]
    except yara.Error:
        return  # libyara refuses it (e.g. a duplicate name in another case): nothing to compare
    assert [u.name for u in parse_source(text, "gen.yar").rules] == expected
