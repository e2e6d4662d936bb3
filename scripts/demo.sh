#!/usr/bin/env bash
# Set up sva and run it on the built-in lab guest: boot an infected lab VM, show what
# sva sees of it from outside, take a consistent snapshot, and shut the VM down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

NAME=${SVA_DEMO_NAME:-demo}
OUT=${SVA_DEMO_OUT:-/tmp/sva-demo}
mkdir -p "$OUT"
sva lab down "$NAME" >/dev/null 2>&1 || true
trap 'sva lab down "$NAME" >/dev/null 2>&1 || true' EXIT

echo "== booting lab guest '$NAME' (infected scenario)"
sva lab up "$NAME" --scenario infected
echo "== the guest's own process list (ground truth, via its serial console)"
sva lab ps "$NAME"
echo "== sva info lab:$NAME (from outside the guest)"
sva info "lab:$NAME"
echo "== sva ps lab:$NAME (processes read from guest memory; symbols built from the guest's own BTF + kallsyms)"
sva ps "lab:$NAME"
echo "== sva scan lab:$NAME (one detection cycle; exit status 1 means findings)"
rc=0; sva scan "lab:$NAME" || rc=$?
[ "$rc" -le 1 ] || { echo "demo: sva scan failed with exit status $rc" >&2; exit "$rc"; }
echo "== consistent snapshot (guest paused during the copy)"
sva snapshot "lab:$NAME" "$OUT/$NAME.raw" --format raw
sva snapshot "lab:$NAME" "$OUT/$NAME.elf" --format elf
echo "== sva info on the ELF snapshot"
sva info "file:$OUT/$NAME.elf"
echo "== done; snapshots are in $OUT"
