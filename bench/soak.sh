#!/usr/bin/env bash
# Randomised replication soak: round after round of real faults (SIGKILL a replica, cut a
# replica host's link, SIGKILL the nexus host, kill every engine and restart them in a random
# order) on a 3-replica volume under the crash checker; every round must end with every child
# online and no acknowledged-and-flushed write lost. Prints how many rounds it survived.
# Needs root (network namespaces). Not part of CI: scripts/test.sh runs the bounded forms.
#
#   bench/soak.sh [--rounds 50] [--seed N]
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=20 seed=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/trireme/target}"
cargo build -q -p trireme
export TRIREME_BIN="$CARGO_TARGET_DIR/debug/trireme"
export TRIREME_SOAK_ROUNDS=$rounds
[ -n "$seed" ] && export TRIREME_SOAK_SEED=$seed

cargo nextest run -p trireme-tests --test soak --run-ignored ignored-only --no-capture 2>&1 |
  tee /tmp/trireme-soak.log | grep -E "^soak:|^round [0-9]+/|panicked|timed out|PASS|FAIL"
