#!/usr/bin/env bash
# Replication benchmark (issue 3), one run on one machine: a 3-replica volume against a
# 1-replica volume (and qemu-nbd on a file, the peer from bench/run.sh), then rebuild speeds.
#
#   bench/replication.sh [--size 1GiB] [--rebuild-size 4GiB] [--runtime 10] [--repeat 3]
#                        [--dir /var/tmp/trireme-bench-repl]
#
# Cluster: `trireme up --nodes 3` (control and three engines on loopback, pools on files in
# --dir). fio's nbd engine drives every target. Needs about 3 × (2 × --size + --rebuild-size)
# of free disk while it runs; the images are deleted at the end.
# Rows: 4k randwrite QD32, 4k randwrite QD1, 1M write QD8, 4k randread QD32 — each on the
#   3-replica volume, the 1-replica volume and qemu-nbd (--cache=none --aio=io_uring).
#   Each cell is the median of --repeat runs; the 3/1 ratio is the median over repeats of the
#   ratio within a repeat (adjacent runs), next to the CPU steal seen during them. For the write
#   rows it also prints the CPU time per request of fio, the nexus's engine and the replicas'
#   engines, and what those would allow if each engine had a machine like this one to itself.
#   Targets: 3-replica randwrite IOPS >= 60% of 1-replica; reads no slower than 1-replica.
# Full rebuild: a --rebuild-size 2-replica volume is filled with 1M writes, then grown to 3
#   replicas (`volume set-replicas`): the new replica is rebuilt fully; reported are the
#   copied bytes, time and MiB/s from the child's last_rebuild, next to the pool file's own
#   sequential write bandwidth (fio 1M QD8 O_DIRECT on the same file system).
# Partial rebuild: under a random-write load on a 256 MiB window of the 3-replica volume, one
#   replica's engine is frozen (SIGSTOP) for 10 s and thawed: the nexus faults it, control
#   adds it back, and the rebuild copies what was missed; reported are the copied bytes and time.
set -euo pipefail
cd "$(dirname "$0")/.."

size=1GiB rebuild_size=4GiB runtime=10 repeat=3 dir=/var/tmp/trireme-bench-repl
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --rebuild-size) rebuild_size=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/trireme/target}"
if [ -z "${TRIREME_BIN:-}" ]; then
  cargo build --release -q -p trireme
  TRIREME_BIN="$CARGO_TARGET_DIR/release/trireme"
fi
bin=$TRIREME_BIN

to_bytes() {
  python3 - "$1" <<'PY'
import re, sys
m = re.fullmatch(r"(\d+)\s*(B|KiB|MiB|GiB|TiB)?", sys.argv[1])
print(int(m[1]) * {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}[m[2]])
PY
}
bytes=$(to_bytes "$size")
rbytes=$(to_bytes "$rebuild_size")
mib=$((1 << 20))

rm -rf "$dir"; mkdir -p "$dir"
pids=()
stopped=""
cleanup() {
  [ -n "$stopped" ] && kill -CONT "$stopped" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # The pools and images take several times --rebuild-size of real disk: keep only the logs
  # and fio's JSON.
  find "$dir" -name '*.img' -delete 2>/dev/null || true
}
trap cleanup EXIT

# Each pool holds one replica of every volume plus metadata headroom.
pool_mib=$(( (2 * bytes + rbytes) / mib + 1024 ))
port=$((20000 + RANDOM % 20000))
api="127.0.0.1:$port"
"$bin" up --data-dir "$dir/up" --nodes 3 --pool-size "${pool_mib}MiB" --api "$api" >"$dir/up.log" 2>&1 &
pids+=($!)
cli() { "$bin" --api "$api" --token "$(cat "$dir/up/control/admin.token")" "$@"; }
for _ in $(seq 240); do
  [ -f "$dir/up/control/admin.token" ] &&
    [ "$(cli pool list -o json 2>/dev/null | grep -o '"online"' | wc -l)" -ge 3 ] && break
  sleep 0.5
done
engine_pid() { # node name -> pid
  python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print([n["pid"] for n in d["nodes"] if n.get("name") == sys.argv[2] or n.get("node") == sys.argv[2]][0])' \
    "$dir/up/up.json" "$1"
}
vol_json() { cli volume get "$1" -o json; }
py_field() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }
# "<copied bytes> <ms>" of the first child with a finished rebuild of kind $1 (full|partial|any).
last_rebuild() {
  python3 -c '
import json, sys
v = json.load(sys.stdin)
for c in (v["status"].get("target") or {}).get("children", []):
    r = c.get("last_rebuild")
    if r and sys.argv[1] in ("any", r["kind"]):
        print(r["copied"], r["duration_ms"])
        break' "$1"
}

# Every engine's CPU seconds so far and the wall clock, as JSON: the report turns two snapshots
# around a fio run into CPU time per request for each process.
cpu_snapshot() {
  python3 - "$dir/up/up.json" <<'PY'
import json, os, sys, time
tck = os.sysconf("SC_CLK_TCK")
cpu = {}
for n in json.load(open(sys.argv[1]))["nodes"]:
    try:
        f = open(f"/proc/{n['pid']}/stat").read().rsplit(")", 1)[1].split()
        cpu[n["name"]] = (int(f[11]) + int(f[12])) / tck
    except (OSError, KeyError, IndexError):
        pass
stat = open("/proc/stat").readline().split()
ticks = [int(x) for x in stat[1:9]]
print(json.dumps({"t": time.monotonic(), "cpu": cpu, "steal": ticks[7], "all": sum(ticks)}))
PY
}

cli volume create r3 --size "$size" --replicas 3 >/dev/null
cli volume create r1 --size "$size" --replicas 1 >/dev/null
uri3=$(cli volume publish r3)
uri1=$(cli volume publish r1)
fio --name=fill --ioengine=nbd --uri="$uri3" --size="$bytes" --rw=write --bs=1M --iodepth=8 --output=/dev/null
fio --name=fill --ioengine=nbd --uri="$uri1" --size="$bytes" --rw=write --bs=1M --iodepth=8 --output=/dev/null

# The peer: qemu-nbd on a fully written file of the same size.
fio --name=fill --filename="$dir/qemu.img" --size="$bytes" --rw=write --bs=1M --iodepth=8 \
    --ioengine=io_uring --direct=1 --output=/dev/null
qport=$((port + 100))
qemu-nbd --cache=none --aio=io_uring -f raw -x bench -p "$qport" -b 127.0.0.1 -t "$dir/qemu.img" &
pids+=($!)
sleep 1

rows=("randwrite 4k 32" "randwrite 4k 1" "write 1M 8" "randread 4k 32")
declare -A uris=([3-replica]=$uri3 [1-replica]=$uri1 [qemu-nbd]="nbd://127.0.0.1:$qport/bench")
targets=(3-replica 1-replica qemu-nbd)
results="$dir/results.tsv"; : >"$results"
for row in "${rows[@]}"; do
  read -r rw bs depth <<<"$row"
  for rep in $(seq "$repeat"); do
    # Alternate the order between repeats (the machine's speed drifts); the report pairs each
    # repeat's 3-replica run with its 1-replica run.
    order=("${targets[@]}")
    if [ $((rep % 2)) -eq 0 ]; then order=(1-replica 3-replica qemu-nbd); fi
    for t in "${order[@]}"; do
      out="$dir/$t-$rw-$bs-$depth-$rep.json"
      cpu_snapshot >"$out.cpu0"
      fio --name=b --ioengine=nbd --uri="${uris[$t]}" --rw="$rw" --bs="$bs" --iodepth="$depth" \
          --size="$bytes" --time_based --runtime="$runtime" --ramp_time=2 --randrepeat=0 \
          --output-format=json --output="$out"
      cpu_snapshot >"$out.cpu1"
      echo -e "$rw\t$bs\t$depth\t$t\t$out\t$rep" >>"$results"
    done
  done
done

# ---- Pool file system's own sequential write bandwidth (the full-rebuild target's yardstick).
fio --name=seq --filename="$dir/seq.img" --size=1GiB --rw=write --bs=1M --iodepth=8 \
    --ioengine=io_uring --direct=1 --output-format=json --output="$dir/seq.json"
rm -f "$dir/seq.img"

# ---- Full rebuild: fill a 2-replica volume, grow it to 3.
cli volume create rb --size "$rebuild_size" --replicas 2 >/dev/null
urib=$(cli volume publish rb)
fio --name=fill --ioengine=nbd --uri="$urib" --size="$rbytes" --rw=write --bs=1M --iodepth=8 --output=/dev/null
t0=$(date +%s.%N)
cli volume set-replicas rb 3 >/dev/null
full=""
for _ in $(seq 3600); do
  full=$(vol_json rb | last_rebuild full)
  [ -n "$full" ] && break
  sleep 1
done
t1=$(date +%s.%N)
echo "full $full $(python3 -c "print($t1 - $t0)")" >"$dir/full.txt"

# ---- Partial rebuild after a 10 s outage under load.
victim=$(vol_json r3 | py_field '
[r["node"] for r in v["status"]["replicas"] if r["node"] != v["status"]["target"]["node"]][0]')
vpid=$(engine_pid "$victim")
fio --name=load --ioengine=nbd --uri="$uri3" --rw=randwrite --bs=4k --iodepth=8 --offset=0 \
    --size=256MiB --time_based --runtime=40 --output=/dev/null &
fpid=$!
sleep 5
kill -STOP "$vpid"; stopped=$vpid
sleep 10
kill -CONT "$vpid"; stopped=""
partial=""
for _ in $(seq 600); do
  partial=$(vol_json r3 | last_rebuild any)
  [ -n "$partial" ] && break
  sleep 1
done
wait $fpid || true
echo "partial $partial" >"$dir/partial.txt"

# Which node runs each volume's nexus (the rest hold replicas only).
{ echo -n "3-replica "; vol_json r3 | py_field 'v["status"]["target"]["node"]'
  echo -n "1-replica "; vol_json r1 | py_field 'v["status"]["target"]["node"]'; } >"$dir/nexus.txt"

python3 bench/replication_report.py "$results" "$dir/seq.json" "$dir/full.txt" "$dir/partial.txt" \
  "$size" "$rebuild_size" "$runtime" "$repeat" "$dir/nexus.txt"
