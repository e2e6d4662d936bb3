"""A small YARA source splitter: a file's imports, includes and rules as text units.

libyara compiles a whole namespace at once and yara-python does not say which rule lives
where, which rules another rule needs, or what a condition looks like. The rule loader
needs all three: to time one rule alone (with the private rules it uses), to rebuild a
namespace without a refused rule, and to flag conditions that only make sense on a file
(`filesize`, offset-0 anchors, `pe.`). This module cuts source text into rules the way
YARA's lexer does (comments, "strings", /regexes/ and { hex } braces), without parsing
the grammar: anything it cannot cut is left for libyara to report with file:line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# YARA stops a regular expression or hex-string match after this many bytes
# (RE_SCAN_LIMIT in libyara's limits.h), so no match of those kinds is longer.
YARA_RE_SCAN_LIMIT = 4096

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class RuleUnit:
    """One rule as written in a file."""

    name: str
    path: str  # file it is written in
    line: int  # line of its `rule` keyword (1-based)
    text: str  # from the first modifier to the closing brace
    is_private: bool
    is_global: bool
    tags: tuple[str, ...]
    strings_text: str  # the `strings:` section, "" when absent
    condition_code: str  # the `condition:` section with literals and comments blanked out
    imports: tuple[str, ...]  # modules imported by its file (a rule compiled alone needs them)
    refs: frozenset[str] = field(default_factory=frozenset)  # identifiers its condition names
    ref_prefixes: tuple[str, ...] = ()  # `Rule_*` wildcards in its condition

    def file_conditions(self) -> tuple[str, ...]:
        """Reasons this rule can only match a file-like block (header at offset 0)."""
        return file_only_reasons(self.condition_code)

    def longest_literal(self) -> int:
        """Bytes of the longest text or hex literal it defines (regexes count as 0)."""
        return longest_literal(self.strings_text)


@dataclass(frozen=True)
class SourceFile:
    """A parsed rule file."""

    path: str
    imports: tuple[str, ...]
    includes: tuple[str, ...]  # as written, relative to the file's directory
    rules: tuple[RuleUnit, ...]
    problems: tuple[str, ...] = ()  # "line N: what could not be cut" (libyara has the final word)


# What can hide a brace or a keyword from a plain text search, as YARA's lexer sees it:
# comments, "text strings" and /regular expressions/ (`/` is never an operator in YARA:
# division is `\`). Hex strings need no care: their braces balance.
_LITERAL = (
    r'(?P<lc>//[^\n]*)|(?P<bc>/\*.*?\*/)|(?P<str>"(?:[^"\\\n]|\\.)*")|(?P<re>/(?:[^/\\\n]|\\.)+/)'
)
_TOKEN = re.compile(_LITERAL + r"|(?P<open>\{)|(?P<close>\})", re.S)
_LITERALS = re.compile(_LITERAL, re.S)
_GAP = re.compile(r"(?:\s+|//[^\n]*|/\*.*?\*/)*", re.S)
_QUOTED = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
_HEADER = re.compile(r"((?:(?:private|global)\s+)*)rule\s+([A-Za-z_]\w*)([^{]*)\{")


def _blank(text: str) -> str:
    """`text` with comments and the insides of "strings" and /regexes/ turned into spaces
    (same length, newlines kept), so that searches for keywords and names see only code."""

    def spaces(m: re.Match[str]) -> str:
        s = m.group()
        kind = m.lastgroup
        if kind == "bc":
            return re.sub(r"[^\n]", " ", s)
        if kind == "lc":
            return " " * len(s)
        return s[0] + " " * (len(s) - 2) + s[-1]  # strings and regexes never span lines

    return _LITERALS.sub(spaces, text)


class _Lines:
    """Line numbers of increasing offsets, counted once."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1

    def __call__(self, pos: int) -> int:
        if pos < self.pos:
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def parse_source(text: str, path: str) -> SourceFile:
    """Cut one file's text into imports, includes and rules."""
    imports: list[str] = []
    includes: list[str] = []
    units: list[dict] = []
    problems: list[str] = []
    line_at = _Lines(text)
    pos, n = 0, len(text)
    while True:
        pos = _GAP.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= n:
            break
        m = _IDENT.match(text, pos)
        word = m.group() if m else ""
        if word in ("import", "include"):
            q = _QUOTED.match(text, _GAP.match(text, m.end()).end())  # type: ignore[union-attr]
            if q is None:
                problems.append(f"line {line_at(pos)}: {word} without a quoted name")
                break
            (imports if word == "import" else includes).append(q.group(1))
            pos = q.end()
            continue
        unit, pos = _cut_rule(text, pos, path, problems, line_at)
        if unit is None:
            break
        units.append(unit)
    imports_t = tuple(imports)
    rules = tuple(RuleUnit(imports=imports_t, **u) for u in units)
    return SourceFile(path, imports_t, tuple(includes), rules, tuple(problems))


def _cut_rule(
    text: str, pos: int, path: str, problems: list[str], line_at: _Lines
) -> tuple[dict | None, int]:
    head = _HEADER.match(text, pos)
    if head is None:
        problems.append(f"line {line_at(pos)}: expected a rule")
        return None, pos
    modifiers = set(head.group(1).split())
    name = head.group(2)
    rule_line = line_at(head.start() + head.group(0).index("rule"))
    tail = head.group(3)
    tags = tuple(_IDENT.findall(tail.split(":", 1)[1])) if ":" in tail else ()
    depth = 1
    end = -1
    for tok in _TOKEN.finditer(text, head.end()):
        kind = tok.lastgroup
        if kind == "open":
            depth += 1
        elif kind == "close":
            depth -= 1
            if depth == 0:
                end = tok.end()
                break
    if end < 0:
        problems.append(f"line {rule_line}: rule {name} is not closed")
        return None, len(text)
    body = text[head.end() : end - 1]
    blank = _blank(body)
    cond_at = _section(blank, _CONDITION)
    strings_at = _section(blank, _STRINGS)
    condition_code = blank[cond_at:] if cond_at >= 0 else ""
    strings_text = ""
    if strings_at >= 0:
        strings_text = body[strings_at : cond_at if cond_at > strings_at else len(body)]
    refs, prefixes = _references(condition_code)
    unit = dict(
        name=name,
        path=path,
        line=rule_line,
        text=text[pos:end],
        is_private="private" in modifiers,
        is_global="global" in modifiers,
        tags=tags,
        strings_text=strings_text,
        condition_code=condition_code,
        refs=refs,
        ref_prefixes=prefixes,
    )
    return unit, end


_CONDITION = re.compile(r"(?<![\w$])condition\s*:")
_STRINGS = re.compile(r"(?<![\w$])strings\s*:")


def _section(blank_body: str, rx: re.Pattern[str]) -> int:
    m = rx.search(blank_body)
    return m.end() if m else -1


_REF = re.compile(r"(?<![\w$#@!.])([A-Za-z_]\w*)(\*)?")
_KEYWORDS = frozenset(
    "all and any at base64 base64wide condition contains defined endswith entrypoint false filesize "
    "for fullword global icontains iendswith iequals import in include istartswith matches meta "
    "nocase none not of or private rule startswith strings them true wide ascii xor int8 int16 "
    "int32 int8be int16be int32be uint8 uint16 uint32 uint8be uint16be uint32be".split()
)


def _references(condition_code: str) -> tuple[frozenset[str], tuple[str, ...]]:
    names: set[str] = set()
    prefixes: list[str] = []
    for m in _REF.finditer(condition_code):
        word = m.group(1)
        if word in _KEYWORDS:
            continue
        if m.group(2):
            prefixes.append(word)
        else:
            names.add(word)
    return frozenset(names), tuple(prefixes)


# -- what a condition needs ---------------------------------------------------------------

_FILE_ONLY_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?<![\w.])filesize\b"), "filesize"),
    (re.compile(r"\bu?int(?:8|16|32)(?:be)?\s*\(\s*(?:0x0+|0+)\s*\)"), "offset-0 anchor (uintN(0))"),
    (re.compile(r"\bat\s+(?:0x0+|0+)\b(?!\s*\.\.)"), "string at offset 0"),
    (re.compile(r"\bin\s*\(\s*(?:0x0+|0+)\s*\.\."), "string in a range from offset 0"),
    (re.compile(r"(?<![\w.])(pe|elf|dotnet|macho)\s*\."), "module"),
    (re.compile(r"(?<![\w.])entrypoint\b"), "entrypoint"),
)


def file_only_reasons(condition_code: str) -> tuple[str, ...]:
    """Why a condition can only hold for a file-like block, e.g. ("filesize", "module pe")."""
    reasons: list[str] = []
    for rx, what in _FILE_ONLY_PATTERNS:
        for m in rx.finditer(condition_code):
            label = f"module {m.group(1)}" if what == "module" else what
            if label not in reasons:
                reasons.append(label)
    return tuple(reasons)


_TEXT_STRING = re.compile(r'\$\w*\s*=\s*"((?:[^"\\\n]|\\.)*)"([^\n$]*)')
_HEX_STRING = re.compile(r"\$\w*\s*=\s*\{([^}]*)\}")
_JUMP = re.compile(r"\[\s*(\d*)\s*(-?)\s*(\d*)\s*\]")
_ESCAPE = re.compile(r"\\x[0-9a-fA-F]{2}|\\.")


def longest_literal(strings_text: str) -> int:
    """Bytes of the longest text or hex string defined in a `strings:` section.

    Wide doubles a text string, base64 grows it by 4/3 (8/3 for base64wide). A hex string
    with an unbounded jump counts as YARA's regex scan limit. Regexes are left out: libyara
    stops them at YARA_RE_SCAN_LIMIT bytes anyway.
    """
    best = 0
    for m in _TEXT_STRING.finditer(strings_text):
        n = len(_ESCAPE.sub("_", m.group(1)))
        mods = m.group(2)
        if "base64wide" in mods:
            n = n * 8 // 3 + 4
        elif "base64" in mods:
            n = n * 4 // 3 + 4
        if re.search(r"\bwide\b", mods):
            n *= 2
        best = max(best, n)
    for m in _HEX_STRING.finditer(strings_text):
        body = re.sub(r"//[^\n]*|/\*.*?\*/", " ", m.group(1), flags=re.S)
        n = 0
        for j in _JUMP.finditer(body):
            lo, dash, hi = j.groups()
            if dash and not hi:
                n += YARA_RE_SCAN_LIMIT
            else:
                n += int(hi or lo or 0)
        body = _JUMP.sub(" ", body)
        # alternatives ( a | b ): count the longest roughly as all bytes; an upper bound is fine
        n += len(re.findall(r"[0-9A-Fa-f?~]{2}", body.replace("~", "")))
        best = max(best, n)
    return best


def parse_file(path: Path, seen: set[Path] | None = None) -> list[SourceFile]:
    """Parse `path` and, first, the files it includes (resolved against its directory)."""
    seen = set() if seen is None else seen
    real = path.resolve()
    if real in seen:
        return []
    seen.add(real)
    text = path.read_text(encoding="utf-8", errors="replace")
    parsed = parse_source(text, str(path))
    out: list[SourceFile] = []
    for inc in parsed.includes:
        target = (path.parent / inc) if not Path(inc).is_absolute() else Path(inc)
        if target.is_file():
            out.extend(parse_file(target, seen))
    out.append(parsed)
    return out


# -- rules as a dependency graph ------------------------------------------------------------


class RuleGraph:
    """The rules of one namespace in file order, with who uses whom."""

    def __init__(self, units: list[RuleUnit] | tuple[RuleUnit, ...]) -> None:
        self.units = tuple(units)
        self.order = {u.name: i for i, u in enumerate(self.units)}
        self.by_name = {u.name: u for u in self.units}
        self.globals = tuple(u.name for u in self.units if u.is_global)

    def direct_deps(self, unit: RuleUnit) -> set[str]:
        deps = {r for r in unit.refs if r in self.by_name and r != unit.name}
        for prefix in unit.ref_prefixes:
            deps.update(n for n in self.by_name if n.startswith(prefix) and n != unit.name)
        return deps

    def closure(self, names: set[str] | list[str] | tuple[str, ...]) -> list[RuleUnit]:
        """`names`, every rule they use (transitively) and the namespace's global rules, in
        file order: what a source holding only `names` needs in order to compile and run."""
        need = set(names) | set(self.globals)
        stack = list(need)
        while stack:
            for dep in self.direct_deps(self.by_name[stack.pop()]):
                if dep not in need:
                    need.add(dep)
                    stack.append(dep)
        return sorted((self.by_name[n] for n in need), key=lambda u: self.order[u.name])

    def dependents(self, names: set[str]) -> set[str]:
        """Rules that use any of `names`, directly or not (not including `names`)."""
        out: set[str] = set()
        changed = True
        bad = set(names)
        while changed:
            changed = False
            for u in self.units:
                if u.name not in bad and self.direct_deps(u) & bad:
                    bad.add(u.name)
                    out.add(u.name)
                    changed = True
        return out

    def render(self, units: list[RuleUnit]) -> str:
        """Compilable source text for `units` (already closed over their dependencies)."""
        imports = sorted({i for u in units for i in u.imports})
        head = "".join(f'import "{i}"\n' for i in imports)
        return head + "\n\n".join(u.text for u in units) + "\n"
