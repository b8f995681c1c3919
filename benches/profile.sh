#!/usr/bin/env bash
# Top symbols of each server under each fio-compare workload (BENCHMARKS.md
# "Where the time goes"): ear-sidecar with encryption off and on, and nbdkit file,
# each on a fresh 512 MiB export preconditioned with 1 MiB writes, then for every
# workload fio runs for RUNTIME seconds while `perf record -g -p <server>` samples
# the middle of the run. Prints the TOP self-time symbols per (workload, server).
#
#   benches/profile.sh                               # all eight workloads
#   WORKLOADS="seqread randread" TOP=12 benches/profile.sh
#
# Needs root (perf), perf, fio with the nbd engine, nbdkit, a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${RUNTIME:-5}
TOP=${TOP:-8}
SIZE=${SIZE:-512M}
BIN=${BIN:-target/release/ear-sidecar}
WORKLOADS=${WORKLOADS:-"seqwrite seqread randwrite randread writeback multiconn mix wal"}
[[ -x "$BIN" ]] || { echo "profile: $BIN missing (cargo build --release)" >&2; exit 1; }
W=$(mktemp -d /var/tmp/ear-profile.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"' EXIT
declare -A PID URI
start_ear() { # name extra-args...
    local n=$1; shift
    XDG_CONFIG_HOME="$W/$n/config" "$BIN" serve --data-dir "$W/$n/data" --socket "$W/$n.sock" \
        --metrics-addr '' --export "bench=$SIZE" --log-level warn "$@" 2>"$W/$n.log" &
    PID[$n]=$!
    URI[$n]="nbd+unix:///bench?socket=$W/$n.sock"
}
start_ear ear-off --encryption off
start_ear ear-on
truncate -s "$SIZE" "$W/plain.img"
nbdkit --foreground --exit-with-parent --unix "$W/nbdkit.sock" file "$W/plain.img" 2>"$W/nbdkit.log" &
PID[nbdkit]=$!
URI[nbdkit]="nbd+unix:///?socket=$W/nbdkit.sock"
for s in ear-off.sock ear-on.sock nbdkit.sock; do
    for _ in $(seq 300); do [[ -S "$W/$s" ]] && break; sleep 0.1; done
done
TARGETS="ear-off ear-on nbdkit"
for t in $TARGETS; do
    fio --name=pc --ioengine=nbd --uri="${URI[$t]}" --rw=write --bs=1M --iodepth=4 --size="$SIZE" >/dev/null
done
# The same job definitions as benches/fio-compare.sh.
eval "$(sed -n '/^job_args()/,/^}/p' benches/fio-compare.sh)"
for w in $WORKLOADS; do
    for t in $TARGETS; do
        # shellcheck disable=SC2046
        fio --name="$w" --ioengine=nbd --uri="${URI[$t]}" $(job_args "$w") --size="$SIZE" \
            --time_based --runtime="$RUNTIME" --output-format=json --output="$W/$w.$t.json" >/dev/null &
        fio_pid=$!
        sleep 1
        perf record -q -g -o "$W/$w.$t.perf" -p "${PID[$t]}" -- sleep $((RUNTIME - 2)) >/dev/null 2>&1 || true
        wait "$fio_pid"
        echo "== $w / $t"
        perf report -i "$W/$w.$t.perf" --no-children --sort sym --stdio 2>/dev/null |
            grep -E '^ +[0-9.]+%' | head -n "$TOP" | sed 's/^ */  /' || true
    done
done
