#!/usr/bin/env bash
# Memory soak: the sidecar's resident memory under many connections, over time.
#
# Starts the release binary with one encrypted export, then runs fio with CONNS
# connections (one fio job each, fio's nbd engine), each at QD8 of 128 KiB random
# reads and writes (50/50), for DURATION seconds. Samples the server's VmRSS every
# INTERVAL seconds and prints them, then VmHWM (peak) and the first and last
# sample after the warm-up minute: "flat" means the last is not above the first.
#
#   scripts/rss-soak.sh                       # 64 connections, 600 s
#   CONNS=64 DURATION=120 scripts/rss-soak.sh
#   BIN=/path/to/ear-sidecar scripts/rss-soak.sh
#
# Needs fio with the nbd engine and a release build (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-64}
DURATION=${DURATION:-600}
INTERVAL=${INTERVAL:-10}
SIZE=${SIZE:-1G}
BIN=${BIN:-target/release/ear-sidecar}
[[ -x "$BIN" ]] || { echo "rss-soak: $BIN missing (cargo build --release)" >&2; exit 1; }
W=$(mktemp -d /var/tmp/ear-rss-soak.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"' EXIT
XDG_CONFIG_HOME="$W/config" "$BIN" serve --data-dir "$W/data" --socket "$W/s.sock" \
    --metrics-addr '' --export "v=$SIZE" --log-level warn 2>"$W/log" &
PID=$!
for _ in $(seq 300); do [[ -S "$W/s.sock" ]] && break; sleep 0.1; done
URI="nbd+unix:///v?socket=$W/s.sock"
echo "rss-soak: $CONNS connections x QD8 x 128 KiB randrw, ${DURATION}s, export $SIZE, $($BIN --version)"
echo "start: VmRSS $(awk '/VmRSS/ {print $2}' /proc/$PID/status) KiB"
fio --name=soak --ioengine=nbd --uri="$URI" --rw=randrw --bs=128k --iodepth=8 \
    --numjobs="$CONNS" --size="$SIZE" --time_based --runtime="$DURATION" \
    --group_reporting --output-format=json --output="$W/fio.json" >/dev/null &
FIO=$!
t=0
samples=()
while kill -0 "$FIO" 2>/dev/null; do
    sleep "$INTERVAL"
    t=$((t + INTERVAL))
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")
    thr=$(awk '/Threads/ {print $2}' "/proc/$PID/status")
    echo "t=${t}s VmRSS ${rss} KiB threads ${thr}"
    [[ $t -gt 60 ]] && samples+=("$rss")
done
wait "$FIO" || { echo "rss-soak: fio failed" >&2; exit 1; }
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
python3 - "$W/fio.json" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]
print(f"fio: read {j['read']['iops']:,.0f} IOPS, write {j['write']['iops']:,.0f} IOPS, errors {j['error']}")
PY
echo "peak: VmHWM ${hwm} KiB ($((hwm / 1024)) MiB)"
if [[ ${#samples[@]} -ge 2 ]]; then
    echo "after warm-up: first ${samples[0]} KiB, last ${samples[-1]} KiB"
fi
