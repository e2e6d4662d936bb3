#!/bin/bash
# Build the sva appliance: a Debian 12 root filesystem image (ext4, mounted read-only) plus
# the kernel and initramfs for direct boot (-kernel/-initrd/-append). See appliance/README.md.
#
#   bash appliance/build-image.sh [--force]
#
# Needs root, mmdebstrap (installed here if missing), Debian's mirror and PyPI (through
# pip's cache). The result goes to $SVA_APPLIANCE_CACHE/<inputs hash>/ (default
# /var/cache/sva/appliance) and is reused until an input changes: this script, the files
# under appliance/ that go into the image, or the sva sources. The last line printed is the
# output directory; `current` there points at the newest build.
#
# Two cached stages: the Debian base (packages only; slow, changes rarely) and the final
# image (base + sva venv + configuration; about a minute).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
CACHE=${SVA_APPLIANCE_CACHE:-/var/cache/sva/appliance}
MIRROR=${SVA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${SVA_BUILD_PYTHON:-$REPO/.venv/bin/python}
SVA_UID=990  # fixed, so that the config drive's files can be owned by it (appliance/README.md)
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

log() { echo "build-image: $*" >&2; }
die() { echo "build-image: error: $*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap, chroot and file ownership need it)"

# Debian packages of the appliance. The cloud kernel has the virtio drivers and no firmware.
PACKAGES=(
  linux-image-cloud-amd64 initramfs-tools systemd systemd-sysv udev kmod
  e2fsprogs python3 python3-venv nftables procps iproute2 ca-certificates
)

command -v mmdebstrap >/dev/null || {
  log "installing mmdebstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >&2
}
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 missing (apt-get install e2fsprogs)"
[ -x "$PYTHON" ] || die "$PYTHON missing; run scripts/setup.sh first (it builds the sva wheel)"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9  # one build at a time; a second caller waits and then finds the cache filled

# ---- stage 1: the Debian base ---------------------------------------------------------
base_key=$( { printf '%s\n' "${PACKAGES[@]}" "$MIRROR"; sed -n '/^# ---- stage 1/,/^# ---- stage 2/p' "$0"; } | sha256sum | cut -c1-16)
BASE="$CACHE/base-$base_key.tar"
if [ ! -f "$BASE" ] || [ "$FORCE" = 1 ]; then
  log "stage 1: mmdebstrap bookworm from $MIRROR (a few minutes)"
  t0=$SECONDS
  # The kernel's postinst builds the initramfs; MODULES=most keeps virtio/ext4 in it
  # whatever the build host has.
  mmdebstrap --variant=minbase --format=tar --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --aptopt='Acquire::Retries "3"' \
    --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"; echo MODULES=most > "$1/etc/initramfs-tools/conf.d/sva"' \
    --customize-hook='rm -f "$1"/etc/machine-id "$1"/var/lib/dbus/machine-id; : > "$1/etc/machine-id"' \
    bookworm "$BASE.tmp" "$MIRROR" >&2 \
    || die "mmdebstrap failed (is $MIRROR reachable?)"
  mv "$BASE.tmp" "$BASE"
  log "stage 1 done in $((SECONDS - t0)) s"
fi

# ---- stage 2: sva, its configuration, the image ----------------------------------------
# Files host-kit ships for the appliance; without them the image would be unhardened.
# SVA_APPLIANCE_FILES points elsewhere for trying other versions of them.
FILES=${SVA_APPLIANCE_FILES:-$HERE}
UNIT="$FILES/systemd/sva.service"
NFT="$FILES/nftables/sva.nft"
SYSCTL_DIR="$FILES/sysctl.d"
missing=()
[ -f "$UNIT" ] || missing+=("$UNIT")
[ -f "$NFT" ] || missing+=("$NFT")
compgen -G "$SYSCTL_DIR/*.conf" >/dev/null || missing+=("$SYSCTL_DIR/*.conf")
[ "${#missing[@]}" -eq 0 ] || die "missing appliance files: ${missing[*]} (the systemd unit, nftables ruleset and sysctl hardening belong in the image)"

inputs_key=$( {
  echo "$base_key"
  sha256sum "$0"
  find -H "$HERE/image" "$FILES/systemd" "$FILES/nftables" "$SYSCTL_DIR" -type f -print0 2>/dev/null | sort -z | xargs -0 sha256sum
  cd "$REPO" && find sva detectors rules signatures pyproject.toml -type f \
    ! -name '*.pyc' ! -name '*.so' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
} | sha256sum | cut -c1-16)
OUT="$CACHE/$inputs_key"
if [ -f "$OUT/rootfs.img" ] && [ "$FORCE" = 0 ]; then
  log "cached: $OUT"
  ln -sfn "$inputs_key" "$CACHE/current"
  echo "$OUT"
  exit 0
fi

t0=$SECONDS
WORK=$(mktemp -d "$CACHE/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/root"
mkdir -p "$ROOT" "$WORK/wheels"

log "stage 2: wheels for sva and its dependencies"
"$PYTHON" -m pip wheel -q --wheel-dir "$WORK/wheels" "$REPO" >&2 || die "pip wheel failed"

tar -C "$ROOT" -xf "$BASE"
cp -r "$WORK/wheels" "$ROOT/tmp/wheels"

# Run a command in the image with /proc and /dev, in a private mount namespace so nothing
# stays mounted if we die.
in_root() {
  unshare --mount --fork -- sh -c 'mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && exec chroot "$@"' "$ROOT" "$ROOT" "$@"
}

log "stage 2: venv /opt/sva, user sva, configuration"
in_root python3 -m venv /opt/sva
in_root /opt/sva/bin/pip install -q --no-index --find-links /tmp/wheels --no-compile sva >&2
in_root /opt/sva/bin/python -m compileall -q /opt/sva/lib >/dev/null || true  # ro root: no .pyc later
rm -rf "$ROOT/tmp/wheels"
site=$(echo "$ROOT"/opt/sva/lib/python3*/site-packages)
# sva finds its built-in rules and signatures next to its package (sva.engine.rules,
# sva.scan.rules); they are data, not part of the wheel.
cp -r "$REPO/rules" "$REPO/signatures" "$site/"
ln -sf /opt/sva/bin/sva "$ROOT/usr/local/bin/sva"

in_root groupadd --system --gid "$SVA_UID" sva
in_root useradd --system --uid "$SVA_UID" --gid sva --home-dir /var/lib/sva --no-create-home \
  --shell /usr/sbin/nologin sva
in_root usermod --lock root
in_root usermod --shell /usr/sbin/nologin root

# Only the appliance's own unit: the QMP proxy and sva-host.service run on the hypervisor host.
install -m 0644 "$UNIT" "$ROOT/etc/systemd/system/sva.service"
install -m 0644 "$NFT" "$ROOT/etc/nftables.conf"
install -m 0644 "$SYSCTL_DIR"/*.conf "$ROOT/etc/sysctl.d/"
cp -r "$HERE/image/rootfs/." "$ROOT/"
sed -i "s/@SVA_UID@/$SVA_UID/g" "$ROOT/etc/fstab"
mkdir -p "$ROOT/etc/sva" "$ROOT/var/lib/sva" "$ROOT/var/cache/sva" "$ROOT/run/sva"

in_root systemctl enable sva.service nftables.service systemd-networkd.service >&2
# No logins at all: no gettys, so no password prompt on any console.
in_root systemctl mask getty@.service serial-getty@.service console-getty.service \
  getty.target >&2
rm -rf "$ROOT"/var/cache/apt/* "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/*

mkdir -p "$OUT.tmp"
cp "$(ls "$ROOT"/boot/vmlinuz-* | sort -V | tail -1)" "$OUT.tmp/vmlinuz"
cp "$(ls "$ROOT"/boot/initrd.img-* | sort -V | tail -1)" "$OUT.tmp/initrd.img"
size_mb=$(( $(du -sm "$ROOT" | cut -f1) * 13 / 10 + 64 ))
mkfs.ext4 -q -L sva-root -d "$ROOT" -E root_owner=0:0 "$OUT.tmp/rootfs.img" "${size_mb}M" >&2
cat >"$OUT.tmp/manifest.txt" <<EOF
sva appliance image $inputs_key (base $base_key), built $(date -u +%FT%TZ)
boot: -kernel vmlinuz -initrd initrd.img -append "root=LABEL=sva-root ro console=ttyS0"
kernel: $(basename "$(ls "$ROOT"/boot/vmlinuz-* | sort -V | tail -1)")
sva: $(in_root /opt/sva/bin/python -c 'import sva; print(sva.__version__)')
EOF
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
ln -sfn "$inputs_key" "$CACHE/current"
# Keep one image and one base: every source change makes a new ~1 GB image otherwise.
for old in "$CACHE"/base-*.tar "$CACHE"/????????????????; do
  [ -e "$old" ] || continue
  [ "$old" = "$BASE" ] || [ "$old" = "$OUT" ] || rm -rf "$old"
done
log "stage 2 done in $((SECONDS - t0)) s: $OUT"
echo "$OUT"
