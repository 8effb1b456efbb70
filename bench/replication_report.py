#!/usr/bin/env python3
"""Summarises bench/replication.sh: fio medians per cell with the 3-replica/1-replica ratio,
then the full and partial rebuild figures, as markdown for docs/benchmarks.md."""
import json
import statistics
import sys
from collections import defaultdict

results, seq_json, full_txt, partial_txt, size, rsize, runtime, repeat = sys.argv[1:9]
MIB = 1 << 20

cells = defaultdict(list)
for line in open(results):
    rw, bs, depth, target, path = line.rstrip("\n").split("\t")
    job = json.load(open(path))["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    p99_ns = side["clat_ns"]["percentile"].get("99.000000", 0)
    cells[(rw, bs, depth, target)].append((side["iops"], side["bw_bytes"] / 1e6, p99_ns / 1000))


def med(key, i):
    return statistics.median(v[i] for v in cells[key]) if cells[key] else float("nan")


rows = []
for key in cells:
    if key[:3] not in rows:
        rows.append(key[:3])

print(f"volumes of {size}, {runtime} s per run, median of {repeat}\n")
print("| workload | target | IOPS | MB/s | p99 µs | 3-replica/1-replica |")
print("|---|---|---:|---:|---:|---:|")
for rw, bs, depth in rows:
    for target in ("3-replica", "1-replica", "qemu-nbd"):
        k = (rw, bs, depth, target)
        if not cells[k]:
            continue
        iops, mbs, p99 = med(k, 0), med(k, 1), med(k, 2)
        ratio = ""
        if target == "3-replica":
            ratio = f"{iops / med((rw, bs, depth, '1-replica'), 0):.2f}"
        print(f"| {rw} {bs} QD{depth} | {target} | {iops:,.0f} | {mbs:,.1f} | {p99:,.0f} | {ratio} |")

seq = json.load(open(seq_json))["jobs"][0]["write"]["bw_bytes"] / MIB
print()
full = open(full_txt).read().split()
if len(full) >= 4:
    copied, ms, wall = int(full[1]), int(full[2]), float(full[3])
    rate = copied / MIB / (ms / 1000) if ms else float("nan")
    print(f"Full rebuild of a {rsize} replica filled with data (set-replicas 2 → 3): "
          f"{copied / MIB:,.0f} MiB copied in {ms / 1000:.1f} s = **{rate:,.0f} MiB/s** "
          f"({wall:.1f} s from the command to online); the pool file system writes "
          f"{seq:,.0f} MiB/s sequentially (1M QD8 O_DIRECT), so the rebuild runs at "
          f"{rate / seq:.0%} of it (target ≥ 50%).")
else:
    print(f"Full rebuild: no result ({' '.join(full)}); the pool file system writes {seq:,.0f} MiB/s.")
partial = open(partial_txt).read().split()
if len(partial) >= 3:
    copied, ms = int(partial[1]), int(partial[2])
    print(f"\nPartial rebuild after a 10 s outage (engine frozen) under 4k random writes on a "
          f"256 MiB window: **{copied / MIB:,.0f} MiB copied in {ms} ms**.")
else:
    print(f"\nPartial rebuild: no result ({' '.join(partial)}).")
