#!/usr/bin/env bash
# Cost of the key-rotation re-encryption sweep for foreground I/O: one sidecar with an export
# filled under key version 1, rotated with the sweep paused, then fio 4 KiB random writes (QD4)
# alternating between "sweep paused" and "sweep running at RATE MiB/s" phases in one run, so
# drift hits both alike. Reports fio's p99 completion latency and IOPS per phase and the ratio
# sweeping / paused. A fresh sidecar (and fill) per rate, so every phase has old blocks to sweep.
#
# Usage: benches/sweep-p99.sh [--help]   (from the repository root)
# Environment:
#   RATES="8 32 64"   --reencrypt-rate values (MiB/s) to measure
#   SIZE=2G           export size (filled once per rate; must outlast ROUNDS x RUNTIME of sweeping)
#   RUNTIME=10        seconds per fio phase          ROUNDS=3   paused/running pairs per rate
#   BIN=target/release/ear-sidecar                   NO_BUILD=0 1: do not run cargo build
#   TMPDIR_BASE=/tmp  where the data directory lives
#
# Output: per rate and phase, p99 (µs) and IOPS, and the p99 ratio running / paused (median of
# the rounds).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo pipefail/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}
case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) echo "sweep-p99: unexpected argument '$1' (settings come from the environment; see --help)" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
RATES=${RATES:-"8 32 64"}
SIZE=${SIZE:-2G}
RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
BIN=${BIN:-target/release/ear-sidecar}
if [ "${NO_BUILD:-0}" != 1 ]; then cargo build --release --quiet; fi
for t in fio jq; do command -v $t >/dev/null || { echo "sweep-p99: $t is required" >&2; exit 2; }; done

p99_of() { jq -r '.jobs[0].write.clat_ns.percentile["99.000000"] / 1000 | floor' "$1"; }
iops_of() { jq -r '.jobs[0].write.iops | floor' "$1"; }

for rate in $RATES; do
    dir=$(mktemp -d "${TMPDIR_BASE:-/tmp}/ear-sweep-p99.XXXXXX")
    export XDG_CONFIG_HOME=$dir/cfg
    "$BIN" serve --data-dir "$dir/data" --socket "$dir/s.sock" --metrics-addr "" \
        --export "db=$SIZE" --reencrypt-rate "$rate" --log-level warn 2>"$dir/log" &
    pid=$!
    trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
    for _ in $(seq 100); do [ -S "$dir/s.admin.sock" ] && break; sleep 0.1; done
    uri="nbd+unix:///db?socket=$dir/s.sock"
    keys() { "$BIN" keys "$@" --admin-socket "$dir/s.admin.sock" >/dev/null; }
    fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=4 --size="$SIZE" \
        --output=/dev/null
    keys sweep pause
    keys rotate
    ratios=()
    for round in $(seq "$ROUNDS"); do
        for phase in paused running; do
            if [ $phase = paused ]; then keys sweep pause; else keys sweep resume; fi
            out=$dir/$rate-$round-$phase.json
            fio --name=fg --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=4 \
                --size=256M --time_based --runtime="$RUNTIME" --randrepeat=0 \
                --output-format=json --output="$out"
            printf 'rate %3s MiB/s round %s %-7s p99 %6s us  %6s IOPS\n' "$rate" "$round" $phase \
                "$(p99_of "$out")" "$(iops_of "$out")"
        done
        ratios+=("$(echo "scale=3; $(p99_of "$dir/$rate-$round-running.json") / $(p99_of "$dir/$rate-$round-paused.json")" | bc)")
    done
    left=$("$BIN" keys status --admin-socket "$dir/s.admin.sock" --json | jq '.sweep.remaining_blocks')
    median=$(printf '%s\n' "${ratios[@]}" | sort -n | sed -n "$(( (ROUNDS + 1) / 2 ))p")
    echo "rate $rate MiB/s: p99 running/paused per round: ${ratios[*]} (median $median); blocks still to sweep at the end: $left"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
    trap - EXIT
done
