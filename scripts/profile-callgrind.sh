#!/usr/bin/env bash
# Counts the instructions the gateway spends per MCP tools/call, under
# valgrind's callgrind, with the load of scripts/bench-mcp.sh (every control
# on). Instruction counts are repeatable whatever else the machine does, so
# two builds can be compared on a busy machine; they cover user space only
# (no kernel time, no waits), and SHA-256 takes its portable path under
# valgrind (SHA-NI natively). Figures and how to read them: docs/benchmarks.md,
# "Where a call's instructions go".
#
# Usage: scripts/profile-callgrind.sh BIN_DIR TASKS OUT
#   BIN_DIR  holds portcullis and portcullis-load (release builds)
#   TASKS    1 (16 connections on one task) or 16 (one task per connection)
#   OUT      callgrind output file; the counts from the first call to the end
#            of the comparison run are dumped to OUT.1
# Prints the number of calls decided in that span. Summarize with
#   callgrind_annotate --inclusive=yes OUT.1
# Needs: valgrind (callgrind_control), curl, jq.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# == 3 ]] || {
  echo "usage: $0 BIN_DIR TASKS OUT" >&2
  exit 2
}
BIN_DIR=$1
TASKS=$2
OUT=$3
LOG=$(mktemp "${TMPDIR:-/tmp}/profile-callgrind.XXXXXX")
BENCH_NO_BUILD=1 BENCH_BIN_DIR="$BIN_DIR" BENCH_TASKS="$TASKS" BENCH_ROUNDS=1 BENCH_RATES=30 \
  BENCH_DURATION=15s BENCH_WARMUP=1s BENCH_CPU_PASSES=0 BENCH_READY_SECS=120 \
  BENCH_GATEWAY_WRAP="valgrind --tool=callgrind --callgrind-out-file=$OUT --dump-instr=no" \
  scripts/bench-mcp.sh --timeout 30s >"$LOG" 2>&1 &
run=$!
for _ in $(seq 1 1200); do
  grep -q "== bench-mcp" "$LOG" && break
  kill -0 "$run" 2>/dev/null || break
  sleep 0.2
done
gw=$(grep -o "gateway pid [0-9]*" "$LOG" | awk '{print $3}')
port=$(grep -o "gateway=http://127.0.0.1:[0-9]*" "$LOG" | head -1 | sed 's/.*://')
[[ -n "$gw" && -n "$port" ]] || {
  echo "profile-callgrind: the gateway did not start; log:" >&2
  cat "$LOG" >&2
  exit 1
}
decisions() {
  curl -sf "http://127.0.0.1:$port/metrics" | awk '$1 == "portcullis_decision_seconds_count" { print $2 }'
}
# Zero the counters before the harness's first call (the tasks are started).
callgrind_control -z "$gw" >/dev/null
d0=$(decisions || echo 0)
for _ in $(seq 1 6000); do
  grep -q "after the comparison" "$LOG" && break
  kill -0 "$run" 2>/dev/null || break
  sleep 0.2
done
callgrind_control -d "$gw" >/dev/null
wait "$run" || true
cat "$LOG"
# The decisions the gateway counted by the end of the comparison run.
d1=$(sed -n 's/.*gateway metrics (after the comparison): .* \([0-9]*\) decisions.*/\1/p' "$LOG")
echo "calls decided while counting: $((${d1:-0} - ${d0:-0})) (from ${d0:-0} to ${d1:-?})"
rm -f "$LOG"
