#!/usr/bin/env bash
# CSI (issue 4): time from CreateVolume to a mounted, writable file system, median of 20,
# against a real `trireme up` cluster (create, controller publish, stage with mkfs, publish,
# write + fsync a file). The measurement lives beside the CSI conformance harness, in
# crates/csi/tests/bench.rs, as an ignored test so that the test command never runs it.
#
#   bench/csi.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/trireme/target}"
cargo build --release -q -p trireme
TRIREME_BIN="$CARGO_TARGET_DIR/release/trireme" \
  cargo test -q --release -p trireme-csi --test bench -- --ignored --nocapture
