"""What is inside a bundle, checked: rules compile, IOC lists parse, rules are fast enough,
the canary matches and clean memory does not.

Used twice with the same code: by `sva sigs pack` before it signs (a publisher learns about
a broken rule before shipping it) and by the update pipeline on the unpacked staging copy
(an appliance never trusts that the publisher did).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import yara

from sva.errors import BundleError, SignatureError
from sva.lab.scenarios import MARKER
from sva.scan.cost import RuleCost, SlowRulePolicy
from sva.scan.rules import (
    DEFAULT_EXTERNALS,
    CompiledRuleSet,
    RuleSource,
    signatures_dir,
)
from sva.scan.source import RuleGraph, parse_file
from sva.sigs.manifest import Manifest
from sva.sigs.model import FileKind, RejectReason

log = logging.getLogger(__name__)
MiB = 1 << 20
MAX_IOC_LINES = 2_000_000
MAX_IOC_LINE = 512
_HASH = re.compile(r"^(?:[0-9a-f]{32}|[0-9a-f]{40}|[0-9a-f]{64})$")
YARA_SUFFIXES = (".yar", ".yara")
CANARY_NAMES = ("canary", "canary.bin")
_DOC = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|README|AUTHORS)([._-].*)?$|\.md$", re.I)
# bytes of clean memory put around the canary, so rules see it as they would in RAM
_CANARY_CONTEXT = 32 << 10


IOC_SUFFIXES = {".ips": FileKind.IOC_IP, ".domains": FileKind.IOC_DOMAIN, ".hashes": FileKind.IOC_HASH}


def classify(relpath: str) -> FileKind | None:
    """The kind of a file in a publisher's source directory, from its name and place (the
    layout of the built-in signatures/): `*.ips`, `*.domains`, `*.hashes` IOC lists
    (sva.net.ioc reads the first two from `ioc/`); `*.yar`/`*.yara` under `network/`
    network rules, anywhere else memory rules; a top-level `canary`/`canary.bin`; licence
    and read-me texts as doc; None for anything else (left out of the bundle)."""
    parts = relpath.split("/")
    top, name = parts[0], parts[-1]
    for suffix, kind in IOC_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return kind
    if len(parts) == 1 and name in CANARY_NAMES:
        return FileKind.CANARY
    if name.lower().endswith(YARA_SUFFIXES):
        return FileKind.NETWORK_YARA if len(parts) > 1 and top == "network" else FileKind.MEMORY_YARA
    if _DOC.search(name):
        return FileKind.DOC
    return None


@dataclass(frozen=True)
class ContentReport:
    """The checked content of one bundle: its compiled memory rules and what it holds."""

    rules: CompiledRuleSet
    counts: Mapping[str, int] = field(hash=False)
    slowest: tuple[str, float] | None = None  # namespace, ms/MiB of the costliest namespace


def rule_sources(files_dir: Path, paths: Iterable[str], bundle_name: str) -> list[RuleSource]:
    """One YARA namespace per top-level directory (its files in path order, as
    `sva.scan.rules.discover` does) and one named after the bundle for loose files."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        ns = path.split("/", 1)[0] if "/" in path else bundle_name
        groups.setdefault(ns, []).append(path)
    return [RuleSource(ns, tuple(files_dir / p for p in sorted(group))) for ns, group in sorted(groups.items())]


def compile_memory_rules(files_dir: Path, manifest: Manifest, *, policy: SlowRulePolicy | None = None,
                         sample: bytes | None = None, source: str = "bundle") -> CompiledRuleSet:
    """The bundle's memory rules with the externals public rule sets expect; BundleError
    (yara-error) naming `file:line` for the first rule file that does not compile."""
    sets = rule_sources(files_dir, (e.path for e in manifest.of_kind(FileKind.MEMORY_YARA)), manifest.name)
    try:
        return CompiledRuleSet.compile(sets, strict=True, externals=DEFAULT_EXTERNALS,
                                       slow_policy=policy, sample=sample)
    except SignatureError as e:
        where = _relative(e.path, files_dir)
        line = f":{e.line}" if e.line else ""
        more = f" (and {len(e.errors) - 1} more)" if len(e.errors) > 1 else ""
        raise BundleError(source, RejectReason.YARA_ERROR, f"{where}{line}: {e.reason}{more}") from None


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path


def check_content(files_dir: Path, manifest: Manifest, *, policy: SlowRulePolicy, sample: bytes,
                  canary: bytes | None = None, source: str = "bundle") -> ContentReport:
    """Everything but the signature: IOC lists, network and memory rules (with the
    slow-rule check on `sample`), then the canary on the compiled memory rules."""
    counts: dict[str, int] = {"files": len(manifest.files)}
    for kind in (FileKind.IOC_IP, FileKind.IOC_DOMAIN, FileKind.IOC_HASH):
        counts[kind.value.replace("-", "_")] = sum(
            parse_ioc(files_dir / e.path, kind, e.path, source) for e in manifest.of_kind(kind)
        )
    network = manifest.of_kind(FileKind.NETWORK_YARA)
    counts["network_rules"] = 0
    if network:
        try:
            net = CompiledRuleSet.compile(rule_sources(files_dir, (e.path for e in network), manifest.name), strict=True,
                                          externals=DEFAULT_EXTERNALS)
        except SignatureError as e:
            line = f":{e.line}" if e.line else ""
            raise BundleError(source, RejectReason.YARA_ERROR, f"{_relative(e.path, files_dir)}{line}: {e.reason}") from None
        counts["network_rules"] = net.rule_count
    rules = compile_memory_rules(files_dir, manifest, policy=policy, sample=sample, source=source)
    counts["memory_rules"] = rules.rule_count
    slowest = None
    if rules.cost is not None:
        # rules the check could not time (its timing budget ran out, or they do not compile
        # alone): counted for status rather than guessed about
        counts["rules_not_timed"] = len(rules.cost.unchecked)
        if rules.cost.namespace_ms_per_mib:
            ns, cost = max(rules.cost.namespace_ms_per_mib.items(), key=lambda kv: kv[1])
            slowest = (ns, cost)
        slow = confirm_slow(rules, policy, sample)
        if slow:
            c = slow[0]
            cost_text = "more than the scan timeout" if math.isinf(c.ms_per_mib) else f"{c.ms_per_mib:.1f} ms/MiB"
            more = f" (and {len(slow) - 1} more)" if len(slow) > 1 else ""
            raise BundleError(source, RejectReason.SLOW_RULE,
                              f"rule {c.key} ({_relative(c.path, files_dir)}:{c.line}) costs {cost_text} on sample "
                              f"memory, over the limit of {policy.max_rule_ms_per_mib:g} ms/MiB per rule{more}")
    if canary is None:
        path = manifest.canary
        canary = (files_dir / path).read_bytes() if path else MARKER.encode()
    run_canary(rules, sample, canary, manifest.canary or "the lab marker", source, policy.timeout_s)
    return ContentReport(rules, counts, slowest)


def confirm_slow(rules: CompiledRuleSet, policy: SlowRulePolicy, sample: bytes) -> list[RuleCost]:
    """The rules the slow-rule check flagged that are slow in CPU time too.

    The check (sva.scan.cost) times scans by the wall clock, which counts time the scan
    spent waiting for a CPU: on a loaded appliance a cheap rule can look slow, and a
    refused bundle means no updates. Each flagged rule is timed again alone (with the
    rules it uses) by the CPU time of the scanning thread, fastest of `repeats` + 1 runs;
    only a rule over the limit that way refuses the bundle.
    """
    if rules.cost is None or not rules.cost.slow:
        return []
    graphs: dict[str, RuleGraph] = {}
    confirmed: list[RuleCost] = []
    for c in rules.cost.slow:
        if math.isinf(c.ms_per_mib):  # hit the scan timeout: no doubt about it
            confirmed.append(c)
            continue
        if c.namespace not in graphs:
            src = next(s for s in rules.sets if s.namespace == c.namespace)
            seen: set[Path] = set()
            graphs[c.namespace] = RuleGraph([u for f in src.files for sf in parse_file(f, seen) for u in sf.rules])
        graph = graphs[c.namespace]
        try:
            alone = yara.compile(source=graph.render(graph.closure([c.rule])), externals=dict(rules.externals))
        except yara.Error:
            confirmed.append(c)  # cannot be re-timed alone: keep the wall-clock verdict
            continue
        cpu = _cpu_ms_per_mib(alone, sample, policy.repeats + 1, policy.timeout_s)
        if cpu > policy.max_rule_ms_per_mib:
            confirmed.append(replace(c, ms_per_mib=cpu))
        else:
            log.info("rule %s looked slow by the wall clock (%.1f ms/MiB) but costs %.1f ms/MiB of CPU: kept",
                     c.key, c.ms_per_mib, cpu)
    return confirmed


def _cpu_ms_per_mib(rules: yara.Rules, sample: bytes, repeats: int, timeout_s: int) -> float:
    def cpu(data: bytes) -> float:
        t0 = time.thread_time()  # libyara scans in the calling thread
        try:
            rules.match(data=data, timeout=timeout_s)
        except yara.TimeoutError:
            return math.inf
        return time.thread_time() - t0

    overhead = min(cpu(b"") for _ in range(2))
    best = min(cpu(sample) for _ in range(repeats))
    return max(0.0, best - overhead) * 1000 / (max(len(sample), 1) / MiB)


def run_canary(rules: CompiledRuleSet, clean: bytes, canary: bytes, what: str, source: str, timeout_s: int = 30) -> None:
    """Clean memory must match nothing; the canary inside clean memory must match a rule."""
    try:
        hits = rules.rules.match(data=clean, timeout=timeout_s)
    except yara.Error as e:
        raise BundleError(source, RejectReason.CANARY_FAILED, f"scanning the known-clean sample failed: {e}") from None
    if hits:
        names = ", ".join(f"{m.namespace}:{m.rule}" for m in hits[:5])
        raise BundleError(source, RejectReason.CANARY_FAILED,
                          f"rule(s) {names} match known-clean sample memory ({len(clean)} bytes): they would alert on every guest")
    if not canary:
        raise BundleError(source, RejectReason.CANARY_FAILED, f"canary {what} is empty")
    bad = clean[:_CANARY_CONTEXT] + canary + clean[_CANARY_CONTEXT: 2 * _CANARY_CONTEXT]
    try:
        hits = rules.rules.match(data=bad, timeout=timeout_s)
    except yara.Error as e:
        raise BundleError(source, RejectReason.CANARY_FAILED, f"scanning the canary failed: {e}") from None
    if not hits:
        raise BundleError(source, RejectReason.CANARY_FAILED,
                          f"no memory rule matches the canary ({what}): these rules would not detect a known-bad sample")


def parse_ioc(path: Path, kind: FileKind, shown: str, source: str = "bundle") -> int:
    """How many entries one IOC list holds; BundleError (ioc-invalid) naming `file:line`.
    IP and domain lists are read by the network monitor's own loader (sva.net.ioc), so a
    list that passes here is one it will load."""
    if kind in (FileKind.IOC_IP, FileKind.IOC_DOMAIN):
        from sva.net.ioc import load_iocs

        try:
            return sum(n for _name, _kind, n in load_iocs(path).lists)
        except SignatureError as e:
            line = f":{e.line}" if e.line else ""
            raise BundleError(source, RejectReason.IOC_INVALID, f"{shown}{line}: {e.reason}") from None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(source, RejectReason.IOC_INVALID, f"{shown}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    count = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if lineno > MAX_IOC_LINES or len(line) > MAX_IOC_LINE:
            raise BundleError(source, RejectReason.IOC_INVALID,
                              f"{shown}:{lineno}: over {MAX_IOC_LINES} lines or {MAX_IOC_LINE} characters a line")
        item = line.split("#", 1)[0].strip().lower()
        if not item:
            continue
        if not _HASH.match(item):
            raise BundleError(source, RejectReason.IOC_INVALID,
                              f"{shown}:{lineno}: {item[:80]!r} is not an MD5, SHA-1 or SHA-256 hex digest")
        count += 1
    return count


def builtin_rules() -> CompiledRuleSet:
    """The built-in bundle's memory rules: the repository's signatures/ read as a bundle
    source (its network/ rules and IOC lists are not for guest memory)."""
    root = signatures_dir()
    paths = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
        if p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts)
        and classify(p.relative_to(root).as_posix()) is FileKind.MEMORY_YARA
    )  # fmt: skip
    return CompiledRuleSet.compile(rule_sources(root, paths, root.name), strict=True, externals=DEFAULT_EXTERNALS)
