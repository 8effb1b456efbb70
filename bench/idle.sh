#!/usr/bin/env bash
# Idle engine with many replicas (issue 2): an engine holding N replicas (default 1,000 thin
# volumes) must import them in under 1 s, stay under 128 MiB RSS, and use under 1% of a core
# while idle (no busy polling).
#
#   bench/idle.sh [--replicas 1000] [--idle-seconds 30] [--dir /var/tmp/trireme-idle]
#
# Creates the volumes through the CLI on a 1-node `trireme up`, stops the cluster, starts it
# again, and reads the pool import time from the engine's log, then samples the engine's RSS and
# CPU time from /proc over the idle period.
set -euo pipefail
cd "$(dirname "$0")/.."

replicas=1000 idle=30 dir=/var/tmp/trireme-idle
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) replicas=$2; shift 2 ;;
    --idle-seconds) idle=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/trireme/target}"
cargo build --release -q -p trireme
bin="$CARGO_TARGET_DIR/release/trireme"

rm -rf "$dir"; mkdir -p "$dir"
port=$((20000 + RANDOM % 20000))
api="127.0.0.1:$port"
up_pid=""
start_up() {
  "$bin" up --data-dir "$dir/up" --nodes 1 --pool-size 8GiB --api "$api" >>"$dir/up.log" 2>&1 &
  up_pid=$!
  for _ in $(seq 240); do
    grep -q '"ready": *true' "$dir/up/up.json" 2>/dev/null && return 0
    sleep 0.25
  done
  echo "up did not become ready; see $dir/up.log" >&2; exit 1
}
stop_up() { kill -INT "$up_pid"; wait "$up_pid" || true; }
trap 'kill "$up_pid" 2>/dev/null || true' EXIT
cli() { "$bin" --api "$api" --token "$(cat "$dir/up/control/admin.token")" "$@"; }

start_up
t0=$(date +%s.%N)
for i in $(seq "$replicas"); do
  cli volume create "idle-$i" --size 1GiB --thin >/dev/null
done
t1=$(date +%s.%N)
stop_up

start_up
engine_pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nodes"][0]["pid"])' "$dir/up/up.json")
import_line=$(grep 'elapsed_ms=' "$dir/up/logs/node-1.log" | tail -1)
import_ms=$(sed -n 's/.*elapsed_ms=\([0-9]*\).*/\1/p' <<<"$import_line")
count=$(sed -n 's/.*replicas=\([0-9]*\).*/\1/p' <<<"$import_line")

sleep 5 # let start-up work (registration, the first reconcile) settle
ticks() { awk '{print $14 + $15}' "/proc/$engine_pid/stat"; }
hz=$(getconf CLK_TCK)
c0=$(ticks); s0=$(date +%s.%N)
sleep "$idle"
c1=$(ticks); s1=$(date +%s.%N)
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$engine_pid/status")
stop_up

python3 - "$replicas" "$t0" "$t1" "${import_ms:-?}" "${count:-?}" "$rss_kib" "$c0" "$c1" "$s0" "$s1" "$hz" <<'PY'
import sys
n, t0, t1, import_ms, count, rss, c0, c1, s0, s1, hz = sys.argv[1:]
cpu = (int(c1) - int(c0)) / int(hz) / (float(s1) - float(s0)) * 100
print(f"replicas created: {n} in {float(t1) - float(t0):.1f} s (through the CLI, one process each)")
print(f"| replicas | import | engine RSS idle | engine CPU idle |")
print(f"|---:|---:|---:|---:|")
print(f"| {count} | {import_ms} ms | {int(rss) / 1024:.1f} MiB | {cpu:.2f}% of a core |")
PY
