"""The Node.js example subscriber (examples/node-subscriber) against a real publisher.

It connects with CURVE, fills gaps by replay and validates each event with the JSON
Schema from sva/bus/schema. The fixture installs its npm dependencies (`zeromq`, `ajv`)
into examples/node-subscriber/node_modules on first use.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sva.bus import BusPublisher, ClientSecurity, alert_payload
from sva.bus.testing import sample_alert

from .conftest import REPO

NODE_DIR = REPO / "examples" / "node-subscriber"


@pytest.fixture(scope="session")
def node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed (scripts/setup.sh installs the Debian packages nodejs npm)")
    needed = [NODE_DIR / "node_modules" / name / "package.json" for name in ("zeromq", "ajv", "ajv-formats")]
    if not all(p.exists() for p in needed):
        r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR,
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0 or not all(p.exists() for p in needed):
            pytest.fail(f"npm install in {NODE_DIR} failed:\n{r.stdout}\n{r.stderr}")
    return node


def test_node_subscriber_receives_and_validates_every_event(
    node: str, publisher: Callable[..., BusPublisher], keys: ClientSecurity, tmp_path: Path
) -> None:
    bus = publisher()
    for i in range(20):  # before the subscriber starts: it gets these by replay
        bus.publish("alert", alert_payload(sample_alert(i)))
    broken = alert_payload(sample_alert(20))
    del broken["finding_info"]  # the schema must catch this one
    bus.publish("alert", broken)
    proc = subprocess.Popen(
        [node, str(NODE_DIR / "subscriber.js"), "--endpoint", bus.endpoint, "--replay-endpoint",
         bus.replay_endpoint, "--keys-dir", str(tmp_path / "keys"), "--since", "0", "--count", "45",
         "--timeout-ms", "120000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=NODE_DIR)
    try:
        # Live traffic while it runs (heartbeats and seq numbers reveal anything it misses).
        for i in range(24):
            if i % 6 == 0:
                bus.publish("health", {"component": "engine", "status": "ok", "message": f"cycle {i}"})
            elif i % 6 == 3:
                bus.publish("sigs", {"event": "updated", "message": "new bundle", "bundle_version": f"b{i}"})
            else:
                bus.publish("alert", alert_payload(sample_alert(i, detector="net_flow")))
            time.sleep(0.02)
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["seq"] for line in lines] == list(range(1, 46)), err
    assert len({line["id"] for line in lines}) == 45
    invalid = [line for line in lines if not line["valid"]]
    assert [line["seq"] for line in invalid] == [21]
    assert any("finding_info" in e for e in invalid[0]["errors"])
    assert {line["type"] for line in lines} == {"alert", "health", "sigs"}
    assert proc.returncode == 1  # it reports the invalid event through its exit status
    assert "LOST" not in err
