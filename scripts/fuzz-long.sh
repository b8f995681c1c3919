#!/usr/bin/env bash
# Long fuzz run (issue 7): the proptest properties of tests/fuzz.rs with many
# cases each, and the live byte-stream fuzz with many connections.
#
#   scripts/fuzz-long.sh                 # 1,000,000 cases per property, 20,000 connections
#   FUZZ_CASES=100000 FUZZ_STREAM_CASES=2000 scripts/fuzz-long.sh
#
# Record the printed figures in doc/hardening-results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export FUZZ_CASES="${FUZZ_CASES:-1000000}"
export FUZZ_STREAM_CASES="${FUZZ_STREAM_CASES:-20000}"
PROFILE_ARGS=()
if [[ "${RELEASE:-0}" == 1 ]]; then PROFILE_ARGS=(--release); fi
echo "fuzz-long: FUZZ_CASES=$FUZZ_CASES per property, FUZZ_STREAM_CASES=$FUZZ_STREAM_CASES connections"
start=$(date +%s)
cargo test "${PROFILE_ARGS[@]}" --test fuzz -- --nocapture --test-threads=2 2>&1 | tee /tmp/ear-fuzz-long.log
end=$(date +%s)
props=$(grep -c '^test fuzz_.* ok$' /tmp/ear-fuzz-long.log || true)
echo "fuzz-long: $props tests passed in $((end - start)) s;" \
     "executions: $((FUZZ_CASES * 6)) parser inputs + $FUZZ_STREAM_CASES live connections"
