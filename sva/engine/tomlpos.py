"""Line numbers for the keys and array items of a TOML document.

`tomllib` parses TOML but keeps no positions, and a rules error must say `file:line`.
`key_lines(text)` walks a document that tomllib has already accepted and maps each key
path to the line it starts on:

    [ruleset]                 ("ruleset",)                     -> 1
    version = "1"             ("ruleset", "version")           -> 2
    [[rule]]                  ("rule",), ("rule", 0)           -> 4
    patterns = [              ("rule", 0, "patterns")          -> 5
      'a(',                   ("rule", 0, "patterns", 0)       -> 6

Array-of-tables elements get their index, as in the parsed document, so a path into the
tomllib result is also a key here. It only has to be right for valid TOML; on anything
else it stops early and the caller falls back to the nearest enclosing path it knows.
"""

from __future__ import annotations

import re
import tomllib

KeyPath = tuple[str | int, ...]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_END = re.compile(r"[,\]}\n#]")


class _Locator:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines: dict[KeyPath, int] = {}
        self.aot_count: dict[KeyPath, int] = {}  # array-of-tables path -> elements seen

    # -- characters ----------------------------------------------------------------
    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < len(self.s) else ""

    def advance(self, n: int = 1) -> None:
        self.line += self.s.count("\n", self.i, self.i + n)
        self.i += n

    def skip_spaces(self) -> None:
        while self.peek() in (" ", "\t") and self.peek():
            self.i += 1

    def skip_blank(self) -> None:
        """Spaces, newlines and comments."""
        while True:
            c = self.peek()
            if c and c in " \t\r\n":
                self.advance()
            elif c == "#":
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end
            else:
                return

    def expect(self, text: str) -> None:
        if not self.s.startswith(text, self.i):
            raise ValueError(f"expected {text!r} at line {self.line}")
        self.advance(len(text))

    # -- keys ------------------------------------------------------------------------
    def key_part(self) -> str:
        c = self.peek()
        if c == '"':
            start = self.i
            self.basic_string()
            raw = self.s[start : self.i]
            return str(tomllib.loads(f"k = {raw}")["k"])
        if c == "'":
            end = self.s.index("'", self.i + 1)
            part = self.s[self.i + 1 : end]
            self.advance(end + 1 - self.i)
            return part
        m = _BARE_KEY.match(self.s, self.i)
        if not m:
            raise ValueError(f"no key at line {self.line}")
        self.advance(m.end() - self.i)
        return m.group()

    def key_path(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self.skip_spaces()
            parts.append(self.key_part())
            self.skip_spaces()
            if self.peek() != ".":
                return tuple(parts)
            self.advance()

    def resolve(self, raw: tuple[str, ...]) -> KeyPath:
        """Insert the current index after each array-of-tables along `raw`."""
        out: KeyPath = ()
        for part in raw:
            out = (*out, part)
            if out in self.aot_count:
                out = (*out, self.aot_count[out] - 1)
        return out

    # -- values ----------------------------------------------------------------------
    def basic_string(self) -> None:
        self.advance()  # opening quote
        while True:
            c = self.peek()
            if not c or c == "\n":
                raise ValueError("unterminated string")
            if c == "\\":
                self.advance(2)
            elif c == '"':
                self.advance()
                return
            else:
                self.advance()

    def multiline_string(self, quote: str) -> None:
        self.advance(3)
        while self.i < len(self.s):
            c = self.peek()
            if quote == '"' and c == "\\":
                self.advance(2)
            elif self.s.startswith(quote * 3, self.i):
                n = 3
                while n < 5 and self.peek(n) == quote:  # up to two quotes may end the content
                    n += 1
                self.advance(n)
                return
            else:
                self.advance()
        raise ValueError("unterminated multi-line string")

    def value(self, path: KeyPath) -> None:
        c = self.peek()
        if c == "[":
            self.advance()
            index = 0
            while True:
                self.skip_blank()
                if self.peek() == "]":
                    self.advance()
                    return
                self.lines[(*path, index)] = self.line
                self.value((*path, index))
                self.skip_blank()
                if self.peek() == ",":
                    self.advance()
                    index += 1
                elif self.peek() == "]":
                    self.advance()
                    return
                else:
                    raise ValueError(f"bad array at line {self.line}")
        elif c == "{":
            self.advance()
            while True:
                self.skip_spaces()
                if self.peek() == "}":
                    self.advance()
                    return
                line = self.line
                sub = (*path, *self.key_path())
                self.expect("=")
                self.skip_spaces()
                self.lines[sub] = line
                self.value(sub)
                self.skip_spaces()
                if self.peek() == ",":
                    self.advance()
        elif self.s.startswith('"""', self.i) or self.s.startswith("'''", self.i):
            self.multiline_string(c)
        elif c == '"':
            self.basic_string()
        elif c == "'":
            end = self.s.index("'", self.i + 1)
            self.advance(end + 1 - self.i)
        else:
            m = _SCALAR_END.search(self.s, self.i)
            self.advance((m.start() if m else len(self.s)) - self.i)

    # -- document --------------------------------------------------------------------
    def run(self) -> dict[KeyPath, int]:
        table: KeyPath = ()
        try:
            while True:
                self.skip_blank()
                if self.i >= len(self.s):
                    break
                line = self.line
                if self.s.startswith("[[", self.i):
                    self.advance(2)
                    raw = self.key_path()
                    self.expect("]]")
                    base = (*self.resolve(raw[:-1]), raw[-1])
                    n = self.aot_count.get(base, 0)
                    self.aot_count[base] = n + 1
                    table = (*base, n)
                    self.lines.setdefault(base, line)
                    self.lines[table] = line
                elif self.peek() == "[":
                    self.advance()
                    table = self.resolve(self.key_path())
                    self.expect("]")
                    self.lines.setdefault(table, line)
                else:
                    keys = self.key_path()
                    self.expect("=")
                    self.skip_spaces()
                    for k in range(1, len(keys)):  # dotted keys define their parents
                        self.lines.setdefault((*table, *keys[:k]), line)
                    full = (*table, *keys)
                    self.lines[full] = line
                    self.value(full)
        except (ValueError, IndexError, tomllib.TOMLDecodeError):
            pass  # not valid TOML after all: keep what we have
        return self.lines


def key_lines(text: str) -> dict[KeyPath, int]:
    """Key path -> 1-based line, for every table, key and array item in `text`."""
    return _Locator(text).run()


def line_of(lines: dict[KeyPath, int], path: KeyPath) -> int:
    """The line of `path`, or of its nearest enclosing path that has one (else 1)."""
    p = tuple(path)
    while p:
        if p in lines:
            return lines[p]
        p = p[:-1]
    return 1
