"""Loading rule files (TOML) into a typed `RuleSet`, with errors that say `file:line: what`.

Why TOML: the standard library parses it (tomllib, no dependency), the appliance's
configuration is TOML too, and its syntax has few surprises (no implicit typing of
`no`/`on`/`1.10` as YAML has). tomllib keeps no positions, so `sva.engine.tomlpos`
finds the line of every key and list item in the source text.

Checks, each reported at the line of the offending key or list item (or the table, for
a missing key): TOML syntax; unknown top-level tables and unknown keys (with a guess at
the intended one); wrong value types; enum values (maturity, severity); rule kinds;
regular expressions (compiled here, once); ids and ATT&CK ids; per-kind cross-field
checks; duplicate ids across every file of one load; a missing `[ruleset] version`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from sva.engine.rules import (
    DEFAULT_MATURITIES,
    RULE_KINDS,
    Maturity,
    Rule,
    RuleFile,
    RuleSet,
    Suppression,
    check_not_empty,
    meta,
)
from sva.engine.tomlpos import KeyPath, key_lines, line_of
from sva.errors import ConfigError, RulesError

MAX_RULES_FILE = 4 << 20  # bytes; a rules file is small text
TOP_LEVEL = ("ruleset", "rule", "suppression")
_TOML_POSITION = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$")


@dataclass(frozen=True, kw_only=True)
class _Header:
    """The `[ruleset]` table every rules file starts with."""

    name: str = ""
    version: str = field(metadata=meta(check_not_empty))
    description: str = ""


class _Bad:
    """Marks a value that failed conversion (its error is already recorded)."""


_BAD = _Bad()


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


class _FileLoader:
    """Converts one parsed file; errors accumulate in `errors`."""

    def __init__(self, path: str, text: str, seen_ids: dict[str, str]) -> None:
        self.path = path
        self.text = text
        self.lines = key_lines(text)
        self.errors: list[RulesError] = []
        self.seen_ids = seen_ids  # id -> "file:line" where first defined, across the load

    def err(self, keypath: KeyPath, message: str) -> None:
        self.errors.append(RulesError(self.path, line_of(self.lines, keypath), message))

    def where(self, keypath: KeyPath) -> str:
        return f"{self.path}:{line_of(self.lines, keypath)}"

    # -- values ------------------------------------------------------------------------
    def convert(self, value: Any, tp: Any, keypath: KeyPath, what: str) -> Any:
        origin = get_origin(tp)
        if tp is Any:
            return value
        if origin in (typing.Union, types.UnionType):
            options = [a for a in get_args(tp) if a is not type(None)]
            return self.convert(value, options[0], keypath, what) if len(options) == 1 else value
        if tp is bool:
            return value if isinstance(value, bool) else self.wrong(value, "true or false", keypath, what)
        if tp is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            return value if ok else self.wrong(value, "an integer", keypath, what)
        if tp is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            return float(value) if ok else self.wrong(value, "a number", keypath, what)
        if tp is str:
            return value if isinstance(value, str) else self.wrong(value, "a string", keypath, what)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            if not isinstance(value, str):
                return self.wrong(value, "a string", keypath, what)
            try:
                return tp(value)
            except ValueError:
                choices = ", ".join(str(m.value) for m in tp)
                self.err(keypath, f"{what}: {value!r} is not one of {choices}")
                return _BAD
        if tp is re.Pattern or origin is re.Pattern:
            if not isinstance(value, str):
                return self.wrong(value, "a string (a regular expression)", keypath, what)
            try:
                return re.compile(value)
            except re.error as e:
                at = f" at position {e.pos}" if e.pos is not None else ""
                self.err(keypath, f"{what}: bad regular expression {value!r}: {e.msg}{at}")
                return _BAD
        if origin is tuple:
            args = get_args(tp)
            if len(args) != 2 or args[1] is not Ellipsis:
                raise TypeError(f"rule field type {tp} is not supported (use tuple[X, ...])")
            if not isinstance(value, list):
                return self.wrong(value, "an array", keypath, what)
            items = [self.convert(v, args[0], (*keypath, i), f"{what}[{i}]") for i, v in enumerate(value)]
            return _BAD if any(v is _BAD for v in items) else tuple(items)
        raise TypeError(f"rule field type {tp} is not supported")

    def wrong(self, value: Any, expected: str, keypath: KeyPath, what: str) -> _Bad:
        self.err(keypath, f"{what}: expected {expected}, got {_toml_type(value)}")
        return _BAD

    # -- tables ------------------------------------------------------------------------
    def build(
        self,
        cls: type[Any],
        table: dict[str, Any],
        keypath: KeyPath,
        owner: str,
        ignore: Iterable[str] = (),
        extra: dict[str, Any] | None = None,
    ) -> Any:
        hints = get_type_hints(cls)
        flds = [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("toml", True)]
        names = [f.name for f in flds]
        ok = True
        for key in table:
            if key not in names and key not in ignore:
                guess = difflib.get_close_matches(key, names, 1)
                hint = f" (did you mean {guess[0]!r}?)" if guess else f" (known keys: {', '.join(names)})"
                self.err((*keypath, key), f"{owner}: unknown key {key!r}{hint}")
                ok = False
        kwargs: dict[str, Any] = {}
        for f in flds:
            if f.name not in table:
                if f.default is MISSING and f.default_factory is MISSING:
                    self.err(keypath, f"{owner}: missing required key {f.name!r}")
                    ok = False
                continue
            sub = (*keypath, f.name)
            value = self.convert(table[f.name], hints[f.name], sub, f"{owner}: {f.name}")
            if value is _BAD:
                ok = False
                continue
            check, item_check = f.metadata.get("check"), f.metadata.get("item_check")
            if check is not None and (msg := check(value)):
                self.err(sub, f"{owner}: {f.name}: {msg}")
                ok = False
            if item_check is not None:
                for i, item in enumerate(value):
                    if msg := item_check(item):
                        self.err((*sub, i), f"{owner}: {f.name}[{i}]: {msg}")
                        ok = False
            kwargs[f.name] = value
        if not ok:
            return None
        obj = cls(**kwargs, **(extra or {}))
        for subpath, msg in getattr(obj, "problems", lambda: ())():
            self.err((*keypath, *subpath), f"{owner}: {msg}")
            ok = False
        return obj if ok else None

    def array_of_tables(self, doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
        value = doc.get(key, [])
        if isinstance(value, dict):
            self.err((key,), f"[{key}] must be an array of tables: write [[{key}]]")
            return []
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            self.err((key,), f"{key!r} must be an array of tables ([[{key}]]), got {_toml_type(value)}")
            return []
        return value

    def claim_id(self, obj_id: Any, keypath: KeyPath, owner: str) -> bool:
        if not isinstance(obj_id, str):
            return True  # reported by the type check
        first = self.seen_ids.get(obj_id)
        if first is not None:
            self.err((*keypath, "id"), f"{owner}: duplicate id {obj_id!r} (first defined at {first})")
            return False
        self.seen_ids[obj_id] = self.where((*keypath, "id"))
        return True

    # -- document ----------------------------------------------------------------------
    def load(self) -> tuple[RuleFile | None, list[Rule], list[Suppression]]:
        try:
            doc = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            m = _TOML_POSITION.match(str(e))
            if m:
                line, message = int(m["line"]), f"{m['msg']} (column {m['col']})"
            else:
                line, message = self.text.count("\n") + 1, str(e)
            self.errors.append(RulesError(self.path, line, f"invalid TOML: {message}"))
            return None, [], []
        for key, value in doc.items():
            if key not in TOP_LEVEL:
                hint = " (rules go in [[rule]] tables)" if not isinstance(value, dict | list) else ""
                known = "a rules file has [ruleset], [[rule]] and [[suppression]]"
                self.err((key,), f"unknown top-level key {key!r}: {known}{hint}")

        header: _Header | None = None
        raw_header = doc.get("ruleset")
        if raw_header is None:
            self.errors.append(RulesError(self.path, 1, "missing [ruleset] table (with name, version, description)"))
        elif not isinstance(raw_header, dict):
            self.err(("ruleset",), f"ruleset must be a table ([ruleset]), got {_toml_type(raw_header)}")
        else:
            header = self.build(_Header, raw_header, ("ruleset",), "[ruleset]")
        version = header.version if header is not None else ""

        rules: list[Rule] = []
        for i, table in enumerate(self.array_of_tables(doc, "rule")):
            keypath: KeyPath = ("rule", i)
            rid = table.get("id")
            owner = f"rule {rid!r}" if isinstance(rid, str) else f"rule #{i + 1}"
            unique = self.claim_id(rid, keypath, owner)
            kind = table.get("kind")
            kinds = ", ".join(sorted(RULE_KINDS))
            if kind is None:
                self.err(keypath, f"{owner}: missing required key 'kind' (one of {kinds})")
                continue
            if not isinstance(kind, str) or kind not in RULE_KINDS:
                self.err((*keypath, "kind"), f"{owner}: kind: unknown rule kind {kind!r} (one of {kinds})")
                continue
            extra = {"source": self.where(keypath), "ruleset_version": version}
            rule = self.build(RULE_KINDS[kind], table, keypath, owner, ignore=("kind",), extra=extra)
            if rule is not None and unique:
                rules.append(rule)

        suppressions: list[Suppression] = []
        for i, table in enumerate(self.array_of_tables(doc, "suppression")):
            keypath = ("suppression", i)
            sid = table.get("id")
            owner = f"suppression {sid!r}" if isinstance(sid, str) else f"suppression #{i + 1}"
            unique = self.claim_id(sid, keypath, owner)
            s = self.build(Suppression, table, keypath, owner, extra={"source": self.where(keypath)})
            if s is not None and unique:
                suppressions.append(s)

        info = None
        if header is not None:
            name = header.name or Path(self.path).stem
            info = RuleFile(self.path, name, header.version, header.description, len(rules), len(suppressions))
        return info, rules, suppressions


def rule_files(paths: Sequence[str | Path]) -> list[Path]:
    """The .toml files named by `paths` (files as given, directories' *.toml sorted).

    ConfigError for a path that does not exist or a directory without rule files.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.glob("*.toml") if f.is_file())
            if not found:
                raise ConfigError(f"{p}: no *.toml rule files in this directory")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p}: no such rules file or directory")
    return out


def check_rules(
    paths: Sequence[str | Path], maturities: Iterable[Maturity] = DEFAULT_MATURITIES
) -> tuple[RuleSet, list[RulesError]]:
    """Load every file; the rules that loaded and every problem found (empty when valid)."""
    seen_ids: dict[str, str] = {}
    errors: list[RulesError] = []
    files: list[RuleFile] = []
    rules: list[Rule] = []
    suppressions: list[Suppression] = []
    for path in rule_files(paths):
        shown = str(path)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_RULES_FILE + 1)
        except OSError as e:
            errors.append(RulesError(shown, None, f"cannot read: {e.strerror}"))
            continue
        if len(data) > MAX_RULES_FILE:
            errors.append(RulesError(shown, None, f"larger than {MAX_RULES_FILE} bytes"))
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            errors.append(RulesError(shown, line, "not UTF-8 text"))
            continue
        loader = _FileLoader(shown, text, seen_ids)
        info, file_rules, file_suppressions = loader.load()
        errors.extend(loader.errors)
        if info is not None:
            files.append(info)
        rules.extend(file_rules)
        suppressions.extend(file_suppressions)
    ruleset = RuleSet(tuple(rules), tuple(suppressions), tuple(files), frozenset(maturities))
    return ruleset, errors


def load_rules(*paths: str | Path, maturities: Iterable[Maturity] = DEFAULT_MATURITIES) -> RuleSet:
    """The RuleSet in `paths` (files or directories); RulesError (all problems in `.errors`)."""
    ruleset, errors = check_rules(paths, maturities)
    if errors:
        first = errors[0]
        first.errors = tuple(errors)
        raise first
    return ruleset


def loads_rules(text: str, path: str = "<rules>", maturities: Iterable[Maturity] = DEFAULT_MATURITIES) -> RuleSet:
    """One file's text (tests, generated rules); RulesError as `load_rules`."""
    loader = _FileLoader(path, text, {})
    info, rules, suppressions = loader.load()
    if loader.errors:
        first = loader.errors[0]
        first.errors = tuple(loader.errors)
        raise first
    return RuleSet(tuple(rules), tuple(suppressions), (info,) if info else (), frozenset(maturities))
