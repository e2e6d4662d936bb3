"""Key and array-item line numbers recovered from TOML source text."""

from __future__ import annotations

import json
import tomllib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sva.engine.tomlpos import key_lines, line_of

DOC = '''\
# comment [not a table]
title = "x # not a comment"
"quoted key" = 'lit'
a.b.c = 1

[server]
desc = """
line = inside a string
[not.a.table]
"""
ports = [ 80,
  # a comment
  443, ]
inline = { x = 1, y = "}" }

[[rule]]
id = "one"

[[rule]]
id = "two"
[rule.extra]
k = 'v'
[[rule.sub]]
n = 1
'''


def test_known_document() -> None:
    tomllib.loads(DOC)
    lines = key_lines(DOC)
    expect = {
        ("title",): 2, ("quoted key",): 3, ("a",): 4, ("a", "b"): 4, ("a", "b", "c"): 4,
        ("server",): 6, ("server", "desc"): 7, ("server", "ports"): 11, ("server", "ports", 0): 11,
        ("server", "ports", 1): 13, ("server", "inline"): 14, ("server", "inline", "y"): 14,
        ("rule",): 16, ("rule", 0): 16, ("rule", 0, "id"): 17, ("rule", 1): 19, ("rule", 1, "id"): 20,
        ("rule", 1, "extra"): 21, ("rule", 1, "extra", "k"): 22, ("rule", 1, "sub", 0): 23,
        ("rule", 1, "sub", 0, "n"): 24,
    }  # fmt: skip
    assert {k: lines.get(k) for k in expect} == expect
    assert ("not", "a", "table") not in lines
    assert line_of(lines, ("rule", 1, "id", 5)) == 20  # nearest known parent
    assert line_of(lines, ("nowhere",)) == 1


def test_invalid_toml_gives_what_it_can() -> None:
    lines = key_lines('a = 1\nb = "unterminated\nc = 3\n')
    assert lines[("a",)] == 1


# -- generated documents ------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
_scalar = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.booleans().map(lambda b: "true" if b else "false"),
    _text.map(lambda s: json.dumps(s, ensure_ascii=False)),  # a basic string (JSON's escapes are TOML's)
    _text.filter(lambda s: "'" not in s).map(lambda s: f"'{s}'"),
    st.lists(_text.filter(lambda s: '"""' not in s and "\\" not in s and not s.endswith('"')), max_size=3)
    .map(lambda parts: '"""' + "\n".join(parts) + '"""'),
)
_key = st.sampled_from(["k", "name", "x-y", "v_2", '"a b"', "'lit.key'"])


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, dict[tuple[Any, ...], int]]:
    lines: list[str] = []
    expected: dict[tuple[Any, ...], int] = {}
    aot = 0
    for t in range(draw(st.integers(0, 4))):
        if t > 0 or draw(st.booleans()):
            lines.append(f"[[items]]  # table {t}")
            path: tuple[Any, ...] = ("items", aot)
            aot += 1
            expected[path] = len(lines)
        else:
            path = ()
        keys = draw(st.lists(_key, unique=True, max_size=4))
        for key in keys:
            name = tomllib.loads(f"{key} = 1").popitem()[0]
            if draw(st.booleans()):
                value = draw(_scalar)
                expected[(*path, name)] = len(lines) + 1
                lines.extend(f"{key} = {value}".split("\n"))
            else:
                items = draw(st.lists(_scalar, max_size=3))
                lines.append(f"{key} = [  # array")
                expected[(*path, name)] = len(lines)
                for i, item in enumerate(items):
                    first = len(lines) + 1
                    lines.extend(f"  {item},".split("\n"))
                    expected[(*path, name, i)] = first
                    if draw(st.booleans()):
                        lines.append("  # a comment, with ] and , and = inside")
                lines.append("]")
        lines.append("")
    return "\n".join(lines) + "\n", expected


@settings(max_examples=150, deadline=None)
@given(documents())
def test_generated_documents(doc: tuple[str, dict[tuple[Any, ...], int]]) -> None:
    text, expected = doc
    tomllib.loads(text)  # the generator only makes valid TOML
    lines = key_lines(text)
    assert {k: lines.get(k) for k in expected} == expected, text
