"""The update pipeline on real bundles: verify → compile → time → canary → swap, and every
refusal leaves the previous rules active and still matching."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sva.engine.sinks import MemorySink
from sva.errors import ConfigError
from sva.lab.scenarios import MARKER
from sva.scan.rules import CompiledRuleSet
from sva.sigs.active import ActiveRules, rules_for_scan
from sva.sigs.config import SigsConfig, load_config
from sva.sigs.fetch import write_index
from sva.sigs.model import RejectReason
from sva.sigs.pipeline import Outcome, Refresher, status
from sva.sigs.testing import generate_rules

from .conftest import NEW_RULE, SAMPLE
from .test_bundle import members, rebuilt, regular, retar

NEW_STRING = b"sigs-test-only-in-new-bundle-7f3c"
SLOW_RULE = """
rule Pathological_Hex_Run
{
    strings:
        $h = /[0-9a-fA-F]{32}/ fullword wide ascii
    condition:
        $h
}
"""
CLEAN_MATCH_RULE = 'rule Matches_Everything_Web { strings: $a = "HTTP/1.1" ascii condition: $a }\n'
BROKEN_RULE = 'rule Broken\n{\n    strings:\n        $a = "x"\n    condition:\n        $b\n}\n'


def rule_names(rules: CompiledRuleSet, data: bytes) -> set[str]:
    return {f"{m.namespace}:{m.rule}" for m in rules.rules.match(data=data)}


def in_memory(*needles: bytes) -> bytes:
    return SAMPLE[:8192] + b"\0".join(needles) + SAMPLE[8192:16384]


@pytest.fixture
def installed(refresher: Refresher, make_bundle) -> tuple[Refresher, ActiveRules, MemorySink]:
    """A store whose active bundle is version 2 (built-in rules + NEW_RULE)."""
    sink = MemorySink()
    active = ActiveRules(refresher.store)
    refresher.sink, refresher.active = sink, active
    assert "test:SVA_Lab_Marker" in rule_names(active(), MARKER.encode())  # the built-in bundle before any update
    assert active.version == "builtin"
    assert not rule_names(active(), in_memory(NEW_STRING))
    r = refresher.install_bytes(make_bundle(2, {"extra/new.yar": NEW_RULE}).read_bytes(), "v2")
    assert r.outcome is Outcome.ACTIVATED and r.version == 2, r
    return refresher, active, sink


def assert_still_v2(refresher: Refresher, active: ActiveRules) -> None:
    assert refresher.store.info("active").version == 2
    active()  # after a rollback the link moved: the new set compiles in the background
    assert active.wait_idle()
    rules = active()
    assert "extra:SVA_Test_New_Bundle_Only" in rule_names(rules, in_memory(NEW_STRING))
    assert "test:SVA_Lab_Marker" in rule_names(rules, in_memory(MARKER.encode()))
    fresh = ActiveRules(refresher.store)()  # another process following the store sees the same (first call: compiled now)
    assert "extra:SVA_Test_New_Bundle_Only" in rule_names(fresh, in_memory(NEW_STRING))


def test_new_bundle_is_activated_and_the_rules_callable_follows(installed) -> None:
    refresher, active, sink = installed
    assert_still_v2(refresher, active)
    assert active.version == "2"
    ev = sink.of_type("sigs")[-1]
    assert ev.topic == "sva.sigs.updated" and ev.payload["bundle_version"] == "2"
    assert ev.payload["previous_version"] == "builtin" and ev.payload["details"]["counts"]["memory_rules"] == 8
    st = status(refresher.store)
    assert st["active"]["version"] == 2 and st["active"]["counts"]["memory_rules"] == 8 and st["last_error"] is None


def _bad_bundles(make_bundle, other_keys) -> dict[str, tuple[bytes, RejectReason, str]]:
    v3 = make_bundle(3, {"extra/new.yar": NEW_RULE})
    return {
        "tampered file": (rebuilt(v3, lambda m: m.update({"files/extra/new.yar": b"rule x { condition: true }"})),
                          RejectReason.TAMPERED_FILE, "files/extra/new.yar"),
        "tampered manifest": (rebuilt(v3, lambda m: m.update({"manifest.json": m["manifest.json"].replace(
            b'"version": 3', b'"version": 4')})), RejectReason.BAD_SIGNATURE, "manifest was altered"),
        "untrusted key": (make_bundle(3, key=other_keys[0]).read_bytes(), RejectReason.UNTRUSTED_KEY, "not a trusted key"),
        "unsigned": (rebuilt(v3, lambda m: m.pop("manifest.sig")), RejectReason.UNSIGNED, "not signed"),
        "older version replayed": (make_bundle(1).read_bytes(), RejectReason.NOT_NEWER, "version 1 is not newer than 2"),
        "same version replayed": (make_bundle(2).read_bytes(), RejectReason.NOT_NEWER, "version 2 is not newer than 2"),
        "yara syntax error": (make_bundle(3, {"extra/broken.yar": BROKEN_RULE}).read_bytes(), RejectReason.YARA_ERROR,
                              'extra/broken.yar:7: undefined string "$b"'),
        "slow rule": (make_bundle(3, {"extra/slow.yar": SLOW_RULE}).read_bytes(), RejectReason.SLOW_RULE,
                      "rule extra:Pathological_Hex_Run (extra/slow.yar:2) costs"),
        "canary missed": (make_bundle(3, {"x/new.yar": NEW_RULE}, builtin=False).read_bytes(), RejectReason.CANARY_FAILED,
                          "no memory rule matches the canary (the lab marker)"),
        "clean memory matched": (make_bundle(3, {"extra/web.yar": CLEAN_MATCH_RULE}).read_bytes(),
                                 RejectReason.CANARY_FAILED, "extra:Matches_Everything_Web match known-clean"),
        "bad IOC line": (make_bundle(3, {"ioc/c2.ips": "10.0.2.100\nnot-an-ip\n"}).read_bytes(),
                         RejectReason.IOC_INVALID, "ioc/c2.ips:2: 'not-an-ip' is not an IP address"),
        "path traversal": (rebuilt(v3, lambda m: m.update({"files/../../../../tmp/pwned.yar": b"x"})),
                           RejectReason.UNSAFE_PATH, "leaves the bundle"),
        "symlink member": (retar([*[regular(n, b) for n, b in members(v3).items()], _symlink()]),
                           RejectReason.BAD_ARCHIVE, "symbolic link"),
    }


def _symlink():  # noqa: ANN202
    import tarfile

    info = tarfile.TarInfo("files/extra/evil.yar")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
    return info, None


def test_each_bad_bundle_is_refused_with_its_reason_and_v2_stays(installed, make_bundle, other_keys, tmp_path) -> None:
    refresher, active, sink = installed
    seen: dict[str, str] = {}
    for label, (data, want, text) in _bad_bundles(make_bundle, other_keys).items():
        r = refresher.install_bytes(data, label)
        assert r.outcome is Outcome.REJECTED and r.reason is want, (label, r)
        assert text in r.message, (label, r.message)
        ev = sink.events[-1]
        assert ev.topic == "sva.sigs.rejected" and ev.payload["details"]["reason"] == want.value, label
        assert ev.payload["previous_version"] == "2"
        assert_still_v2(refresher, active)
        seen[label] = want.value
        assert not (tmp_path / "pwned.yar").exists() and not Path("/tmp/pwned.yar").exists()
    assert not list(refresher.store.staging.iterdir()), "staging dirs left behind"
    st = status(refresher.store)
    assert st["counts"]["rejected"] == len(seen) and st["last_error"]["reason"] == "bad-archive"
    assert sorted(p.name for p in refresher.store.bundles.iterdir()) == [refresher.store.info().dir.name]


def test_a_bundle_with_its_own_canary_file(installed, make_bundle) -> None:
    refresher, active, _sink = installed
    ok = make_bundle(3, {"x/new.yar": NEW_RULE, "canary": NEW_STRING}, builtin=False)
    assert refresher.install_bytes(ok.read_bytes(), "v3").outcome is Outcome.ACTIVATED
    wrong = make_bundle(4, {"x/new.yar": NEW_RULE, "canary": b"nothing matches this"}, builtin=False)
    r = refresher.install_bytes(wrong.read_bytes(), "v4")
    assert r.reason is RejectReason.CANARY_FAILED and "canary (canary)" in r.message
    assert rule_names(active(), in_memory(NEW_STRING)) == {"x:SVA_Test_New_Bundle_Only"}


def test_rollback_to_last_known_good_and_no_reinstall_of_the_rolled_back_version(installed, make_bundle) -> None:
    refresher, active, sink = installed
    v3 = make_bundle(3, {"extra/other.yar": NEW_RULE.replace("New_Bundle_Only", "V3_Only")})
    assert refresher.install_bytes(v3.read_bytes(), "v3").outcome is Outcome.ACTIVATED
    assert "extra:SVA_Test_V3_Only" in rule_names(active(), in_memory(NEW_STRING))
    now, prev = refresher.rollback()
    assert (now.version, prev.version) == (2, 3) and sink.events[-1].topic == "sva.sigs.rolled_back"
    assert_still_v2(refresher, active)
    r = refresher.install_bytes(v3.read_bytes(), "v3 again")
    assert r.reason is RejectReason.NOT_NEWER and "not newer than 3" in r.message
    assert refresher.install_bytes(make_bundle(4).read_bytes(), "v4").outcome is Outcome.ACTIVATED
    assert [refresher.store.info(n).version for n in ("active", "previous")] == [4, 2]


def test_min_sva_version_is_enforced(installed, tmp_path, publisher_keys) -> None:
    from sva.sigs.pack import pack
    from sva.sigs.testing import write_source

    refresher, _active, _sink = installed
    out = tmp_path / "future.tar.gz"
    pack(write_source(tmp_path / "future"), publisher_keys[0], out, name="t", version=5, min_sva_version="99.0.0",
         check=False)
    r = refresher.install_bytes(out.read_bytes(), "future")
    assert r.reason is RejectReason.SVA_TOO_OLD and "needs sva 99.0.0" in r.message


def test_a_5000_rule_bundle_goes_through_the_whole_pipeline(refresher, make_bundle, tmp_path) -> None:
    gen = tmp_path / "gen"
    n = generate_rules(gen, 5000)
    extra = {f"gen/{p.name}": p.read_bytes() for p in gen.iterdir()}
    bundle = make_bundle(7, extra, check=True)  # pack validates it too
    active = ActiveRules(refresher.store)
    r = refresher.install_bytes(bundle.read_bytes(), "big")
    assert r.outcome is Outcome.ACTIVATED, r
    assert refresher.store.info().counts["memory_rules"] >= 5000 and n == 5001
    text = (gen / "gen_049.yar").read_text()
    token = text.split('$s = "', 1)[1].split('"', 1)[0].encode()
    assert "gen:Gen_04900" in rule_names(active(), in_memory(token))


def test_local_feed_update_and_up_to_date(config, make_bundle, tmp_path) -> None:
    feed = tmp_path / "feed"
    feed.mkdir()
    make_bundle(2, out=feed / "test-2.tar.gz")
    write_index(feed, "test", feed / "test-2.tar.gz", 2)
    ref = Refresher(SigsConfig(**{**config.__dict__, "sources": (str(feed),)}), sample=SAMPLE)
    [r] = ref.check(force=True)
    assert r.outcome is Outcome.ACTIVATED
    [r] = ref.check(force=True)
    assert r.outcome is Outcome.NOT_MODIFIED
    [r] = ref.check()  # within the interval: not even looked at
    assert r.outcome is Outcome.DEFERRED
    write_index(feed, "test", feed / "test-2.tar.gz", 2)  # rewritten, same version
    (feed / "index.json").touch()
    [r] = ref.check(force=True)
    assert r.outcome in (Outcome.UP_TO_DATE, Outcome.NOT_MODIFIED)


def test_cli_install_status_rollback(make_bundle, publisher_keys, tmp_path) -> None:
    env_dir = tmp_path / "clistore"
    base = [sys.executable, "-m", "sva", "sigs"]
    store = ["--state-dir", str(env_dir), "--trusted-key", str(publisher_keys[2])]
    v2, v3, old = make_bundle(2), make_bundle(3), make_bundle(1)
    for b in (v2, v3):
        res = subprocess.run([*base, "install", str(b), *store], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "activated" in res.stdout, res.stderr
    res = subprocess.run([*base, "install", str(old), *store, "--jsonl", str(tmp_path / "ev.jsonl")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "version 1 is not newer than 3" in res.stderr and "Traceback" not in res.stderr
    ev = json.loads((tmp_path / "ev.jsonl").read_text().splitlines()[-1])
    assert ev["topic"] == "sva.sigs.rejected" and ev["payload"]["details"]["reason"] == "not-newer"
    res = subprocess.run([*base, "status", "--json", "--state-dir", str(env_dir)], capture_output=True, text=True,
                         timeout=60)
    st = json.loads(res.stdout)
    assert st["active"]["version"] == 3 and st["previous"]["version"] == 2
    assert st["last_error"]["reason"] == "not-newer" and st["active"]["counts"]["memory_rules"] == 7
    res = subprocess.run([*base, "rollback", *store], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "version 2" in res.stdout
    res = subprocess.run([*base, "status", "--state-dir", str(env_dir)], capture_output=True, text=True, timeout=60)
    assert "active: test version 2" in res.stdout and "last error:" in res.stdout and "[not-newer]" in res.stdout


def test_cli_publisher_commands(tmp_path) -> None:
    base = [sys.executable, "-m", "sva", "sigs"]
    assert subprocess.run([*base, "keygen", "-o", str(tmp_path / "k")], capture_output=True, timeout=60).returncode == 0
    from sva.sigs.testing import write_source

    src = write_source(tmp_path / "src", {"extra/broken.yar": BROKEN_RULE})
    res = subprocess.run([*base, "pack", str(src), "--key", str(tmp_path / "k/publisher.key"), "--name", "x",
                          "--version", "1", "-o", str(tmp_path / "feed/x-1.tar.gz"), "--index"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "extra/broken.yar:7" in res.stderr and not (tmp_path / "feed/x-1.tar.gz").exists()
    (src / "extra/broken.yar").unlink()
    res = subprocess.run([*base, "pack", str(src), "--key", str(tmp_path / "k/publisher.key"), "--name", "x",
                          "--version", "1", "-o", str(tmp_path / "feed/x-1.tar.gz"), "--index"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and (tmp_path / "feed/index.json").exists(), res.stderr
    res = subprocess.run([*base, "verify", str(tmp_path / "feed/x-1.tar.gz"), "--trusted-key",
                          str(tmp_path / "k/publisher.pub"), "--check", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and json.loads(res.stdout)["counts"]["memory_rules"] == 7, res.stderr
    subprocess.run([*base, "keygen", "-o", str(tmp_path / "k2")], capture_output=True, timeout=60)
    res = subprocess.run([*base, "verify", str(tmp_path / "feed/x-1.tar.gz"), "--trusted-key",
                          str(tmp_path / "k2/publisher.pub")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not a trusted key" in res.stderr and len(res.stderr.splitlines()) == 1


def test_rules_for_scan_sources(tmp_path, make_bundle, publisher_keys, monkeypatch) -> None:
    rules_dir = tmp_path / "r"
    rules_dir.mkdir()
    (rules_dir / "new.yar").write_text(NEW_RULE)
    assert rule_names(rules_for_scan(str(rules_dir))(), in_memory(NEW_STRING)) == {"r:SVA_Test_New_Bundle_Only"}
    cfg = tmp_path / "sva.toml"
    cfg.write_text(f'[signatures]\ntrusted_keys = ["{publisher_keys[2]}"]\n')
    monkeypatch.setenv("SVA_CONFIG", str(cfg))
    bundle = make_bundle(2, {"extra/new.yar": NEW_RULE})
    assert "extra:SVA_Test_New_Bundle_Only" in rule_names(rules_for_scan(str(bundle))(), in_memory(NEW_STRING))
    monkeypatch.setenv("SVA_SIGS_DIR", str(tmp_path / "empty-store"))
    builtin = rules_for_scan(None)()
    assert "test:SVA_Lab_Marker" in rule_names(builtin, in_memory(MARKER.encode()))
    with pytest.raises(ConfigError, match="no such rule directory or bundle file"):
        rules_for_scan(str(tmp_path / "nope"))


def test_config_section_is_validated_with_key_names(tmp_path) -> None:
    ok = SigsConfig.from_mapping({"sources": ["https://feed.example/sigs/", "/srv/feed"], "interval_s": 60,
                                  "trusted_keys": ["keys"], "limits": {"max_members": 100}}, base=tmp_path)
    assert ok.trusted_keys == (tmp_path / "keys",) and ok.limits.max_members == 100 and ok.interval_s == 60.0
    for table, key in (({"interval": 5}, "signatures.interval: unknown setting"),
                       ({"interval_s": "5"}, "signatures.interval_s: expected a number"),
                       ({"interval_s": 0}, "signatures.interval_s: must be positive"),
                       ({"sources": ["http://plain.example/"]}, r"signatures.sources\[0\]: .*https:// only"),
                       ({"sources": ["relative/dir"]}, r"signatures.sources\[0\]: .*absolute"),
                       ({"limits": {"max_members": 0}}, "signatures.limits.max_members: must be at least 1"),
                       ({"limits": {"max_files": 1}}, "signatures.limits.max_files: unknown setting"),
                       ({"ca_file": "/nonexistent/ca.pem"}, "signatures.ca_file: /nonexistent/ca.pem: no such file")):
        with pytest.raises(ConfigError, match=key):
            SigsConfig.from_mapping(table)
    bad = tmp_path / "bad.toml"
    bad.write_text("[signatures]\ninterval_s = [\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)


def test_a_follower_keeps_scanning_with_the_old_rules_while_the_new_ones_compile(installed, make_bundle) -> None:
    refresher, _active, _sink = installed
    follower = ActiveRules(refresher.store)  # as a separate `sva watch` process would
    v2 = follower()
    v3 = make_bundle(3, {"extra/other.yar": NEW_RULE.replace("New_Bundle_Only", "V3_Only")})
    assert refresher.install_bytes(v3.read_bytes(), "v3").outcome is Outcome.ACTIVATED
    assert follower() is v2  # this cycle: still the old set (the new one compiles meanwhile)
    assert follower.wait_idle()
    assert "extra:SVA_Test_V3_Only" in rule_names(follower(), in_memory(NEW_STRING))
    assert refresher.install_bytes(make_bundle(4).read_bytes(), "v4").outcome is Outcome.ACTIVATED
    v4_dir = refresher.store.info().dir
    shutil.rmtree(v4_dir / "files")  # the new active bundle is damaged on disk before the follower loads it
    follower()
    assert follower.wait_idle()
    rules = follower()  # it cannot be loaded: the rules in use stay in use
    assert "extra:SVA_Test_V3_Only" in rule_names(rules, in_memory(NEW_STRING))
    assert follower.load_errors == 1 and str(v4_dir) in (follower.last_error or "")


def test_the_built_in_signatures_pack_as_a_bundle(publisher_keys, tmp_path) -> None:
    from sva.scan.rules import signatures_dir
    from sva.sigs.content import builtin_rules
    from sva.sigs.pack import pack

    res = pack(signatures_dir(), publisher_keys[0], tmp_path / "builtin.tar.gz", version=1, sample=SAMPLE)
    assert res.manifest.name == "sva-builtin" and res.manifest.canary is None  # the lab marker is the canary
    assert res.report.counts["memory_rules"] == builtin_rules().rule_count > 0
    ioc_dir = signatures_dir() / "ioc"
    if ioc_dir.is_dir():
        from sva.net.ioc import load_iocs

        lists = load_iocs(ioc_dir).lists
        assert res.report.counts["ioc_ip"] == sum(n for _l, k, n in lists if k == "ips")
        assert res.report.counts["ioc_domain"] == sum(n for _l, k, n in lists if k == "domains")
