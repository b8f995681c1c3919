#!/usr/bin/env python3
"""Report of a benches/fio-compare.sh run: one table per workload from the raw
fio JSON in RESULTS (also usable on its own, to re-read an earlier run).

Usage: benches/fio-report.py RESULTS RUNTIME CLK_TCK "WORKLOADS" TARGET...
"""
import json, os, statistics, sys

res, runtime, hz, workloads, targets = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(), sys.argv[5:]

def metric_sum(path, name):
    """Sum of every sample of `name` (all label sets) in a Prometheus text file."""
    total = 0.0
    with open(path) as f:
        for line in f:
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(None, 1)[1])
    return total


def in_mb(w):
    """Large-block workloads report MB/s, small-block ones IOPS."""
    return w.startswith("seq") or w == "writeback" or "-" in w


summary = {}
for w in workloads:
    for t in targets:
        tps, p99s, p50s, cpus, overheads, cpu_per_gb = [], [], [], [], [], []
        r = 1
        while os.path.exists(f"{res}/{w}.{t}.r{r}.json"):
            with open(f"{res}/{w}.{t}.r{r}.json") as f:
                txt = f.read()
            # fio may print notices before the JSON document.
            j = json.loads(txt[txt.index("{"):])
            job = j["jobs"][0]
            if w == "mix":
                # Both directions count; latency is the read side's (what a query waits for).
                d = dict(job["read"])
                d["bw_bytes"] = job["read"]["bw_bytes"] + job["write"]["bw_bytes"]
                d["iops"] = job["read"]["iops"] + job["write"]["iops"]
            else:
                d = job["write"] if "write" in w or w in ("writeback", "wal") else job["read"]
            tps.append(d["bw_bytes"] / 1e6 if in_mb(w) else d["iops"])
            pct = d["clat_ns"].get("percentile", {})
            p99s.append(pct.get("99.000000", 0) / 1e3)
            p50s.append(pct.get("50.000000", 0) / 1e3)
            with open(f"{res}/{w}.{t}.r{r}.cpu") as f:
                cpu_s = int(f.read()) / hz
            cpus.append(cpu_s / (runtime + 1) * 100)
            # Bytes moved over the CPU measurement window (runtime + 1 s ramp).
            moved = d["bw_bytes"] * (runtime + 1)
            if moved > 0:
                cpu_per_gb.append(cpu_s / (moved / 1e9))
            m0, m1 = f"{res}/{w}.{t}.r{r}.metrics0", f"{res}/{w}.{t}.r{r}.metrics1"
            if os.path.exists(m0) and os.path.exists(m1):
                crypto = metric_sum(m1, "ear_request_crypto_seconds_sum") - metric_sum(m0, "ear_request_crypto_seconds_sum")
                total = metric_sum(m1, "ear_request_duration_seconds_sum") - metric_sum(m0, "ear_request_duration_seconds_sum")
                if total > 0:
                    overheads.append(crypto / total)
            r += 1
        if tps:
            summary.setdefault(w, {})[t] = {
                "throughput": statistics.mean(tps), "runs": tps,
                "unit": "MB/s" if in_mb(w) else "IOPS",
                "p50_us": statistics.median(p50s), "p99_us": statistics.median(p99s),
                "server_cpu_pct": statistics.mean(cpus),
                "server_cpu_s_per_gb": statistics.mean(cpu_per_gb) if cpu_per_gb else None,
                "overhead_ratio_runs": overheads,
            }
with open(f"{res}/summary.json", "w") as f:
    json.dump(summary, f, indent=2)

names = {"seqwrite": "seq write 1 MiB QD1", "seqread": "seq read 1 MiB QD1",
         "randwrite": "rand write 4 KiB QD4", "randread": "rand read 4 KiB QD4",
         "writeback": "seq write 128 KiB QD8", "multiconn": "rand read 4 KiB QD32 ×4 conn",
         "mix": "rand 70/30 16 KiB QD16", "wal": "WAL 4 KiB + fdatasync/8"}
print()
print(f"results in {res}")
print()
hdr = "| workload | target | throughput | p50 µs | p99 µs | server CPU | ×nbdkit | ×ear-off | runs |"
print(hdr)
print("|" + "---|" * (hdr.count("|") - 1))
for w, row in summary.items():
    ref = row.get("nbdkit", {}).get("throughput")
    off = row.get("ear-off", {}).get("throughput")
    for t, s in row.items():
        tp = s["throughput"]
        unit = s["unit"]
        tps = f"{tp:,.0f} {unit}"
        rn = f"{tp / ref:.2f}" if ref else "-"
        ro = f"{tp / off:.2f}" if off else "-"
        runs = " ".join(f"{x:,.0f}" for x in s["runs"])
        print(f"| {names.get(w, w)} | {t} | {tps} | {s['p50_us']:,.0f} | {s['p99_us']:,.0f} | {s['server_cpu_pct']:.0f} % | {rn} | {ro} | {runs} |")
if any(s.get("overhead_ratio_runs") for row in summary.values() for s in row.values()):
    print()
    print("EAR overhead ratio (crypto s / request s, as instance_export:ear_overhead:ratio_rate5m) and CPU per GB:")
    print()
    print("| workload | target | overhead ratio per run | server CPU s per GB |")
    print("|---|---|---|---|")
    for w, row in summary.items():
        for t, s in row.items():
            if s.get("overhead_ratio_runs"):
                runs = " ".join(f"{x:.3f}" for x in s["overhead_ratio_runs"])
                cpg = s["server_cpu_s_per_gb"]
                print(f"| {names.get(w, w)} | {t} | {runs} | {cpg:.2f} |" if cpg is not None else f"| {names.get(w, w)} | {t} | {runs} | - |")
print()
print("Targets: ear-on ≥ 0.85 × nbdkit on 1 MiB sequential, ≥ 0.8 × on 4 KiB random, ≥ 0.9 × ear-off.")
