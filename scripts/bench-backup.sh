#!/usr/bin/env bash
# Backup benchmarks, side by side in one run (BENCHMARKS.md "Backup and restore"):
#
#  1. speed: per round, each step after dropping the page cache (cold reads, as after a
#     reboot): `dd` reading the backing file; a plain fsynced `dd` copy of it to the same disk;
#     an offline full backup to a directory on the same disk; the same backup to tmpfs
#     (/dev/shm: what the reading, hashing and encoding cost without the destination's
#     writes); a restore from the same-disk backup into a new data directory (fsynced), and
#     one into tmpfs. With BASE_BIN=<old binary> every backup and restore step runs with both
#     binaries, in alternating order, for A/B ratios from one run.
#  2. the foreground under online backups: fio 4 KiB random writes (iodepth 16) for RUNTIME
#     seconds, alone and while online backups run back to back (unthrottled, then with
#     --rate RATE); with BASE_BIN also under the old binary's back-to-back backups.
#     p50/p99/p99.9 write latency, and the pause of every cut.
#
# Needs root (drop_caches), fio, bc, a release build (cargo build --release).
# Usage: [BIN=new-binary] [BASE_BIN=old-binary] [RATE=200M] scripts/bench-backup.sh [SIZE_MIB=1024] [ROUNDS=3] [RUNTIME=20]
set -euo pipefail
SIZE_MIB=${1:-1024}
ROUNDS=${2:-3}
RUNTIME=${3:-20}
RATE=${RATE:-200M}
BIN=${BIN:-$(dirname "$0")/../target/release/ear-sidecar}
BIN=$(readlink -f "$BIN")
BASE_BIN=${BASE_BIN:+$(readlink -f "$BASE_BIN")}
W=$(mktemp -d /var/tmp/ear-bench-backup.XXXXXX)
M=$(mktemp -d /dev/shm/ear-bench-backup.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W" "$M"' EXIT
cd "$W"
KEK="$W/kek"
serve() { # serve BINARY
    "$1" serve --data-dir "$W/data" --socket "$W/s.sock" --metrics-addr '' \
        --kms local --local-kek-file "$KEK" --export "v=${SIZE_MIB}M" --log-level warn &
    PID=$!
    for _ in $(seq 200); do [ -S "$W/s.admin.sock" ] && break; sleep 0.05; done
}
stop() { kill "$PID"; wait "$PID" || true; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s%N; }
secs() { echo "scale=3; ($2 - $1) / 1000000000" | bc; }
ratio() { echo "scale=2; $1 / $2" | bc; }

serve "$BIN"
fio --name=fill --ioengine=nbd --uri="nbd+unix:///v?socket=$W/s.sock" --rw=write --bs=1M \
    --iodepth=8 --size="${SIZE_MIB}M" --refill_buffers >/dev/null
stop
BACKING="$W/data/exports/v.ear"
echo "export ${SIZE_MIB} MiB, backing file $(stat -c %s "$BACKING") bytes; bin $BIN${BASE_BIN:+; base $BASE_BIN}"

backup() { # backup BINARY DEST -> seconds
    rm -rf "$2"
    drop
    local t0 t1
    t0=$(now)
    "$1" backup --export v --to "$2" --data-dir "$W/data" --local-kek-file "$KEK" --full --json >/dev/null
    t1=$(now)
    secs "$t0" "$t1"
}
restore() { # restore BINARY FROM DATA_DIR -> seconds (until the data is on disk)
    rm -rf "$3"
    drop
    local t0 t1
    t0=$(now)
    "$1" restore --from "$2" --data-dir "$3" --local-kek-file "$KEK" --json >/dev/null
    sync
    t1=$(now)
    secs "$t0" "$t1"
}
# One step for each binary: "new" (and "base"), alternating which goes first.
both() { # both ROUND STEP ARGS... -> "new_s [base_s]"
    local r=$1 step=$2
    shift 2
    if [ -z "$BASE_BIN" ]; then
        echo "$("$step" "$BIN" "$@")"
    elif [ $((r % 2)) -eq 1 ]; then
        local n b
        n=$("$step" "$BIN" "$@"); b=$("$step" "$BASE_BIN" "$@")
        echo "$n $b"
    else
        local n b
        b=$("$step" "$BASE_BIN" "$@"); n=$("$step" "$BIN" "$@")
        echo "$n $b"
    fi
}

printf '%-6s %-8s %-8s %-24s %-24s %-24s %-24s\n' round dd_s copy_s \
    "backup_disk(/dd)" "backup_tmpfs(/dd)" "restore_disk(/dd)" "restore_tmpfs(/dd)"
for r in $(seq "$ROUNDS"); do
    drop; t0=$(now); dd if="$BACKING" of=/dev/null bs=1M status=none; t1=$(now)
    dd_s=$(secs "$t0" "$t1")
    # A plain copy of the backing file to the same disk, fsynced: what any
    # local backup has to do at least.
    drop; t0=$(now); dd if="$BACKING" of="$W/copy" bs=1M conv=fsync status=none; t1=$(now)
    c_s=$(secs "$t0" "$t1"); rm -f "$W/copy"
    cell() { # "new [base]" -> "new (ratio) [base (ratio)]"
        local out="" x
        for x in $1; do out="$out$x ($(ratio "$dd_s" "$x")) "; done
        echo "${out% }"
    }
    bd=$(both "$r" backup "$W/bk")
    bm=$(both "$r" backup "$M/bk")
    rd=$(both "$r" restore "$W/bk" "$W/restored")
    rm -rf "$W/restored"
    rm -rf "$M/bk"
    rm_=$(both "$r" restore "$W/bk" "$M/restored")
    rm -rf "$M/restored"
    printf '%-6s %-8s %-8s %-24s %-24s %-24s %-24s\n' "$r" "$dd_s" "$c_s" \
        "$(cell "$bd")" "$(cell "$bm")" "$(cell "$rd")" "$(cell "$rm_")"
    # The new binary's seconds, for the medians below.
    echo "$dd_s $c_s ${bd%% *} ${bm%% *} ${rd%% *} ${rm_%% *}" >> "$W/rounds"
done
touch "$W/rounds"
[ -n "$BASE_BIN" ] && echo "(each cell: new binary, then base binary; ratio = dd_s / step_s)"
# Cold reads of this VM's disk vary several-fold from round to round, so
# single cells are noise: the medians over rounds of each step's ratio to the
# same round's dd (and, for the same-disk steps, to the same round's plain
# fsynced copy, the floor for anything that writes that much to that disk).
python3 - "$W/rounds" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
if not rows:
    sys.exit(0)
med = lambda xs: statistics.median(xs)
names = ["backup disk", "backup tmpfs", "restore disk", "restore tmpfs"]
print("medians over %d rounds (new binary): dd %.3f s, copy %.3f s" % (
    len(rows), med([r[0] for r in rows]), med([r[1] for r in rows])))
for i, n in enumerate(names):
    col = 2 + i
    line = "  %-14s %.3f s  x dd %.2f" % (n, med([r[col] for r in rows]), med([r[0] / r[col] for r in rows]))
    if "disk" in n:
        line += "  x copy %.2f" % med([r[1] / r[col] for r in rows])
    print(line)
PY
rm -rf "$W/bk"

lat() {
    fio --name=lat --ioengine=nbd --uri="nbd+unix:///v?socket=$W/s.sock" --rw=randwrite --bs=4k \
        --iodepth=16 --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --output-format=json \
        --percentile_list=50:99:99.9 > "$1" 2>&1
    python3 - "$1" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]["write"]
p = j["clat_ns"]["percentile"]
print("  iops %.0f  p50 %.0f us  p99 %.0f us  p99.9 %.0f us" % (
    j["iops"], p["50.000000"] / 1e3, p["99.000000"] / 1e3, p["99.900000"] / 1e3))
PY
}
with_backups() { # with_BACKUPS BINARY LABEL [backup args...]
    local b=$1 label=$2
    shift 2
    rm -rf "$W/bk"
    serve "$b"
    echo "fio randwrite 4k iodepth 16, ${RUNTIME}s, $label:"
    ( while :; do
        "$b" backup --export v --to "$W/bk" --admin-socket "$W/s.admin.sock" --json "$@" 2>/dev/null \
            | python3 -c 'import json,sys; r=json.load(sys.stdin); print("    cut pause %d us, %d blocks preserved, %d blocks, %.1f s" % (r["cut"]["pause_us"], r["cut"]["preserved_blocks"], r["blocks"], r["duration"]))' 2>/dev/null \
            || break
      done ) &
    LOOP=$!
    lat "$W/with.json"
    kill "$LOOP" 2>/dev/null || true
    wait "$LOOP" 2>/dev/null || true
    stop
}
serve "$BIN"
echo "fio randwrite 4k iodepth 16, ${RUNTIME}s, no backup:"
lat "$W/alone.json"
stop
[ -n "$BASE_BIN" ] && with_backups "$BASE_BIN" "base binary, online backups back to back"
with_backups "$BIN" "online backups back to back"
with_backups "$BIN" "online backups back to back, --rate $RATE" --rate "$RATE"
