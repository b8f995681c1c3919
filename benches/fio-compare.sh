#!/usr/bin/env bash
# fio comparison: ear-sidecar (encryption on / off) against `nbdkit file` and,
# with PEERS=1, against nbdkit+luks, qemu-nbd raw and qemu-nbd with a LUKS
# image. Every target is served on its own Unix socket from a fresh temp dir,
# preconditioned by writing the whole export once, then driven by the same fio
# jobs (fio's nbd engine). Targets alternate per workload and the whole
# sequence repeats ROUNDS times, so machine drift hits every target alike.
#
# Usage: benches/fio-compare.sh [--help]   (from the repository root)
# Environment:
#   RUNTIME=10      seconds per fio job            ROUNDS=2   repetitions
#   SIZE=512M       export size                    PEERS=0    1: add LUKS/qemu peers
#   WORKLOADS="seqwrite seqread randwrite randread"   (or any RW-BS-qdN, e.g. randread-64k-qd8)
#   BIN=target/release/ear-sidecar                 NO_BUILD=0 1: do not run cargo build
#   BASE_BIN=       another ear-sidecar binary (e.g. a build of the previous
#                   commit): adds targets base-on / base-off for A/B in one run
#   RESULTS=benches/results/<timestamp>            raw fio JSON + summary.json
#   TMPDIR_BASE=/tmp (backing files live here; use a real disk, not tmpfs, if you care)
#   METRICS=0       1: run the sidecars with --metrics-addr on loopback and report, per job,
#                   the EAR overhead ratio the alert rules compute (crypto seconds / request
#                   seconds, from /metrics before and after the job) and the sidecar CPU
#                   seconds per GB moved
#
# Output: machine info, then one table per workload: throughput (MB/s for
# 1 MiB jobs, IOPS for 4 KiB jobs), p99 completion latency, server CPU use
# (utime+stime of the server process over the job / wall time), and ratios
# to `nbdkit file` and to ear-sidecar with encryption off.
set -euo pipefail

usage() {
    # The header comment above, from "fio comparison" to the end of "Output:", is the usage text.
    sed -n '2,/^set -euo pipefail/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}
case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) echo "fio-compare: unexpected argument '$1' (settings come from the environment; see --help)" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-2}
SIZE=${SIZE:-512M}
PEERS=${PEERS:-0}
WORKLOADS=${WORKLOADS:-"seqwrite seqread randwrite randread"}
BIN=${BIN:-target/release/ear-sidecar}
METRICS=${METRICS:-0}
METRICS_PORT=${METRICS_PORT:-19898}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${RESULTS:-benches/results/$STAMP}
EXPORT=bench
PASS=fio-compare-passphrase

for tool in fio python3; do
    command -v "$tool" >/dev/null || { echo "fio-compare: $tool not found" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "fio-compare: this fio has no nbd engine" >&2; exit 1; }

if [[ "${NO_BUILD:-0}" != 1 ]]; then
    cargo build --release --quiet
fi
[[ -x "$BIN" ]] || { echo "fio-compare: $BIN missing (cargo build --release)" >&2; exit 1; }

mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d "${TMPDIR_BASE:-/tmp}/fio-compare.XXXXXX")
declare -A PID SOCK URI MADDR
TARGETS=()

cleanup() {
    for t in "${!PID[@]}"; do
        kill "${PID[$t]}" 2>/dev/null || true
    done
    for t in "${!PID[@]}"; do
        wait "${PID[$t]}" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

wait_socket() {
    local s=$1 i
    for i in $(seq 1 300); do
        [[ -S "$s" ]] && return 0
        sleep 0.1
    done
    echo "fio-compare: socket $s did not appear" >&2
    return 1
}

add_target() { # name pid socket export
    TARGETS+=("$1")
    PID[$1]=$2
    SOCK[$1]=$3
    URI[$1]="nbd+unix:///$4?socket=$3"
}

# ---- machine info ---------------------------------------------------------
{
    echo "date        : $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host        : $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "cpu flags   : $(grep -m1 -ow 'aes\|vaes\|avx2\|avx512f\|vpclmulqdq' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    echo "kernel      : $(uname -r)"
    echo "memory      : $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "backing fs  : $(df -T "$WORK" | awk 'NR==2 {print $2}') ($WORK)"
    echo "ear-sidecar : $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty'), $("$BIN" --version 2>/dev/null || echo '?')"
    echo "rustc       : $(rustc --version 2>/dev/null || echo '?')"
    echo "fio         : $(fio --version)"
    echo "nbdkit      : $(nbdkit --version 2>/dev/null || echo 'not installed')"
    echo "qemu-nbd    : $(qemu-nbd --version 2>/dev/null | head -1 || echo 'not installed')"
    echo "load before : $(cut -d' ' -f1-3 /proc/loadavg)"
    [[ -n "${BASE_BIN:-}" ]] && echo "base binary : $BASE_BIN"
    echo "settings    : SIZE=$SIZE RUNTIME=${RUNTIME}s ROUNDS=$ROUNDS PEERS=$PEERS"
} | tee "$RESULTS/machine.txt"

# ---- targets --------------------------------------------------------------
start_sidecar() { # name binary extra-args...
    local name=$1 bin=$2; shift 2
    local d="$WORK/$name" maddr=""
    mkdir -p "$d"
    if [[ "$METRICS" == 1 ]]; then
        maddr="127.0.0.1:$METRICS_PORT"
        METRICS_PORT=$((METRICS_PORT + 1))
    fi
    XDG_CONFIG_HOME="$d/config" "$bin" serve --data-dir "$d/data" --socket "$d/sock" --export "$EXPORT=$SIZE" \
        --metrics-addr "$maddr" "$@" >"$d/log" 2>&1 &
    add_target "$name" $! "$d/sock" "$EXPORT"
    [[ -n "$maddr" ]] && MADDR[$name]=$maddr
    wait_socket "$d/sock"
}

start_sidecar ear-on "$BIN"
start_sidecar ear-off "$BIN" --encryption off
if [[ -n "${BASE_BIN:-}" ]]; then
    start_sidecar base-on "$BASE_BIN"
    start_sidecar base-off "$BASE_BIN" --encryption off
fi

if command -v nbdkit >/dev/null; then
    truncate -s "$SIZE" "$WORK/plain.img"
    nbdkit --foreground --exit-with-parent --unix "$WORK/nbdkit.sock" file "$WORK/plain.img" \
        >"$WORK/nbdkit.log" 2>&1 &
    add_target nbdkit $! "$WORK/nbdkit.sock" ""
    wait_socket "$WORK/nbdkit.sock"
else
    echo "fio-compare: nbdkit not installed, no plaintext reference" >&2
fi

if [[ "$PEERS" == 1 ]]; then
    have_luks_filter=0
    if command -v nbdkit >/dev/null && [[ -e "$(nbdkit --dump-config | sed -n 's/^filterdir=//p')/nbdkit-luks-filter.so" ]]; then
        have_luks_filter=1
    fi
    if command -v qemu-img >/dev/null; then
        # Low iter-time: only open time changes, not the data path.
        mkluks() {
            qemu-img create -q -f luks --object "secret,id=sec0,data=$PASS" \
                -o key-secret=sec0,iter-time=100 "$1" "$SIZE"
        }
        if [[ $have_luks_filter == 1 ]]; then
            mkluks "$WORK/nbdkit-luks.img"
            nbdkit --foreground --exit-with-parent --unix "$WORK/nbdkit-luks.sock" \
                --filter=luks file "$WORK/nbdkit-luks.img" passphrase="$PASS" \
                >"$WORK/nbdkit-luks.log" 2>&1 &
            add_target nbdkit-luks $! "$WORK/nbdkit-luks.sock" ""
            wait_socket "$WORK/nbdkit-luks.sock"
        fi
        if command -v qemu-nbd >/dev/null; then
            truncate -s "$SIZE" "$WORK/qemu-raw.img"
            qemu-nbd --format=raw --socket="$WORK/qemu-raw.sock" --export-name="$EXPORT" \
                --persistent "$WORK/qemu-raw.img" >"$WORK/qemu-raw.log" 2>&1 &
            add_target qemu-raw $! "$WORK/qemu-raw.sock" "$EXPORT"
            mkluks "$WORK/qemu-luks.img"
            qemu-nbd --object "secret,id=sec0,data=$PASS" \
                --image-opts "driver=luks,key-secret=sec0,file.filename=$WORK/qemu-luks.img" \
                --socket="$WORK/qemu-luks.sock" --export-name="$EXPORT" --persistent \
                >"$WORK/qemu-luks.log" 2>&1 &
            add_target qemu-luks $! "$WORK/qemu-luks.sock" "$EXPORT"
            wait_socket "$WORK/qemu-raw.sock"
            wait_socket "$WORK/qemu-luks.sock"
        fi
    else
        echo "fio-compare: qemu-img not installed, LUKS peers skipped" >&2
    fi
fi

# ---- jobs -----------------------------------------------------------------
job_args() { # workload -> fio arguments
    case $1 in
        seqwrite) echo "--rw=write --bs=1M --iodepth=1" ;;
        seqread) echo "--rw=read --bs=1M --iodepth=1" ;;
        randwrite) echo "--rw=randwrite --bs=4k --iodepth=4" ;;
        randread) echo "--rw=randread --bs=4k --iodepth=4" ;;
        # Any other mix as RW-BS-qdN, e.g. randread-64k-qd8 (RW: read write randread randwrite).
        *-*-qd*)
            local rw=${1%%-*} rest=${1#*-}
            echo "--rw=$rw --bs=${rest%%-qd*} --iodepth=${rest##*-qd}" ;;
        *) echo "fio-compare: unknown workload $1" >&2; return 1 ;;
    esac
}

scrape() { # target file: the target's /metrics (only sidecars started with METRICS=1)
    [[ -n "${MADDR[$1]:-}" ]] || return 0
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
        "http://${MADDR[$1]}/metrics" >"$2"
}

cpu_ticks() { # pid -> utime+stime in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat"
}

echo
echo "preconditioning: writing all $SIZE of every target once"
for t in "${TARGETS[@]}"; do
    fio --name=precondition --ioengine=nbd --uri="${URI[$t]}" --rw=write --bs=1M --iodepth=4 \
        --size="$SIZE" --output-format=json --output="$RESULTS/precondition.$t.json" >/dev/null
done

echo "running: ${WORKLOADS} x ${TARGETS[*]} x $ROUNDS rounds, ${RUNTIME}s each"
for w in $WORKLOADS; do
    for r in $(seq 1 "$ROUNDS"); do
        for t in "${TARGETS[@]}"; do
            scrape "$t" "$RESULTS/$w.$t.r$r.metrics0"
            c0=$(cpu_ticks "${PID[$t]}")
            # shellcheck disable=SC2046
            fio --name="$w" --ioengine=nbd --uri="${URI[$t]}" $(job_args "$w") \
                --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1 \
                --randrepeat=0 --output-format=json --output="$RESULTS/$w.$t.r$r.json" >/dev/null
            c1=$(cpu_ticks "${PID[$t]}")
            scrape "$t" "$RESULTS/$w.$t.r$r.metrics1"
            echo "$(( c1 - c0 ))" >"$RESULTS/$w.$t.r$r.cpu"
            printf '  %-9s %-11s round %d done\n' "$w" "$t" "$r"
        done
    done
done
echo "load after  : $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$RESULTS/machine.txt"
for t in "${TARGETS[@]}"; do
    echo "$t rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/${PID[$t]}/status")" >>"$RESULTS/rss.txt"
done

# ---- report ---------------------------------------------------------------
python3 - "$RESULTS" "$RUNTIME" "$(getconf CLK_TCK)" "$WORKLOADS" "${TARGETS[@]}" <<'EOF'
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
            d = job["write"] if "write" in w else job["read"]
            tps.append(d["bw_bytes"] / 1e6 if w.startswith("seq") or "-" in w else d["iops"])
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
                "unit": "MB/s" if w.startswith("seq") or "-" in w else "IOPS",
                "p50_us": statistics.median(p50s), "p99_us": statistics.median(p99s),
                "server_cpu_pct": statistics.mean(cpus),
                "server_cpu_s_per_gb": statistics.mean(cpu_per_gb) if cpu_per_gb else None,
                "overhead_ratio_runs": overheads,
            }
with open(f"{res}/summary.json", "w") as f:
    json.dump(summary, f, indent=2)

names = {"seqwrite": "seq write 1 MiB QD1", "seqread": "seq read 1 MiB QD1",
         "randwrite": "rand write 4 KiB QD4", "randread": "rand read 4 KiB QD4"}
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
EOF
