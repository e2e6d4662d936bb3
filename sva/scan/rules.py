"""YARA rule sets as one compiled object: namespaces, externals, errors, metadata, cost.

A *set* is a directory of rule files (or one file) and becomes one YARA namespace: its
files are compiled together, in sorted path order (so `000_common_rules.yar` comes first),
as one source of `include` lines, which is how upstream index files make cross-file private
rules work. Sets never share a namespace: public collections reuse rule names across sets.

Loading:
- defines the external variables public rule sets use (`filename`, `filepath`,
  `extension`, `filetype`, `owner`, `md5`) as "" unless the caller sets them;
- reports each file that does not compile as `file:line: message` (libyara's own text);
  `strict=True` raises SignatureError after trying every file, `strict=False` keeps going
  with the files that compile;
- keeps libyara's warnings (e.g. `string "$c0" may slow down scanning`);
- keeps each rule's metadata (author, reference, …) so matches can show them — the
  Detection Rule License 1.1 of signature-base asks for that;
- flags rules whose conditions only make sense for a file (filesize, offset-0 anchors,
  pe/elf modules): they stay loaded, but on raw memory chunks they rarely mean anything;
- with a SlowRulePolicy, times the rules on sample memory (sva.scan.cost) and reports, or
  leaves out, the ones over budget;
- compiles each slow rule it keeps apart (`quarantine`): with the rules that use it (their
  results depend on it) and the private rules it needs, in its own namespace-named
  yara.Rules. libyara's timeout is per match() call, so only this gives a slow rule a
  timeout of its own: PhysicalScanner runs `fast_rules` and then each quarantined set, and
  a timeout in one loses that set's results for the block, not every rule's. `rules` stays
  the whole set in one object, for callers that match a buffer once (canary checks).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import yara

from sva.errors import SignatureError
from sva.scan.cost import CostReport, SlowRulePolicy, find_slow_rules
from sva.scan.sample import synthetic_memory
from sva.scan.source import YARA_RE_SCAN_LIMIT, RuleGraph, RuleUnit, parse_file

RULE_SUFFIXES = (".yar", ".yara")

# The external variables public rule sets expect (signature-base uses the first five).
# As "" they compile and never match: there is no file name for a chunk of RAM.
DEFAULT_EXTERNALS: Mapping[str, str] = MappingProxyType(
    {"filename": "", "filepath": "", "extension": "", "filetype": "", "owner": "", "md5": ""}
)

_LOCATED = re.compile(r"^(?P<path>.+)\((?P<line>\d+)\): (?P<msg>.*)$", re.S)
_TOP_LINE = re.compile(r"^line (?P<line>\d+): (?P<msg>.*)$", re.S)
_TECHNIQUE = re.compile(r"\bT\d{4}(?:\.\d{3})?\b")


# Rule sets under signatures/ that are not for guest memory (`sva net` scans flow payloads with them).
NON_MEMORY_SETS = frozenset({"network"})


def signatures_dir() -> Path:
    """The repository's `signatures/` directory (the built-in bundle)."""
    return Path(__file__).resolve().parents[2] / "signatures"


@dataclass(frozen=True)
class RuleSource:
    """One rule set: a namespace and its files, in include order."""

    namespace: str
    files: tuple[Path, ...]


def discover(path: str | Path) -> list[RuleSource]:
    """The rule sets under `path`.

    A file is a set of its own, named after its stem. In a directory, each subdirectory is
    a set named after it (with every rule file below it), and rule files directly in the
    directory form a set named after the directory. Hidden entries are skipped.
    """
    path = Path(path)
    if path.is_file():
        return [RuleSource(path.stem, (path,))]
    if not path.is_dir():
        raise SignatureError(str(path), None, "no such rule file or directory")

    def rule_files(d: Path, recursive: bool) -> tuple[Path, ...]:
        found = d.rglob("*") if recursive else d.iterdir()
        files = [
            f for f in found
            if f.is_file() and f.suffix.lower() in RULE_SUFFIXES
            and not any(p.startswith(".") for p in f.relative_to(d).parts)
        ]  # fmt: skip
        return tuple(sorted(files, key=lambda f: f.relative_to(d).as_posix()))

    sets: list[RuleSource] = []
    loose = rule_files(path, recursive=False)
    if loose:
        sets.append(RuleSource(path.resolve().name, loose))
    for sub in sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")):
        files = rule_files(sub, recursive=True)
        if files:
            sets.append(RuleSource(sub.name, files))
    return sets


@dataclass(frozen=True)
class CompileProblem:
    """An error or warning from compiling one rule file."""

    namespace: str
    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class RuleInfo:
    """What a loaded rule is, for reports: where it is written and what its metadata says."""

    namespace: str
    name: str
    path: str
    line: int
    tags: tuple[str, ...]
    meta: Mapping[str, object] = field(hash=False)
    is_private: bool = False
    is_global: bool = False
    file_conditions: tuple[str, ...] = ()  # why it can only match a file-like block

    @property
    def key(self) -> str:
        return f"{self.namespace}:{self.name}"

    @property
    def author(self) -> str | None:
        return _meta_text(self.meta, "author")

    @property
    def reference(self) -> str | None:
        return _meta_text(self.meta, "reference")

    @property
    def description(self) -> str | None:
        return _meta_text(self.meta, "description")

    @property
    def techniques(self) -> tuple[str, ...]:
        return techniques(self.meta, self.tags)


def _meta_text(meta: Mapping[str, object], key: str) -> str | None:
    value = meta.get(key)
    return None if value is None else str(value)


def techniques(meta: Mapping[str, object], tags: Iterable[str] = ()) -> tuple[str, ...]:
    """MITRE ATT&CK technique ids (T1055, T1059.004) named in metadata values or tags."""
    found: list[str] = []
    texts = [str(v) for k, v in meta.items() if re.search(r"mitre|att&?ck|technique", k, re.I)]
    for text in [*texts, *tags]:
        for t in _TECHNIQUE.findall(text):
            if t not in found:
                found.append(t)
    return tuple(found)


@dataclass(frozen=True, eq=False)
class QuarantinedRules:
    """Slow rules compiled apart, scanned with their own timeout.

    `compiled` holds `reports` plus every rule they need; only matches of `reports` count
    (a public rule they need is also in the main set and reports from there).
    """

    namespace: str
    slow: tuple[str, ...]  # the slow rules of this group, in file order
    reports: frozenset[str]  # rule names whose matches this set owns: `slow` and their users
    compiled: yara.Rules = field(repr=False)

    @property
    def key(self) -> str:
        """namespace:rule of the (first) slow rule: what a timeout of this set is blamed on."""
        return f"{self.namespace}:{self.slow[0]}"

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f"{self.namespace}:{r}" for r in sorted(self.reports))


@dataclass
class _Namespace:
    source: RuleSource
    good: list[Path] = field(default_factory=list)
    rules: yara.Rules | None = None
    graph: RuleGraph = field(default_factory=lambda: RuleGraph(()))
    text: str | None = None  # set when rebuilt from rule texts (a rule was refused)


class CompiledRuleSet:
    """Rule sets compiled into one yara.Rules, one namespace each, with their metadata."""

    def __init__(
        self,
        rules: yara.Rules,
        sets: tuple[RuleSource, ...],
        infos: Mapping[str, RuleInfo],
        errors: tuple[CompileProblem, ...],
        warnings: tuple[CompileProblem, ...],
        externals: Mapping[str, object],
        fingerprint: str,
        longest_literal: int,
        cost: CostReport | None = None,
        fast_rules: yara.Rules | None = None,
        quarantine: tuple[QuarantinedRules, ...] = (),
    ) -> None:
        self.rules = rules  # every loaded rule in one object
        # what the scanner runs per block: the rules not quarantined, then each quarantined set
        self.fast_rules = rules if fast_rules is None else fast_rules
        self.quarantine = quarantine
        self.sets = sets
        self.infos = MappingProxyType(dict(infos))
        self.errors = errors
        self.warnings = warnings
        self.externals = MappingProxyType(dict(externals))
        self.fingerprint = fingerprint
        self.longest_literal = longest_literal
        self.cost = cost

    # -- building -----------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        *paths: str | Path,
        strict: bool = True,
        externals: Mapping[str, object] | None = None,
        slow_policy: SlowRulePolicy | None = None,
        sample: bytes | memoryview | None = None,
    ) -> CompiledRuleSet:
        """Compile the rule sets found under `paths` (see `discover`)."""
        sets: list[RuleSource] = []
        for p in paths:
            sets.extend(discover(p))
        return cls.compile(sets, strict=strict, externals=externals, slow_policy=slow_policy, sample=sample)

    @classmethod
    def default(
        cls,
        *,
        strict: bool = True,
        slow_policy: SlowRulePolicy | None = None,
        sample: bytes | memoryview | None = None,
    ) -> CompiledRuleSet:
        """The built-in bundle's memory rules: every set under the repository's `signatures/`
        except the ones written for other inputs (`network/`: flow payloads)."""
        sets = [s for s in discover(signatures_dir()) if s.namespace not in NON_MEMORY_SETS]
        return cls.compile(sets, strict=strict, slow_policy=slow_policy, sample=sample)

    @classmethod
    def compile(
        cls,
        sets: Sequence[RuleSource],
        *,
        strict: bool = True,
        externals: Mapping[str, object] | None = None,
        slow_policy: SlowRulePolicy | None = None,
        sample: bytes | memoryview | None = None,
    ) -> CompiledRuleSet:
        ext = {**DEFAULT_EXTERNALS, **(externals or {})}
        seen: dict[str, RuleSource] = {}
        for s in sets:
            if s.namespace in seen:
                raise SignatureError(
                    str(s.files[0]) if s.files else s.namespace, None,
                    f"namespace {s.namespace!r} given twice (also from {seen[s.namespace].files[0]})",
                )  # fmt: skip
            seen[s.namespace] = s
        errors: list[CompileProblem] = []
        warnings: list[CompileProblem] = []
        spaces = [_compile_namespace(s, ext, errors, warnings) for s in sets]
        if strict and errors:
            first = SignatureError(errors[0].path, errors[0].line, errors[0].message)
            more = [SignatureError(e.path, e.line, e.message) for e in errors[1:]]
            first.errors = (first, *more)
            raise first

        infos: dict[str, RuleInfo] = {}
        for ns in spaces:
            infos.update(_rule_infos(ns, warnings))

        report = None
        quarantine: tuple[QuarantinedRules, ...] = ()
        fast_text: dict[str, str] = {}  # namespace -> its source without the quarantined rules
        if slow_policy is not None:
            data = sample if sample is not None else synthetic_memory(slow_policy.sample_size)
            todo = [(ns.source.namespace, ns.rules, ns.graph) for ns in spaces if ns.rules is not None]
            report = find_slow_rules(todo, data, slow_policy, ext)
            if slow_policy.refuse_slow and report.slow:
                report = _refuse(spaces, report, warnings)
                for key in report.refused + report.refused_dependents:
                    infos.pop(key, None)
            elif slow_policy.isolate_slow and report.slow:
                quarantine, fast_text = _quarantine(spaces, report, ext, warnings)
                report = replace(report, quarantined=tuple(k for q in quarantine for k in q.keys))

        sources = {
            ns.source.namespace: ns.text if ns.text is not None else _include_text(ns.good)
            for ns in spaces
            if ns.good
        }
        try:
            combined = yara.compile(sources=sources, externals=ext) if sources else _empty_rules()
        except yara.Error as e:  # the files changed on disk since the namespace compiled
            path, line, msg = _locate(str(e))
            raise SignatureError(path or "rule sets", line, msg) from None
        fast = combined
        if quarantine:
            fast_sources = {name: fast_text.get(name, text) for name, text in sources.items()}
            try:
                fast = yara.compile(sources=fast_sources, externals=ext)
            except yara.Error as e:  # the rule splitter cut a set wrongly: keep it whole
                warnings.append(CompileProblem("*", "rule sets", None,
                                               f"slow rules not scanned apart (could not rebuild the rest: {e})"))
                quarantine = ()
                report = replace(report, quarantined=()) if report else None
        longest = max(
            [YARA_RE_SCAN_LIMIT] + [u.longest_literal() for ns in spaces for u in ns.graph.units]
        )
        refused = report.refused + report.refused_dependents if report else ()
        return cls(
            rules=combined,
            sets=tuple(sets),
            infos=infos,
            errors=tuple(errors),
            warnings=tuple(warnings),
            externals=ext,
            fingerprint=_fingerprint(spaces, ext, refused, quarantine),
            longest_literal=longest,
            cost=report,
            fast_rules=fast,
            quarantine=quarantine,
        )

    # -- looking things up ------------------------------------------------------------------
    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(s.namespace for s in self.sets)

    @property
    def rule_count(self) -> int:
        """Rules loaded, private ones included."""
        return len(self.infos)

    def info(self, namespace: str, rule: str) -> RuleInfo | None:
        return self.infos.get(f"{namespace}:{rule}")

    @property
    def file_only(self) -> tuple[RuleInfo, ...]:
        """Rules whose conditions need a file-like block (filesize, offset 0, pe./elf.)."""
        return tuple(i for i in self.infos.values() if i.file_conditions)

    @property
    def slow(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.cost.slow) if self.cost else ()

    def __repr__(self) -> str:
        return (
            f"CompiledRuleSet({len(self.sets)} sets, {self.rule_count} rules, "
            f"{len(self.errors)} errors, {len(self.warnings)} warnings)"
        )


def _empty_rules() -> yara.Rules:
    return yara.compile(source="")


def _include_text(files: Iterable[Path]) -> str:
    # absolute, so libyara reports the same path whatever the working directory
    return "".join(f'include "{os.path.abspath(f)}"\n' for f in files)


def _locate(message: str) -> tuple[str | None, int | None, str]:
    m = _LOCATED.match(message)
    if m:
        return m["path"], int(m["line"]), m["msg"]
    m = _TOP_LINE.match(message)
    if m:
        return None, int(m["line"]), m["msg"]
    return None, None, message


def _compile_namespace(
    src: RuleSource,
    externals: Mapping[str, object],
    errors: list[CompileProblem],
    warnings: list[CompileProblem],
) -> _Namespace:
    """Compile a set; drop each file libyara blames until the rest compiles."""
    ns = _Namespace(src)
    first_error = len(errors)
    remaining: list[Path] = []
    display: dict[str, Path] = {}  # absolute path (what libyara reports) -> path as given
    for f in src.files:
        absolute = os.path.abspath(f)
        if any(c in absolute for c in '"\\\n'):
            errors.append(CompileProblem(src.namespace, str(f), None, "file name not usable in a YARA include"))
        else:
            remaining.append(f)
            display[absolute] = f
    for _ in range(len(remaining) + 1):
        if not remaining:
            break
        try:
            ns.rules = yara.compile(sources={src.namespace: _include_text(remaining)}, externals=dict(externals))
            break
        except yara.Error as e:
            path, line, msg = _locate(str(e))
            culprit: Path | None = None
            if path is not None and path in display:
                culprit = display[path]
            elif path is None and line is not None and 1 <= line <= len(remaining):
                culprit = remaining[line - 1]  # line N of our include list is file N
            if culprit is None:
                # blamed on a file one of ours includes: find which of ours pulls it in
                culprit = _first_failing(src.namespace, remaining, externals)
            shown = path if path is not None and path not in display else str(culprit)
            errors.append(CompileProblem(src.namespace, shown, line, msg))
            remaining.remove(culprit)
    ns.good = remaining
    # libyara finds errors in its own order; report them in file order
    rank = {str(f): i for i, f in enumerate(src.files)}
    errors[first_error:] = sorted(
        errors[first_error:], key=lambda e: (rank.get(e.path, len(rank)), e.line or 0)
    )
    if ns.rules is not None:
        for w in ns.rules.warnings:
            path, line, msg = _locate(w)
            path = str(display[path]) if path in display else (path or src.namespace)
            warnings.append(CompileProblem(src.namespace, path, line, msg))
    units: list[RuleUnit] = []
    seen: set[Path] = set()
    for f in ns.good:
        for sf in parse_file(f, seen):
            units += sf.rules
    ns.graph = RuleGraph(units)
    return ns


def _first_failing(namespace: str, files: list[Path], externals: Mapping[str, object]) -> Path:
    for i in range(1, len(files) + 1):
        try:
            yara.compile(sources={namespace: _include_text(files[:i])}, externals=dict(externals))
        except yara.Error:
            return files[i - 1]
    return files[-1]


def _rule_infos(ns: _Namespace, warnings: list[CompileProblem]) -> dict[str, RuleInfo]:
    name = ns.source.namespace
    if ns.rules is None:
        return {}
    units = ns.graph.by_name
    compiled = list(ns.rules)
    if [r.identifier for r in compiled] != [u.name for u in ns.graph.units]:
        warnings.append(CompileProblem(
            name, str(ns.source.files[0]) if ns.source.files else name, None,
            "could not split this set into its rules: no per-rule timing or file-only flags for it",
        ))  # fmt: skip
        ns.graph = RuleGraph(())
    file_only = _file_only(ns.graph)
    out: dict[str, RuleInfo] = {}
    for r in compiled:
        u = units.get(r.identifier)
        out[f"{name}:{r.identifier}"] = RuleInfo(
            namespace=name,
            name=r.identifier,
            path=u.path if u else "",
            line=u.line if u else 0,
            tags=tuple(r.tags),
            meta=MappingProxyType(dict(r.meta)),
            is_private=r.is_private,
            is_global=r.is_global,
            file_conditions=file_only.get(r.identifier, ()),
        )
    return out


def _file_only(graph: RuleGraph) -> dict[str, tuple[str, ...]]:
    """Each rule's own file-only reasons, plus `uses <rule>` for file-only rules it uses."""
    own = {u.name: u.file_conditions() for u in graph.units}
    out: dict[str, tuple[str, ...]] = {}
    for u in graph.units:
        reasons = list(own[u.name])
        for dep in graph.closure([u.name]):
            if dep.name != u.name and own[dep.name]:
                reasons.append(f"uses {dep.name}")
        if reasons:
            out[u.name] = tuple(reasons)
    return out


def _refuse(spaces: list[_Namespace], report: CostReport, warnings: list[CompileProblem]) -> CostReport:
    """Rebuild each namespace that holds a slow rule without it (and without its users)."""
    refused: list[str] = []
    dependents: list[str] = []
    for ns in spaces:
        name = ns.source.namespace
        slow = {c.rule for c in report.slow if c.namespace == name}
        if not slow or ns.rules is None:
            continue
        users = ns.graph.dependents(slow)
        if any(ns.graph.by_name[r].is_global for r in slow):
            # a global rule constrains every rule of its namespace: without it they would
            # match more than their authors meant, so they go too
            users = {u.name for u in ns.graph.units} - slow
        keep = [u for u in ns.graph.units if u.name not in slow and u.name not in users]
        ns.text = ns.graph.render(keep) if keep else ""
        ns.graph = RuleGraph(keep)
        refused += [f"{name}:{r}" for r in sorted(slow)]
        dependents += [f"{name}:{r}" for r in sorted(users)]
        for r in sorted(users):
            warnings.append(CompileProblem(name, name, None, f"rule {r} left out: it uses a refused slow rule"))
    return replace(report, refused=tuple(refused), refused_dependents=tuple(dependents))


def _quarantine(
    spaces: list[_Namespace], report: CostReport, externals: Mapping[str, object], warnings: list[CompileProblem]
) -> tuple[tuple[QuarantinedRules, ...], dict[str, str]]:
    """Each slow rule (with the rules that use it) compiled apart; each namespace's source
    without them. A group that holds a global rule stays in the main set: a global rule
    constrains every rule of its namespace, so it cannot be evaluated apart."""
    out: list[QuarantinedRules] = []
    texts: dict[str, str] = {}
    for ns in spaces:
        name = ns.source.namespace
        slow = [c.rule for c in report.slow if c.namespace == name and c.rule in ns.graph.by_name]
        if not slow or ns.rules is None:
            continue
        # one group per slow rule, merged when their users overlap (B uses slow A and is slow)
        groups: list[tuple[list[str], set[str]]] = []
        for rule in slow:
            names, owned = [rule], {rule} | ns.graph.dependents({rule})
            for g in [g for g in groups if g[1] & owned]:
                groups.remove(g)
                names, owned = g[0] + names, owned | g[1]
            groups.append((names, owned))
        taken: set[str] = set()
        for slow_names, owned in groups:
            if any(ns.graph.by_name[r].is_global for r in owned):
                warnings.append(CompileProblem(name, name, None,
                                               f"slow rule {slow_names[0]} is global (or used by one): not scanned apart"))
                continue
            text = ns.graph.render(ns.graph.closure(owned))
            try:
                compiled = yara.compile(sources={name: text}, externals=dict(externals))
            except yara.Error as e:
                warnings.append(CompileProblem(name, name, None,
                                               f"slow rule {slow_names[0]} not scanned apart: {e}"))
                continue
            order = ns.graph.order
            out.append(QuarantinedRules(name, tuple(sorted(slow_names, key=order.__getitem__)),
                                        frozenset(owned), compiled))
            taken |= owned
        if taken:
            # nothing left uses a quarantined rule (its users went with it), so this compiles
            keep = [u for u in ns.graph.units if u.name not in taken]
            texts[name] = ns.graph.render(keep) if keep else ""
    return tuple(out), texts


def _fingerprint(
    spaces: list[_Namespace],
    externals: Mapping[str, object],
    refused: tuple[str, ...],
    quarantine: tuple[QuarantinedRules, ...] = (),
) -> str:
    h = hashlib.sha256()
    for ns in spaces:
        h.update(f"ns\0{ns.source.namespace}\0".encode())
        for f in ns.good:
            h.update(f"file\0{os.path.abspath(f)}\0".encode())
            try:
                h.update(f.read_bytes())
            except OSError:
                h.update(b"\0unreadable\0")
        if ns.text is not None:
            h.update(b"text\0" + ns.text.encode())
    for k in sorted(externals):
        h.update(f"ext\0{k}\0{externals[k]!r}\0".encode())
    for r in refused:
        h.update(f"refused\0{r}\0".encode())
    for q in quarantine:  # the same rules scanned another way report other timeouts
        h.update(f"quarantine\0{','.join(q.keys)}\0".encode())
    return h.hexdigest()
