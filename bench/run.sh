#!/usr/bin/env bash
# Single-replica data-path benchmark (issue 2): one run, one file system, one backing size.
#
#   bench/run.sh [--size 2GiB] [--runtime 15] [--repeat 3] [--dir /var/tmp/trireme-bench]
#                [--engine-threads N]   (passed to `trireme up`; default: up's own)
#
# Targets, each measured with fio on the same file system:
#   trireme   a published 1-replica volume (fio's nbd engine), fully written once first
#   qemu-nbd  --cache=none --aio=io_uring on a file of the same size (O_DIRECT: our durability model)
#   nbdkit    the file plugin (page cache; for information)
#   raw       the file itself, fio io_uring with O_DIRECT: the physical limit
# Rows: 4k randread QD32, 4k randwrite QD32, 4k randread QD1, 1M read QD8, 1M write QD8.
# Each cell is the median of --repeat runs. Prints a markdown table with Trireme's ratios to
# qemu-nbd (rate and p99, paired within a repeat) and to raw, the engine's peak RSS during the
# run, and per row whether the issue's target (qemu-nbd's rate or better, p99 no worse) is met.
set -euo pipefail
cd "$(dirname "$0")/.."

size=2GiB runtime=15 repeat=3 dir=/var/tmp/trireme-bench up_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --engine-threads) up_args+=(--engine-threads "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/trireme/target}"
cargo build --release -q -p trireme
bin="$CARGO_TARGET_DIR/release/trireme"

bytes=$(python3 - "$size" <<'PY'
import re, sys
m = re.fullmatch(r"(\d+)\s*(B|KiB|MiB|GiB|TiB)?", sys.argv[1])
print(int(m[1]) * {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}[m[2]])
PY
)

rm -rf "$dir"; mkdir -p "$dir"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

port=$((20000 + RANDOM % 20000))
api="127.0.0.1:$port"
# The pool holds the volume plus metadata headroom.
"$bin" up --data-dir "$dir/up" --nodes 1 --pool-size "$(( bytes / 1048576 + 512 ))MiB" --api "$api" \
  "${up_args[@]}" >"$dir/up.log" 2>&1 &
pids+=($!)
cli() { "$bin" --api "$api" --token "$(cat "$dir/up/control/admin.token")" "$@"; }
for _ in $(seq 120); do
  [ -f "$dir/up/control/admin.token" ] && cli pool list -o json 2>/dev/null | grep -q '"online"' && break
  sleep 0.5
done
cli volume create bench --size "$size" >/dev/null
uri=$(cli volume publish bench)
# The engine this run started (never another cluster's on a shared machine).
engine_pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nodes"][0]["pid"])' "$dir/up/up.json")

# Peer files of the same size, fully written.
for f in qemu.img nbdkit.img raw.img; do
  fio --name=fill --filename="$dir/$f" --size="$bytes" --rw=write --bs=1M --iodepth=8 \
      --ioengine=io_uring --direct=1 --output=/dev/null
done
fio --name=fill --ioengine=nbd --uri="$uri" --size="$bytes" --rw=write --bs=1M --iodepth=8 \
    --output=/dev/null

qport=$((port + 100)) kport=$((port + 101))
qemu-nbd --cache=none --aio=io_uring -f raw -x bench -p "$qport" -b 127.0.0.1 -t "$dir/qemu.img" &
pids+=($!)
nbdkit --foreground -i 127.0.0.1 -p "$kport" file "$dir/nbdkit.img" &
pids+=($!)
sleep 1

rows=("randread 4k 32" "randwrite 4k 32" "randread 4k 1" "read 1M 8" "write 1M 8")
targets=(trireme qemu-nbd nbdkit raw)

rss_peak=0
sample_rss() {
  local r
  r=$(awk '/VmRSS/ {print $2}' "/proc/$engine_pid/status" 2>/dev/null || echo 0)
  [ "${r:-0}" -gt "$rss_peak" ] && rss_peak=$r
  return 0
}

run_fio() { # target rw bs depth -> json file
  local target=$1 rw=$2 bs=$3 depth=$4 out=$5
  local common=(--name=b --rw="$rw" --bs="$bs" --iodepth="$depth" --size="$bytes"
                --time_based --runtime="$runtime" --ramp_time=2 --randrepeat=0
                --output-format=json --output="$out")
  case "$target" in
    trireme)  fio "${common[@]}" --ioengine=nbd --uri="$uri" ;;
    qemu-nbd) fio "${common[@]}" --ioengine=nbd --uri="nbd://127.0.0.1:$qport/bench" ;;
    nbdkit)   fio "${common[@]}" --ioengine=nbd --uri="nbd://127.0.0.1:$kport/" ;;
    raw)      fio "${common[@]}" --ioengine=io_uring --direct=1 --filename="$dir/raw.img" ;;
  esac
}

# The CPU time the hypervisor gave to others ("steal") since boot, and all CPU time: the
# report shows each run's share of steal, this shared machine's main source of noise.
cpu_ticks() { awk '/^cpu / {print $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }

results="$dir/results.tsv"; : >"$results"
for row in "${rows[@]}"; do
  read -r rw bs depth <<<"$row"
  for rep in $(seq "$repeat"); do
    # Alternate the order between repeats, so a drift in the machine's speed does not always
    # favour the same target; the report pairs each repeat's Trireme run with the peers'.
    order=("${targets[@]}")
    if [ $((rep % 2)) -eq 0 ]; then order=(qemu-nbd trireme raw nbdkit); fi
    for t in "${order[@]}"; do
      out="$dir/$t-$rw-$bs-$depth-$rep.json"
      before=$(cpu_ticks)
      run_fio "$t" "$rw" "$bs" "$depth" "$out" &
      fpid=$!
      while kill -0 $fpid 2>/dev/null; do sample_rss; sleep 1; done
      wait $fpid
      echo "$before $(cpu_ticks)" >"$out.steal"
      echo -e "$rw\t$bs\t$depth\t$t\t$out\t$rep" >>"$results"
    done
  done
done

python3 bench/report.py "$results" "$rss_peak" "$size" "$runtime" "$repeat"
