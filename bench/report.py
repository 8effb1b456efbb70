#!/usr/bin/env python3
"""Summarises bench/run.sh's fio JSON files: medians per cell, Trireme's ratios to peers."""
import json
import statistics
import sys
from collections import defaultdict

results, rss_kib, size, runtime, repeat = sys.argv[1:6]
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
    row = key[:3]
    if row not in rows:
        rows.append(row)

print(f"size {size}, {runtime} s per run, median of {repeat}; engine peak RSS {int(rss_kib) // 1024} MiB\n")
print("| workload | target | IOPS | MB/s | p99 µs | trireme/qemu-nbd | trireme/raw |")
print("|---|---|---:|---:|---:|---:|---:|")
for rw, bs, depth in rows:
    t = (rw, bs, depth, "trireme")
    for target in ("trireme", "qemu-nbd", "nbdkit", "raw"):
        k = (rw, bs, depth, target)
        if not cells[k]:
            continue
        iops, mbs, p99 = med(k, 0), med(k, 1), med(k, 2)
        ratio_q = ratio_r = ""
        if target == "trireme":
            ratio_q = f"{iops / med((rw, bs, depth, 'qemu-nbd'), 0):.2f}"
            ratio_r = f"{iops / med((rw, bs, depth, 'raw'), 0):.2f}"
        print(f"| {rw} {bs} QD{depth} | {target} | {iops:,.0f} | {mbs:,.1f} | {p99:,.0f} | {ratio_q} | {ratio_r} |")
