#!/usr/bin/env bash
# Installs the real programs the tests drive: NBD clients (libnbd-bin, which has nbdfuse), fio (with its nbd
# engine), qemu-img/qemu-io/qemu-nbd, nbdkit (Debian's package includes the file plugin and the error
# filter the failing-disk tests use), file system tools, FUSE, loop devices, and iproute2 (`ip netns`,
# bridges and veth pairs: the multi-host replication tests put each engine in its own namespace).
# Idempotent: installs only what is missing. Needs root (or sudo) and Debian's package registry.
set -euo pipefail

packages=(fio libnbd-bin nbdkit qemu-utils e2fsprogs xfsprogs fuse3 util-linux iproute2 procps psmisc)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Loop devices and FUSE for the nbdfuse + losetup attach path.
[ -e /dev/fuse ] || { echo "warning: /dev/fuse is missing; nbdfuse tests will fail" >&2; }
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
# Bridges and veth pairs for the multi-host tests: built in on most kernels, modules elsewhere.
modprobe -q bridge 2>/dev/null || true
modprobe -q veth 2>/dev/null || true
nbdkit --filter=error null --dump-plugin >/dev/null 2>&1 ||
  echo "warning: nbdkit has no error filter; the failing-disk tests will fail" >&2

if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest >/dev/null
fi
