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
#                   tserver-like ones: writeback (seq write 128 KiB QD8), multiconn (rand read
#                   4 KiB QD32 over 4 connections), mix (70/30 rand 16 KiB QD16), wal (seq 4 KiB
#                   writes with an fdatasync every 8); ALL=1 runs all eight
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
[[ "${ALL:-0}" == 1 ]] && WORKLOADS="seqwrite seqread randwrite randread writeback multiconn mix wal"
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
        # What a tserver behind kernel nbd produces:
        # writeback: sequential 128 KiB writes, 8 in flight.
        writeback) echo "--rw=write --bs=128k --iodepth=8" ;;
        # multiconn: 4 KiB random reads at QD32 over 4 connections (fio job per connection).
        multiconn) echo "--rw=randread --bs=4k --iodepth=8 --numjobs=4 --group_reporting" ;;
        # mix: 70/30 random read/write of 16 KiB at QD16.
        mix) echo "--rw=randrw --rwmixread=70 --bs=16k --iodepth=16" ;;
        # wal: sequential 4 KiB appends with a sync (NBD FLUSH) every 8 writes (fio's nbd
        # engine maps fsync, not fdatasync, to FLUSH).
        wal) echo "--rw=write --bs=4k --iodepth=1 --fsync=8" ;;
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
python3 benches/fio-report.py "$RESULTS" "$RUNTIME" "$(getconf CLK_TCK)" "$WORKLOADS" "${TARGETS[@]}"
