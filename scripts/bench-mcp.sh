#!/usr/bin/env bash
# MCP tools/call through the gateway vs direct to the upstream (DESIGN §11),
# measured with the load harness (docs/load-harness.md); figures and how to
# read them: docs/benchmarks.md.
#
# Builds `portcullis` and `portcullis-load` in release, starts the demo
# warehouse MCP server over Streamable HTTP and a gateway in front of it (a
# fresh temporary directory: configuration, signing key, SQLite ledger with
# the default synchronous=FULL), starts one task, and runs the harness
# against both targets, alternating every round. Then, unless
# BENCH_CPU_PASSES=0, it runs the gateway alone at full speed a few times and
# reads the gateway's and the upstream's CPU time from /proc/<pid>/stat
# before and after each pass: CPU per call = (utime + stime delta) / calls
# answered in that pass (warm-up and the preflight call included).
# Everything it started is stopped on exit.
#
# Usage: scripts/bench-mcp.sh [extra portcullis-load options…]
#   (appended to the comparison run, e.g. --timeout 10s; the options below
#   are set through the environment instead)
#
# Environment:
#   CARGO_TARGET_DIR     default /var/tmp/portcullis-target
#   BENCH_CREDENTIAL     per-hop credential of the upstream: jwt (default) or none
#   BENCH_CONTROLS       all (default): every control on — audit.sample_low_risk = 1.0,
#                        a Cedar forbid policy (on another tool), and an [anomaly]
#                        table with 1 s rate and distinct_tools windows and a denials
#                        rule, set out of the way; base: the same without [anomaly]
#   BENCH_TASKS          tasks the gateway's connections share (default 1: all 16
#                        connections on one task; 16: one task per connection)
#   BENCH_OUT_DIR        where the JSON reports go (default /var/tmp/portcullis-bench)
#   BENCH_CPU_PASSES     gateway-only full-speed passes for CPU per call (default 3, 0 = none)
#   BENCH_RATES          default 500,2000
#   BENCH_DURATION       default 10s (each measured phase, CPU passes too)
#   BENCH_WARMUP         default 2s
#   BENCH_ROUNDS         default 3
#   BENCH_KEEP=1         keep the temporary directory (config, ledger, logs)
#   BENCH_NO_BUILD=1     use the binaries already built
#   BENCH_BIN_DIR=DIR    use portcullis and portcullis-load from DIR (no build)
#   BENCH_GATEWAY_WRAP   a command the gateway runs under, for profiling (e.g.
#                        "valgrind --tool=callgrind --instr-atstart=no"); the
#                        gateway then gets BENCH_READY_SECS (default 30) to start
#
# Exit status: the comparison run's (3 when some measured call failed; the
# CPU passes still run), or non-zero if setting up failed.
# Needs: cargo, curl, jq, sha256sum, Linux /proc.
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/portcullis-target}"
CREDENTIAL="${BENCH_CREDENTIAL:-jwt}"
OUT_DIR="${BENCH_OUT_DIR:-/var/tmp/portcullis-bench}"
CPU_PASSES="${BENCH_CPU_PASSES:-3}"
RATES="${BENCH_RATES:-500,2000}"
DURATION="${BENCH_DURATION:-10s}"
WARMUP="${BENCH_WARMUP:-2s}"
ROUNDS="${BENCH_ROUNDS:-3}"
case "$CREDENTIAL" in jwt | none) ;; *)
  echo "BENCH_CREDENTIAL must be jwt or none" >&2
  exit 2
  ;;
esac
CONTROLS="${BENCH_CONTROLS:-all}"
case "$CONTROLS" in all | base) ;; *)
  echo "BENCH_CONTROLS must be all or base" >&2
  exit 2
  ;;
esac
TASKS="${BENCH_TASKS:-1}"
if ! [[ "$TASKS" =~ ^[0-9]+$ ]] || ((TASKS < 1 || TASKS > 1024)); then
  echo "BENCH_TASKS must be 1 to 1024" >&2
  exit 2
fi
for tool in curl jq sha256sum; do
  command -v "$tool" >/dev/null || {
    echo "bench-mcp: $tool is required" >&2
    exit 2
  }
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/portcullis-bench.XXXXXX")"
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ "${BENCH_KEEP:-0}" == 1 ]]; then
    echo "bench-mcp: kept $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

BIN_DIR="${BENCH_BIN_DIR:-$CARGO_TARGET_DIR/release}"
if [[ -z "${BENCH_BIN_DIR:-}" && "${BENCH_NO_BUILD:-0}" != 1 ]]; then
  cargo build --release -p portcullis-cli -p portcullis-loadgen
fi
# Private copies: another build in the shared target directory must not
# swap the binaries in the middle of the run.
mkdir -p "$WORK/bin"
cp "$BIN_DIR/portcullis" "$BIN_DIR/portcullis-load" "$WORK/bin/"
BIN="$WORK/bin/portcullis"
LOAD="$WORK/bin/portcullis-load"

# A port nothing listens on now (the caller retries if another process takes
# it before ours binds).
pick_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  echo "bench-mcp: no free port found" >&2
  return 1
}

# wait_ready PID URL-or-port LOG: until PID accepts connections (a port) or
# answers 200 (a URL); fails if PID exits first or after BENCH_READY_SECS.
READY_SECS="${BENCH_READY_SECS:-30}"
wait_ready() {
  local pid=$1 what=$2 log=$3
  for _ in $(seq 1 $((READY_SECS * 10))); do
    if ! kill -0 "$pid" 2>/dev/null; then
      return 1
    fi
    if [[ "$what" == http* ]]; then
      curl -sf -o /dev/null "$what" && return 0
    elif (exec 3<>"/dev/tcp/127.0.0.1/$what") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "bench-mcp: not ready after $READY_SECS s; log:" >&2
  cat "$log" >&2
  return 1
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
sys_ticks() { awk '{ print $15 }' "/proc/$1/stat"; }

# --- the upstream: demo warehouse server over Streamable HTTP
for attempt in 1 2 3 4 5; do
  UP_PORT=$(pick_port)
  "$BIN" demo-server warehouse --http "127.0.0.1:$UP_PORT" >"$WORK/upstream.log" 2>&1 &
  UP_PID=$!
  PIDS+=("$UP_PID")
  if wait_ready "$UP_PID" "$UP_PORT" "$WORK/upstream.log"; then break; fi
  echo "bench-mcp: upstream on port $UP_PORT failed (attempt $attempt):" >&2
  cat "$WORK/upstream.log" >&2
  [[ $attempt == 5 ]] && exit 1
done

# --- the gateway
SECRET="bench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
SECRET_SHA=$(printf '%s' "$SECRET" | sha256sum | cut -d' ' -f1)
mkdir -p "$WORK/keys" "$WORK/policies"
"$BIN" keygen --out "$WORK/keys/k.ed25519" >/dev/null
# One forbid policy, on another tool: the measured call is checked against
# the policy index and passes.
cat >"$WORK/policies/bench.cedar" <<'CEDAR'
@id("no-prod-connect")
forbid(principal, action, resource == Tool::"demo.connect")
when { context.args.database == "prod" };
CEDAR
if [[ "$CONTROLS" == all ]]; then
  ANOMALY='[anomaly]
rate = { calls = 1000000, seconds = 1, action = "deny" }
distinct_tools = { count = 1000, seconds = 1, action = "deny" }
denials = { count = 1000000, action = "halt" }'
else
  ANOMALY=''
fi
for attempt in 1 2 3 4 5; do
  GW_PORT=$(pick_port)
  cat >"$WORK/portcullis.toml" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"
issuer = "http://127.0.0.1:$GW_PORT"

[store]
url = "sqlite://ledger.db"

[tokens]
access_ttl = "15m"
signing_key = "keys/k.ed25519"

[audit]
sample_low_risk = 1.0

[[upstreams]]
name = "demo"
transport = "http"
url = "http://127.0.0.1:$UP_PORT/mcp"
credential = { kind = "$CREDENTIAL" }

# No args_schema: the pinned upstream inputSchema applies.
[[tools]]
name = "demo.echo"
upstream = "demo"
risk = "low"
access = "read"

[[tools]]
name = "demo.connect"
upstream = "demo"
risk = "low"
access = "read"
args_schema = { type = "object", properties = { database = { type = "string", maxLength = 64 } }, required = ["database"], additionalProperties = false }

[[agent_types]]
name = "bench"
initial = "work"
states = [
  { name = "work", tools = ["demo.echo", "demo.connect"], next = ["done"] },
  { name = "done", final = true },
]

[[agents]]
id = "bench-bot"
type = "bench"
tools = ["demo.echo", "demo.connect"]
bootstrap_sha256 = "$SECRET_SHA"
limits = { max_calls_per_task = 100000000 }

[policies]
cedar = ["policies/*.cedar"]

$ANOMALY
EOF
  rm -f "$WORK"/ledger.db*
  # Word splitting of the wrapper is intended: a command and its options.
  # shellcheck disable=SC2086
  (cd "$WORK" && exec ${BENCH_GATEWAY_WRAP:-} "$BIN" serve --config portcullis.toml) >"$WORK/gateway.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
  if wait_ready "$GW_PID" "http://127.0.0.1:$GW_PORT/readyz" "$WORK/gateway.log"; then break; fi
  echo "bench-mcp: gateway on port $GW_PORT failed (attempt $attempt):" >&2
  cat "$WORK/gateway.log" >&2
  [[ $attempt == 5 ]] && exit 1
done

# One task; its access token lives 15 minutes, longer than the run.
start_task() {
  curl -sf -X POST "http://127.0.0.1:$GW_PORT/v1/tasks" \
    -H "Authorization: Bearer $SECRET" -H 'Content-Type: application/json' \
    -d '{"agent_id": "bench-bot", "goal": "bench"}' | jq -er .access_token
}
# BENCH_TASKS tasks; connection i uses token i mod BENCH_TASKS.
PORTCULLIS_BENCH_TOKEN=""
for _ in $(seq 1 "$TASKS"); do
  PORTCULLIS_BENCH_TOKEN="$PORTCULLIS_BENCH_TOKEN $(start_task)"
done
export PORTCULLIS_BENCH_TOKEN

mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
JSON="$OUT_DIR/bench-mcp-$CREDENTIAL-$CONTROLS-$TASKS-$STAMP.json"
DIRECT="http://127.0.0.1:$UP_PORT/mcp"
GATEWAY="http://127.0.0.1:$GW_PORT/mcp"

if git rev-parse --git-dir >/dev/null 2>&1; then
  SOURCE="commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo ' + uncommitted changes in crates/')"
else
  SOURCE="source $(pwd) (not a git checkout)"
fi
echo "== bench-mcp $(date -u +%FT%TZ)  $SOURCE"
echo "   credential=$CREDENTIAL  controls=$CONTROLS  tasks=$TASKS  direct=$DIRECT  gateway=$GATEWAY  gateway pid $GW_PID  upstream pid $UP_PID"
echo "   uptime: $(uptime)"

set +e
"$LOAD" \
  --target "direct=$DIRECT" \
  --target "gateway=$GATEWAY" --token-env gateway=PORTCULLIS_BENCH_TOKEN \
  --tool direct=echo --tool gateway=demo.echo \
  --args '{"text":"hi"}' \
  --rates "$RATES" --full-speed \
  --duration "$DURATION" --warmup "$WARMUP" --rounds "$ROUNDS" --max-connections 16 \
  --json "$JSON" "$@"
rc=$?
set -e
echo "   uptime: $(uptime)"
echo "   JSON: $JSON"
if [[ $rc != 0 ]]; then
  # Not a clean measurement; the CPU passes still run, and the script exits
  # with the harness's status at the end.
  echo "bench-mcp: portcullis-load exited $rc; gateway log (last 40 lines):" >&2
  tail -n 40 "$WORK/gateway.log" >&2
fi

# The gateway's own view: mean ledger commit time (write-ahead records and
# completions alike) and mean decision time over the run so far.
metrics() {
  curl -sf "http://127.0.0.1:$GW_PORT/metrics" | awk -v what="$1" '
    $1 == "portcullis_ledger_commit_seconds_sum" { cs = $2 } $1 == "portcullis_ledger_commit_seconds_count" { cc = $2 }
    $1 == "portcullis_decision_seconds_sum" { ds = $2 } $1 == "portcullis_decision_seconds_count" { dc = $2 }
    END { if (cc > 0 && dc > 0) printf "   gateway metrics (%s): %d ledger commits, mean %.0f µs; %d decisions, mean %.1f µs\n", what, cc, cs / cc * 1e6, dc, ds / dc * 1e6 }'
}
metrics "after the comparison"

# --- CPU per call at full speed: the gateway target alone.
if [[ "$CPU_PASSES" -gt 0 ]]; then
  hz=$(getconf CLK_TCK)
  echo
  echo "== CPU per call at full speed (gateway alone, 16 connections, $WARMUP warm-up + $DURATION; /proc/<pid>/stat utime+stime, ${hz} Hz ticks)"
  printf '%-6s %10s %10s %14s %12s %14s %8s\n' pass calls 'calls/s' 'gateway µs' '(of it sys)' 'upstream µs' busy%
  for pass in $(seq 1 "$CPU_PASSES"); do
    cpu_json="$OUT_DIR/bench-mcp-$CREDENTIAL-$CONTROLS-$TASKS-$STAMP-cpu$pass.json"
    g0=$(cpu_ticks "$GW_PID")
    s0=$(sys_ticks "$GW_PID")
    u0=$(cpu_ticks "$UP_PID")
    "$LOAD" --target "gateway=$GATEWAY" --token-env gateway=PORTCULLIS_BENCH_TOKEN \
      --tool demo.echo --args '{"text":"hi"}' --full-speed \
      --duration "$DURATION" --warmup "$WARMUP" --rounds 1 --max-connections 16 \
      --json "$cpu_json" >"$WORK/cpu$pass.out" 2>&1 || {
      echo "bench-mcp: CPU pass $pass failed:" >&2
      cat "$WORK/cpu$pass.out" >&2
      tail -n 40 "$WORK/gateway.log" >&2
      exit 1
    }
    g1=$(cpu_ticks "$GW_PID")
    s1=$(sys_ticks "$GW_PID")
    u1=$(cpu_ticks "$UP_PID")
    # Every call answered in the pass: measured, warm-up, and the preflight.
    read -r calls rate busy < <(jq -r '.phases[0] | "\(.ok + .error_total + .warmup_ok + .warmup_errors + 1) \(.achieved_rate) \(.machine_busy_pct)"' "$cpu_json")
    awk -v c="$calls" -v r="$rate" -v b="$busy" -v g=$((g1 - g0)) -v s=$((s1 - s0)) -v u=$((u1 - u0)) -v hz="$hz" -v p="$pass" \
      'BEGIN { printf "%-6s %10d %10.1f %14.1f %12.1f %14.1f %8.0f\n", p, c, r, g / hz / c * 1e6, s / hz / c * 1e6, u / hz / c * 1e6, b }'
  done
fi
metrics "at the end"
echo "   uptime: $(uptime)"
exit "$rc"
