#!/usr/bin/env python3
"""Summarises bench/run.sh's fio JSON files: medians per cell, and Trireme's ratio to each peer
as the median over repeats of the ratio within one repeat (runs of one repeat are adjacent in
time, so the machine's drifting speed mostly cancels), with the steal seen during the runs.
p99 is paired the same way, and each row ends with the issue's verdict against qemu-nbd: at
least its rate with a p99 no worse."""
import json
import statistics
import sys
from collections import defaultdict

results, rss_kib, size, runtime, repeat = sys.argv[1:6]
cells = defaultdict(list)
by_rep = {}  # (rw, bs, depth, target, rep) -> (IOPS, p99 µs)
steal = defaultdict(list)  # (rw, bs, depth, target) -> % of CPU time stolen during each run


def steal_pct(path):
    try:
        s0, t0, s1, t1 = map(int, open(path + ".steal").read().split())
    except (OSError, ValueError):
        return None
    return 100 * (s1 - s0) / (t1 - t0) if t1 > t0 else None


for line in open(results):
    rw, bs, depth, target, path, rep = line.rstrip("\n").split("\t")
    job = json.load(open(path))["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    p99_ns = side["clat_ns"]["percentile"].get("99.000000", 0)
    cells[(rw, bs, depth, target)].append((side["iops"], side["bw_bytes"] / 1e6, p99_ns / 1000))
    by_rep[(rw, bs, depth, target, rep)] = (side["iops"], p99_ns / 1000)
    st = steal_pct(path)
    if st is not None:
        steal[(rw, bs, depth, target)].append(st)


def paired(rw, bs, depth, peer, i=0):
    """Median over repeats of Trireme's IOPS (i=0) or p99 (i=1) over the peer's in the same
    repeat."""
    ratios = [v[i] / by_rep[(rw, bs, depth, peer, rep)][i]
              for (r, b, d, t, rep), v in by_rep.items()
              if (r, b, d, t) == (rw, bs, depth, "trireme")
              and by_rep.get((rw, bs, depth, peer, rep), (0, 0))[i]]
    return statistics.median(ratios) if ratios else float("nan")

def med(key, i):
    return statistics.median(v[i] for v in cells[key]) if cells[key] else float("nan")

rows = []
for key in cells:
    row = key[:3]
    if row not in rows:
        rows.append(row)

print(f"size {size}, {runtime} s per run, median of {repeat}; engine peak RSS {int(rss_kib) // 1024} MiB\n")
print("| workload | target | IOPS | MB/s | p99 µs | steal % | trireme/qemu-nbd | p99 trireme/qemu-nbd | trireme/raw |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
verdicts = []
for rw, bs, depth in rows:
    t = (rw, bs, depth, "trireme")
    for target in ("trireme", "qemu-nbd", "nbdkit", "raw"):
        k = (rw, bs, depth, target)
        if not cells[k]:
            continue
        iops, mbs, p99 = med(k, 0), med(k, 1), med(k, 2)
        ratio_q = p99_q = ratio_r = ""
        if target == "trireme":
            rate, tail = paired(rw, bs, depth, "qemu-nbd"), paired(rw, bs, depth, "qemu-nbd", 1)
            ratio_q, p99_q = f"{rate:.2f}", f"{tail:.2f}"
            ratio_r = f"{paired(rw, bs, depth, 'raw'):.2f}"
            # NaN (no qemu-nbd runs) compares false: not met.
            met = rate >= 1 and tail <= 1
            verdicts.append(f"{rw} {bs} QD{depth}: {'met' if met else 'NOT met'} "
                            f"({rate:.2f}x the rate, {tail:.2f}x the p99)")
        st = f"{statistics.median(steal[k]):.0f}" if steal[k] else ""
        print(f"| {rw} {bs} QD{depth} | {target} | {iops:,.0f} | {mbs:,.1f} | {p99:,.0f} | {st} | {ratio_q} | {p99_q} | {ratio_r} |")

print("\nAgainst qemu-nbd (paired medians; target: at least its rate, p99 no worse):")
for v in verdicts:
    print(f"- {v}")
