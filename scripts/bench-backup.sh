#!/usr/bin/env bash
# Backup benchmarks, side by side in one run (BENCHMARKS.md "Backup and restore"):
#
#  1. speed: an offline full backup of an export to a local directory, and a restore of it,
#     against `dd` reading the backing file sequentially; each round drops the page cache
#     first (cold reads, as after a reboot), rounds alternate;
#  2. the cut under load: fio 4 KiB random writes (iodepth 16) for RUNTIME seconds, once
#     alone and once while online backups run back to back; p50/p99/p99.9 write latency, and
#     the pause of every cut.
#
# Needs root (drop_caches), fio, a release build (cargo build --release).
# Usage: scripts/bench-backup.sh [SIZE_MIB=1024] [ROUNDS=3] [RUNTIME=20]
set -euo pipefail
SIZE_MIB=${1:-1024}
ROUNDS=${2:-3}
RUNTIME=${3:-20}
BIN=${EAR_BIN:-$(dirname "$0")/../target/release/ear-sidecar}
BIN=$(readlink -f "$BIN")
W=$(mktemp -d /var/tmp/ear-bench-backup.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
cd "$W"
KEK="$W/kek"
serve() {
    "$BIN" serve --data-dir "$W/data" --socket "$W/s.sock" --metrics-addr '' \
        --kms local --local-kek-file "$KEK" --export "v=${SIZE_MIB}M" --log-level warn &
    PID=$!
    for _ in $(seq 200); do [ -S "$W/s.admin.sock" ] && break; sleep 0.05; done
}
stop() { kill "$PID"; wait "$PID" || true; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
secs() { local t0=$1 t1=$2; echo "scale=3; ($t1 - $t0) / 1000000000" | bc; }

serve
fio --name=fill --ioengine=nbd --uri="nbd+unix:///v?socket=$W/s.sock" --rw=write --bs=1M \
    --iodepth=8 --size="${SIZE_MIB}M" --refill_buffers >/dev/null
stop
BACKING="$W/data/exports/v.ear"
echo "export ${SIZE_MIB} MiB, backing file $(stat -c %s "$BACKING") bytes"
echo "round  dd_read_s  copy_s  backup_s  backup/dd  backup/copy  restore_s  restore/dd"
for r in $(seq "$ROUNDS"); do
    rm -rf "$W/bk" "$W/restored"
    drop; t0=$(date +%s%N); dd if="$BACKING" of=/dev/null bs=1M status=none; t1=$(date +%s%N)
    dd_s=$(secs "$t0" "$t1")
    # A plain copy of the backing file to the same disk, fsynced: what any
    # local backup has to do at least.
    drop; t0=$(date +%s%N); dd if="$BACKING" of="$W/copy" bs=1M conv=fsync status=none; t1=$(date +%s%N)
    c_s=$(secs "$t0" "$t1"); rm -f "$W/copy"
    drop; t0=$(date +%s%N)
    "$BIN" backup --export v --to "$W/bk" --data-dir "$W/data" --local-kek-file "$KEK" --full --json >/dev/null
    t1=$(date +%s%N); b_s=$(secs "$t0" "$t1")
    drop; t0=$(date +%s%N)
    "$BIN" restore --from "$W/bk" --data-dir "$W/restored" --local-kek-file "$KEK" --json >/dev/null
    sync; t1=$(date +%s%N); r_s=$(secs "$t0" "$t1")
    echo "$r  $dd_s  $c_s  $b_s  $(echo "scale=2; $dd_s / $b_s" | bc)  $(echo "scale=2; $c_s / $b_s" | bc)  $r_s  $(echo "scale=2; $dd_s / $r_s" | bc)"
done

lat() {
    fio --name=lat --ioengine=nbd --uri="nbd+unix:///v?socket=$W/s.sock" --rw=randwrite --bs=4k \
        --iodepth=16 --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --output-format=json \
        --percentile_list=50:99:99.9 > "$1" 2>&1
    python3 - "$1" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]["write"]
p = j["clat_ns"]["percentile"]
print("iops %.0f  p50 %.0f us  p99 %.0f us  p99.9 %.0f us" % (
    j["iops"], p["50.000000"] / 1e3, p["99.000000"] / 1e3, p["99.900000"] / 1e3))
PY
}
serve
rm -rf "$W/bk"
echo "fio randwrite 4k iodepth 16, ${RUNTIME}s, no backup:"
lat "$W/alone.json"
echo "the same while online backups run back to back:"
( while :; do
    "$BIN" backup --export v --to "$W/bk" --admin-socket "$W/s.admin.sock" --json 2>/dev/null \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  cut pause %d us, %d blocks preserved, %.1f s" % (r["cut"]["pause_us"], r["cut"]["preserved_blocks"], r["duration"]))' 2>/dev/null \
        || break
  done ) &
LOOP=$!
lat "$W/with.json"
kill "$LOOP" 2>/dev/null || true
wait "$LOOP" 2>/dev/null || true
stop
