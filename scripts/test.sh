#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, builds, runs every
# test (unit, property, and integration tests with real processes and real NBD clients).
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p trireme-pool   # extra arguments go to `cargo nextest run`
#
# The build goes to a target dir outside the clone (reused between runs and clones) unless
# CARGO_TARGET_DIR is set.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/trireme/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# Integration tests run the real binary.
cargo build --locked -p trireme
export TRIREME_BIN="$CARGO_TARGET_DIR/debug/trireme"

cargo nextest run --locked --workspace --no-fail-fast --profile "${NEXTEST_PROFILE:-default}" "$@"
