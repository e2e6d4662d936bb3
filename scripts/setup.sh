#!/usr/bin/env bash
# Install everything sva needs on a Debian 12 host, as root: system packages from apt and
# a Python virtual environment in .venv with sva and its dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86      # the lab guests and the QEMU live target
  busybox-static cpio  # the lab guests' initramfs
  zstd xz-utils        # kernel modules may be compressed
  libglib2.0-0         # needed by the libvmi wheel
  python3 python3-venv python3-dev gcc
  iproute2 ca-certificates
  tcpdump tcpreplay iputils-ping  # sva/net: BPF compile, capture tests and bench_net.py
  nmap dsniff dnsutils openssl   # sva/net detection tests: port scans, arpspoof, dig, TLS ClientHello
  socat mmdebstrap e2fsprogs     # the appliance image: build (appliance/build-image.sh), QMP guestfwd in its test
  nftables systemd               # appliance firewall (nft -c, netns tests) and unit checks (systemd-analyze)
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (apt-get and QEMU lab guests need it)" >&2
  exit 2
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# apt-get download (used for the lab kernel) needs fresh package lists in any case.
echo "setup: apt-get update"
apt-get update -q >/tmp/sva-apt-update.log 2>&1 || { cat /tmp/sva-apt-update.log >&2; exit 1; }
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
echo "setup: installing sva and its Python dependencies into .venv"
.venv/bin/python -m pip install -q -e '.[test,libvmi]'
# --- alert bus (sva/bus): Node.js + npm for the example subscriber in examples/node-subscriber,
# which tests/bus runs (its test installs the npm packages into that directory's node_modules).
# Commands are checked rather than packages: a nodejs build that bundles npm is fine too.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing nodejs npm (alert bus example subscriber)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm
fi
# --- end alert bus

.venv/bin/sva --version
