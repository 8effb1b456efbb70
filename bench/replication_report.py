#!/usr/bin/env python3
"""Summarises bench/replication.sh: fio medians per cell with the 3-replica/1-replica ratio,
then the full and partial rebuild figures, as markdown for docs/benchmarks.md."""
import json
import os
import statistics
import sys
from collections import defaultdict

results, seq_json, full_txt, partial_txt, size, rsize, runtime, repeat = sys.argv[1:9]
nexus_txt = sys.argv[9] if len(sys.argv) > 9 else None
MIB = 1 << 20

cells = defaultdict(list)
# (rw, bs, depth, target) -> per run: {process: CPU µs per request}
cpu_cells = defaultdict(list)
nexus_of = {}
if nexus_txt:
    for line in open(nexus_txt):
        target, node = line.split()
        nexus_of[target] = node


def cpu_per_request(path, job, iops, target):
    """CPU µs per request of fio, the nexus's engine and each replica-only engine."""
    try:
        a, b = json.load(open(path + ".cpu0")), json.load(open(path + ".cpu1"))
    except OSError:
        return None
    wall = b["t"] - a["t"]
    if wall <= 0 or iops <= 0:
        return None
    out = {"fio": (job["usr_cpu"] + job["sys_cpu"]) / 100 / iops * 1e6}
    for node, after in b["cpu"].items():
        busy = (after - a["cpu"].get(node, after)) / wall
        role = "nexus" if node == nexus_of.get(target) else "replica:" + node
        out[role] = busy / iops * 1e6
    return out


by_rep = {}  # (rw, bs, depth, target, rep) -> IOPS
steal = defaultdict(list)  # (rw, bs, depth, target) -> % of CPU time stolen during each run


def steal_pct(path):
    try:
        a, b = json.load(open(path + ".cpu0")), json.load(open(path + ".cpu1"))
        return 100 * (b["steal"] - a["steal"]) / (b["all"] - a["all"])
    except (OSError, KeyError, ZeroDivisionError, ValueError):
        return None


for line in open(results):
    rw, bs, depth, target, path, rep = line.rstrip("\n").split("\t")
    job = json.load(open(path))["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    p99_ns = side["clat_ns"]["percentile"].get("99.000000", 0)
    cells[(rw, bs, depth, target)].append((side["iops"], side["bw_bytes"] / 1e6, p99_ns / 1000))
    by_rep[(rw, bs, depth, target, rep)] = side["iops"]
    st = steal_pct(path)
    if st is not None:
        steal[(rw, bs, depth, target)].append(st)
    if target in nexus_of:
        c = cpu_per_request(path, job, side["iops"], target)
        if c:
            cpu_cells[(rw, bs, depth, target)].append(c)


def paired(rw, bs, depth):
    """Per repeat, 3-replica IOPS over 1-replica IOPS; returns (median, all ratios)."""
    ratios = [v / by_rep[(rw, bs, depth, "1-replica", rep)]
              for (r, b, d, t, rep), v in sorted(by_rep.items())
              if (r, b, d, t) == (rw, bs, depth, "3-replica") and by_rep.get((rw, bs, depth, "1-replica", rep))]
    return (statistics.median(ratios) if ratios else float("nan")), ratios


def med(key, i):
    return statistics.median(v[i] for v in cells[key]) if cells[key] else float("nan")


rows = []
for key in cells:
    if key[:3] not in rows:
        rows.append(key[:3])

print(f"volumes of {size}, {runtime} s per run, median of {repeat}\n")
print("| workload | target | IOPS | MB/s | p99 µs | steal % | 3-replica/1-replica (per repeat) |")
print("|---|---|---:|---:|---:|---:|---:|")
for rw, bs, depth in rows:
    for target in ("3-replica", "1-replica", "qemu-nbd"):
        k = (rw, bs, depth, target)
        if not cells[k]:
            continue
        iops, mbs, p99 = med(k, 0), med(k, 1), med(k, 2)
        ratio = ""
        if target == "3-replica":
            m, each = paired(rw, bs, depth)
            ratio = f"{m:.2f} ({', '.join(f'{r:.2f}' for r in each)})"
        st = f"{statistics.median(steal[k]):.0f}" if steal[k] else ""
        print(f"| {rw} {bs} QD{depth} | {target} | {iops:,.0f} | {mbs:,.1f} | {p99:,.0f} | {st} | {ratio} |")

def cpu_med(key):
    """Median CPU µs per request by role; replica-only engines that did no work are dropped."""
    runs = cpu_cells.get(key) or []
    roles = {r for run in runs for r in run}
    med_by = {r: statistics.median(run.get(r, 0.0) for run in runs) for r in roles}
    return {r: v for r, v in med_by.items() if not r.startswith("replica:") or v >= 1.0}


cores = os.cpu_count() or 1
cpu_rows = [(rw, bs, d) for rw, bs, d in rows if "write" in rw and bs == "4k"]
if cpu_rows and any(cpu_cells.values()):
    print("\nCPU time per request (µs, median), from /proc and fio, and a CPU-only model of three "
          f"hosts with {cores} cores each (host 1: fio + the nexus's engine; hosts 2 and 3: one "
          "replica's engine each). The model ignores the network and the disks: it shows how far "
          "this machine's sharing of CPUs, not the software, sets the measured ratio.\n")
    print("| workload | target | fio | nexus engine | replica engines | all | "
          "model: 3-replica/1-replica on 3 hosts |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for rw, bs, depth in cpu_rows:
        c3, c1 = cpu_med((rw, bs, depth, "3-replica")), cpu_med((rw, bs, depth, "1-replica"))
        if not c3 or not c1:
            continue
        for target, c in (("3-replica", c3), ("1-replica", c1)):
            reps = sorted(v for r, v in c.items() if r.startswith("replica:"))
            total = sum(c.values())
            model = ""
            if target == "3-replica":
                host1_3 = c3.get("fio", 0) + c3.get("nexus", 0)
                bound3 = min([cores / host1_3] + [cores / v for v in reps if v > 0])
                bound1 = cores / (c1.get("fio", 0) + c1.get("nexus", 0))
                model = f"{bound3 / bound1:.2f}"
            rep_txt = " + ".join(f"{v:.1f}" for v in reps) or "–"
            print(f"| {rw} {bs} QD{depth} | {target} | {c.get('fio', 0):.1f} | "
                  f"{c.get('nexus', 0):.1f} | {rep_txt} | {total:.1f} | {model} |")

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
