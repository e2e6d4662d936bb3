"""Feeds over real HTTPS on loopback (a test CA made here with `cryptography`): fetch,
verify, activate; conditional requests; backoff; transport failures; bus events."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sva.bus import BusPublisher, BusSubscriber
from sva.bus.schema import validate_event
from sva.bus.testing import local_config, make_keys
from sva.sigs.active import ActiveRules
from sva.sigs.config import SigsConfig
from sva.sigs.fetch import write_index
from sva.sigs.model import RejectReason
from sva.sigs.pipeline import Outcome, Refresher
from sva.sigs.testing import FeedServer, LoopbackCA

from .conftest import NEW_RULE, SAMPLE
from .test_pipeline import NEW_STRING, in_memory, rule_names


class FakeClock:
    """Test double for the wall clock only: backoff spans minutes, which a test cannot wait."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def publish(feed: FeedServer, bundle: Path, version: int, name: str | None = None) -> str:
    target = feed.directory / (name or bundle.name)
    target.write_bytes(bundle.read_bytes())
    write_index(feed.directory, "test", target, version)
    return target.name


def https_config(config: SigsConfig, feed: FeedServer, ca: LoopbackCA, **kw: object) -> SigsConfig:
    return replace(config, sources=(feed.url,), ca_file=ca.ca_file, **kw)  # type: ignore[arg-type]


def test_https_feed_activates_then_answers_304(config, feed, ca, make_bundle) -> None:
    name = publish(feed, make_bundle(2, {"extra/new.yar": NEW_RULE}), 2)
    active = ActiveRules(Refresher(config).store)
    ref = Refresher(https_config(config, feed, ca), active=active, sample=SAMPLE)
    [r] = ref.check(force=True)
    assert r.outcome is Outcome.ACTIVATED and r.version == 2 and r.source.endswith(name), r
    assert "extra:SVA_Test_New_Bundle_Only" in rule_names(active(), in_memory(NEW_STRING))
    [r] = ref.check(force=True)
    assert r.outcome is Outcome.NOT_MODIFIED
    index_requests = [h for p, h, _s in feed.requests if p == "index.json"]
    assert feed.statuses("index.json") == [200, 304] and index_requests[1].get("If-None-Match")
    assert feed.statuses(name) == [200]  # the bundle was downloaded once
    # a newer bundle: the index changes, its ETag too, and the new version is fetched
    publish(feed, make_bundle(3), 3)
    [r] = ref.check(force=True)
    assert r.outcome is Outcome.ACTIVATED and r.previous_version == 2
    assert ref.store.info("previous").version == 2


def test_certificate_is_verified(config, feed, ca, make_bundle) -> None:
    publish(feed, make_bundle(2), 2)
    ref = Refresher(replace(config, sources=(feed.url,)), sample=SAMPLE)  # system CAs: test CA unknown
    [r] = ref.check(force=True)
    assert r.reason is RejectReason.FETCH_FAILED and "certificate" in r.message, r
    assert ref.store.info() is None
    other = LoopbackCA(Path(str(ca.directory) + "-other"))
    [r] = Refresher(replace(config, sources=(feed.url,), ca_file=other.ca_file), sample=SAMPLE).check(force=True)
    assert r.reason is RejectReason.FETCH_FAILED and "certificate" in r.message


def test_server_down_backs_off_exponentially_and_recovers(config, feed, ca, make_bundle, tmp_path) -> None:
    clock = FakeClock()
    store = Refresher(config).store
    ref0 = Refresher(https_config(config, feed, ca), sample=SAMPLE)
    publish(feed, make_bundle(2), 2)
    assert ref0.check(force=True)[0].outcome is Outcome.ACTIVATED
    url = feed.url
    feed.close()  # the server goes away; the port stays closed
    ref = Refresher(replace(https_config(config, feed, ca), interval_s=1), sample=SAMPLE, clock=clock)
    waits = []
    for _ in range(5):
        clock.now += 2  # past the interval; backoff decides
        [r] = ref.check()
        while r.outcome is Outcome.DEFERRED:
            clock.now += 1
            [r] = ref.check()
        assert r.reason is RejectReason.FETCH_FAILED and "connection refused" in r.message, r
        src = store.load_state()["sources"][url]
        waits.append(round(src["next_try"] - clock.now))
    assert waits == [10, 20, 40, 80, 80]  # doubling from backoff_initial_s, capped at backoff_max_s
    assert store.info().version == 2  # still active
    st = store.load_state()
    assert st["last_error"]["reason"] == "fetch-failed" and st["sources"][url]["failures"] == 5
    # back up on the same port: the next due poll succeeds and clears the failures
    new_dir = tmp_path / "feed2"
    new_dir.mkdir()
    server = _serve_on(new_dir, ca, int(url.rsplit(":", 1)[1].strip("/")))
    if server is None:
        pytest.skip("the feed's port was taken by another process meanwhile")
    with server:
        publish(server, make_bundle(3), 3)
        clock.now += 81
        [r] = ref.check()
        assert r.outcome is Outcome.ACTIVATED, r
        assert store.load_state()["sources"][url]["failures"] == 0


def _serve_on(directory: Path, ca: LoopbackCA, port: int) -> FeedServer | None:
    try:
        return FeedServer(directory, ca, port=port)
    except OSError:
        return None


def test_truncated_download_is_retried_not_remembered(config, feed, ca, make_bundle) -> None:
    name = publish(feed, make_bundle(2, {"extra/new.yar": NEW_RULE}), 2)
    feed.truncate.add(name)
    ref = Refresher(https_config(config, feed, ca), sample=SAMPLE)
    [r] = ref.check(force=True)
    assert r.reason is RejectReason.TRUNCATED and "ended after" in r.message, r
    assert ref.store.info() is None
    feed.truncate.clear()
    [r] = ref.check(force=True)  # the index's ETag was not kept: it is fetched and followed again
    assert r.outcome is Outcome.ACTIVATED, r
    assert feed.statuses("index.json") == [200, 200]


def test_index_lies_bundle_replayed_refused_and_not_downloaded_again(config, feed, ca, make_bundle) -> None:
    ref = Refresher(https_config(config, feed, ca), sample=SAMPLE)
    publish(feed, make_bundle(5), 5)
    assert ref.check(force=True)[0].outcome is Outcome.ACTIVATED
    name = publish(feed, make_bundle(1), 9, name="replayed.tar.gz")  # index claims 9, the signed manifest says 1
    [r] = ref.check(force=True)
    assert r.reason is RejectReason.NOT_NEWER and "version 1 is not newer than 5" in r.message
    [r] = ref.check(force=True)
    assert r.outcome is Outcome.NOT_MODIFIED and feed.statuses(name) == [200]


def test_download_mismatch_too_large_and_missing_file(config, feed, ca, make_bundle) -> None:
    ref = Refresher(https_config(config, feed, ca), sample=SAMPLE)
    bundle = make_bundle(2)
    name = publish(feed, bundle, 2)
    idx = json.loads((feed.directory / "index.json").read_text())
    idx["latest"]["sha256"] = "0" * 64
    (feed.directory / "index.json").write_text(json.dumps(idx))
    [r] = ref.check(force=True)
    assert r.reason is RejectReason.DOWNLOAD_MISMATCH and "SHA-256 differs from the feed index" in r.message
    publish(feed, bundle, 2)
    small = Refresher(https_config(config, feed, ca, max_download_bytes=1000), sample=SAMPLE)
    [r] = small.check(force=True)
    assert r.reason is RejectReason.TOO_LARGE and "over the download limit of 1000" in r.message
    (feed.directory / name).unlink()
    [r] = ref.check(force=True)
    assert r.reason is RejectReason.FETCH_FAILED and "HTTP 404" in r.message
    assert ref.store.info() is None


def test_bus_subscriber_receives_updated_and_rejected(config, feed, ca, make_bundle, tmp_path, other_keys) -> None:
    security = make_keys(tmp_path / "keys")
    with BusPublisher(local_config(tmp_path)) as bus, \
            BusSubscriber(bus.endpoint, bus.replay_endpoint, security=security, since=0, topics=["sva.sigs."]) as sub:
        ref = Refresher(https_config(config, feed, ca), sink=bus, sample=SAMPLE)
        publish(feed, make_bundle(2), 2)
        assert ref.check(force=True)[0].outcome is Outcome.ACTIVATED
        publish(feed, make_bundle(3, key=other_keys[0]), 3)
        assert ref.check(force=True)[0].reason is RejectReason.UNTRUSTED_KEY
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 2 and time.monotonic() < deadline:
            ev = sub.recv(timeout=0.5)
            if ev is not None:
                got.append(ev)
    assert [e.topic for e in got] == ["sva.sigs.updated", "sva.sigs.rejected"]
    for e in got:
        validate_event(e.to_json())
    up, rej = got[0].payload, got[1].payload
    assert (up["bundle_version"], up["previous_version"]) == ("2", "builtin")
    assert (rej["bundle_version"], rej["previous_version"], rej["details"]["reason"]) == ("3", "2", "untrusted-key")
    assert other_keys[1].id in rej["message"]


def test_refresher_loop_picks_up_each_new_version(config, feed, ca, make_bundle) -> None:
    import threading

    ref = Refresher(https_config(config, feed, ca, interval_s=0.2), sample=SAMPLE)
    stop = threading.Event()
    results: list = []
    t = threading.Thread(target=ref.run, args=(stop, results.append))
    publish(feed, make_bundle(2), 2)
    t.start()
    try:
        for version in (2, 3):
            if version == 3:
                publish(feed, make_bundle(3), 3)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (ref.store.info() is None or ref.store.info().version != version):
                time.sleep(0.05)
            assert ref.store.info().version == version, results
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    outcomes = [r.outcome for r in results]
    assert outcomes.count(Outcome.ACTIVATED) == 2 and Outcome.REJECTED not in outcomes


def test_cli_update_over_https(config, feed, ca, make_bundle, publisher_keys) -> None:
    import subprocess
    import sys

    publish(feed, make_bundle(2), 2)
    cmd = [sys.executable, "-m", "sva", "sigs", "update", "--now", "--source", feed.url, "--state-dir",
           str(config.state_dir), "--trusted-key", str(publisher_keys[2]), "--json"]
    res = subprocess.run([*cmd, "--ca-file", str(ca.ca_file)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    [r] = json.loads(res.stdout)
    assert r["outcome"] == "activated" and r["version"] == 2
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # no CA: the certificate is refused
    assert res.returncode == 2 and json.loads(res.stdout)[0]["reason"] == "fetch-failed"
    res = subprocess.run([*cmd[:-1], "--source", "http://127.0.0.1:1/"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "https:// only" in res.stderr and "Traceback" not in res.stderr
