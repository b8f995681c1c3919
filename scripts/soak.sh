#!/usr/bin/env bash
# Crash-safety soak (issue 7): many kill -9 cycles of tests/crash.rs (pipelined
# writer, kill at a random moment, restart, verify every acknowledged write and
# that only in-flight blocks may be torn/EIO).
#
#   scripts/soak.sh                      # 500 cycles
#   CRASH_CYCLES=2000 scripts/soak.sh
#   EAR_TEST_SEED=123 scripts/soak.sh    # reproduce a failing run
set -euo pipefail
cd "$(dirname "$0")/.."
export CRASH_CYCLES="${CRASH_CYCLES:-500}"
echo "soak: $CRASH_CYCLES kill -9 cycles"
start=$(date +%s)
cargo test --test crash kill9_cycles -- --nocapture 2>&1 | tee /tmp/ear-soak.log
grep -q 'test kill9_cycles_keep_acknowledged_writes ... ok' /tmp/ear-soak.log

echo "soak: done in $(( $(date +%s) - start )) s"
