#!/usr/bin/env bash
# The cluster shape measured with the load harness (docs/load-harness.md);
# figures and how to read them: docs/benchmarks.md, "Cluster".
#
# Builds `portcullis` and `portcullis-load` in release and starts, all at
# once in a fresh temporary directory, on loopback:
#   * the demo warehouse MCP server over Streamable HTTP (one upstream for all);
#   * sqlite   one gateway on the embedded SQLite ledger;
#   * pg1      one gateway on PostgreSQL (its own fresh database);
#   * pg3      three gateway replicas on PostgreSQL (another fresh database)
#              behind nginx, configured as examples/cluster/ does (its
#              nginx.conf.in and healthcheck.sh, the health checker running).
# Every setup has the same registry (`demo.echo`, per-hop credential jwt) and
# one signing key. BENCH_TASKS tasks are started on each setup (through
# nginx for pg3) and their tokens shared out over the harness's connections,
# one task per connection: one task's calls are decided one at a time, so
# a single task would measure one task, not the setup.
#
# Then BENCH_ROUNDS rounds; each round runs the harness once per setup (a
# fixed rate, then full speed), rotating the order every round so that the
# setups see the same machine conditions on average. The summary is the
# median over rounds of each phase's figures. Last, the revocation delay
# from replica 1 to replica 3 of pg3 (`portcullis-load revocation`, the
# token alone and the whole task).
#
# Usage: scripts/bench-cluster.sh
# Environment:
#   CARGO_TARGET_DIR   default /var/tmp/portcullis-target
#   BENCH_PG           PostgreSQL server URL without a database, a user that
#                      may CREATE DATABASE (default postgres://postgres@127.0.0.1:5432)
#   BENCH_OUT_DIR      where the JSON reports go (default /var/tmp/portcullis-bench)
#   BENCH_TASKS        tasks per setup, = harness connections (default 16)
#   BENCH_RATE         the fixed rate, calls/s (default 200)
#   BENCH_DURATION     default 10s (each measured phase)
#   BENCH_WARMUP       default 2s
#   BENCH_ROUNDS       default 3
#   BENCH_REV_ROUNDS   revocation rounds per kind (default 50)
#   BENCH_SETUPS       which setups, default "sqlite pg1 pg3"
#   BENCH_KEEP=1       keep the temporary directory (configs, ledgers, logs)
#   BENCH_NO_BUILD=1   use the binaries already built
#   BENCH_BIN_DIR=DIR  use portcullis and portcullis-load from DIR (no build)
# Exit status: non-zero if setting up failed or any measured call failed.
# Needs: cargo, curl, jq, sha256sum, psql, nginx (for pg3).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/portcullis-target}"
PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
OUT_DIR="${BENCH_OUT_DIR:-/var/tmp/portcullis-bench}"
TASKS="${BENCH_TASKS:-16}"
RATE="${BENCH_RATE:-200}"
DURATION="${BENCH_DURATION:-10s}"
WARMUP="${BENCH_WARMUP:-2s}"
ROUNDS="${BENCH_ROUNDS:-3}"
REV_ROUNDS="${BENCH_REV_ROUNDS:-50}"
read -r -a SETUPS <<<"${BENCH_SETUPS:-sqlite pg1 pg3}"
for tool in curl jq sha256sum psql; do
  command -v "$tool" >/dev/null || {
    echo "bench-cluster: $tool is required" >&2
    exit 2
  }
done
wants() { [[ " ${SETUPS[*]} " == *" $1 "* ]]; }
if wants pg3 && ! command -v nginx >/dev/null; then
  echo "bench-cluster: nginx is required for pg3 (apt-get install nginx-light)" >&2
  exit 2
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/portcullis-bench-cluster.XXXXXX")"
PIDS=()
DBS=()
NGINX_DIR="$WORK/nginx"
cleanup() {
  local rc=$?
  if [[ -s "$NGINX_DIR/nginx.pid" ]]; then
    nginx -p "$NGINX_DIR" -c "$NGINX_DIR/nginx.conf" -e "$NGINX_DIR/error.log" -s quit 2>/dev/null || true
  fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for db in "${DBS[@]}"; do psql "$PG/postgres" -q -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true; done
  if [[ "${BENCH_KEEP:-0}" == 1 ]]; then
    echo "bench-cluster: kept $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

BIN_DIR="${BENCH_BIN_DIR:-$CARGO_TARGET_DIR/release}"
if [[ -z "${BENCH_BIN_DIR:-}" && "${BENCH_NO_BUILD:-0}" != 1 ]]; then
  cargo build --release --locked -p portcullis-cli -p portcullis-loadgen
fi
# Private copies: another build must not swap the binaries mid-run.
mkdir -p "$WORK/bin"
cp "$BIN_DIR/portcullis" "$BIN_DIR/portcullis-load" "$WORK/bin/"
BIN="$WORK/bin/portcullis"
LOAD="$WORK/bin/portcullis-load"

pick_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  echo "bench-cluster: no free port found" >&2
  return 1
}

# wait_ready PID URL LOG: until URL answers 200; fails if PID exits or after 30 s.
wait_ready() {
  local pid=$1 url=$2 log=$3
  for _ in $(seq 1 300); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "bench-cluster: process $pid exited; log:" >&2
      cat "$log" >&2
      return 1
    fi
    curl -sf -o /dev/null --max-time 1 "$url" && return 0
    sleep 0.1
  done
  echo "bench-cluster: $url not ready after 30 s; log:" >&2
  cat "$log" >&2
  return 1
}

# --- the upstream
UP_PORT=$(pick_port)
"$BIN" demo-server warehouse --http "127.0.0.1:$UP_PORT" >"$WORK/upstream.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$UP_PORT") 2>/dev/null && break
  sleep 0.1
done

SECRET="bench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
SECRET_SHA=$(printf '%s' "$SECRET" | sha256sum | cut -d' ' -f1)
export BENCH_SECRET="$SECRET"
mkdir -p "$WORK/keys"
"$BIN" keygen --out "$WORK/keys/k.ed25519" >/dev/null

# write_config FILE LISTEN ISSUER STORE_URL
write_config() {
  cat >"$1" <<EOF
[server]
listen = "$2"
issuer = "$3"

[store]
url = "$4"

[tokens]
access_ttl = "15m"
signing_key = "keys/k.ed25519"

[[upstreams]]
name = "demo"
transport = "http"
url = "http://127.0.0.1:$UP_PORT/mcp"
credential = { kind = "jwt" }

[[tools]]
name = "demo.echo"
upstream = "demo"
risk = "low"
access = "read"

[[agent_types]]
name = "bench"
initial = "work"
states = [
  { name = "work", tools = ["demo.echo"], next = ["done"] },
  { name = "done", final = true },
]

[[agents]]
id = "bench-bot"
type = "bench"
tools = ["demo.echo"]
bootstrap_sha256 = "$SECRET_SHA"
limits = { max_calls_per_task = 100000000 }
EOF
}

# start_replica NAME STORE_URL ISSUER-or-empty: starts $WORK/NAME.toml; sets
# REPLICA_PID and REPLICA_BASE (no subshell: PIDS must see it).
start_replica() {
  local name=$1 store=$2 issuer=$3 port
  port=$(pick_port)
  write_config "$WORK/$name.toml" "127.0.0.1:$port" "${issuer:-http://127.0.0.1:$port}" "$store"
  (cd "$WORK" && exec "$BIN" serve --config "$name.toml") >"$WORK/$name.log" 2>&1 &
  REPLICA_PID=$!
  PIDS+=("$REPLICA_PID")
  GW_PIDS[${name%%-*}]+="$REPLICA_PID "
  REPLICA_BASE="http://127.0.0.1:$port"
}

# new_db NAME: creates a fresh database; sets DB_URL.
new_db() {
  local db="portcullis_bench_${1}_$$"
  psql "$PG/postgres" -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE $db"
  DBS+=("$db")
  DB_URL="$PG/$db"
}

declare -A URL TOKENS GW_PIDS
if wants sqlite; then
  start_replica sqlite "sqlite://sqlite-ledger.db" ""
  wait_ready "$REPLICA_PID" "$REPLICA_BASE/readyz" "$WORK/sqlite.log"
  URL[sqlite]=$REPLICA_BASE
fi
if wants pg1; then
  new_db 1
  start_replica pg1 "$DB_URL" ""
  wait_ready "$REPLICA_PID" "$REPLICA_BASE/readyz" "$WORK/pg1.log"
  URL[pg1]=$REPLICA_BASE
fi
if wants pg3; then
  new_db 3
  LB_PORT=$(pick_port)
  REPLICAS=()
  for i in 1 2 3; do
    start_replica "pg3-r$i" "$DB_URL" "http://127.0.0.1:$LB_PORT"
    wait_ready "$REPLICA_PID" "$REPLICA_BASE/readyz" "$WORK/pg3-r$i.log"
    REPLICAS+=("${REPLICA_BASE#http://}")
  done
  mkdir -p "$NGINX_DIR/tmp"
  sed -e "s|@NGINX_DIR@|$NGINX_DIR|g" -e "s|@LISTEN@|127.0.0.1:$LB_PORT|g" \
    -e "s|@USER@|$(id -un)|g" examples/cluster/nginx.conf.in >"$NGINX_DIR/nginx.conf"
  # No access log: it would cost the load balancer a write per call.
  sed -i "s|access_log $NGINX_DIR/access.log;|access_log off;|" "$NGINX_DIR/nginx.conf"
  examples/cluster/healthcheck.sh --once "$NGINX_DIR" "${REPLICAS[@]}" >/dev/null
  nginx -p "$NGINX_DIR" -c "$NGINX_DIR/nginx.conf" -e "$NGINX_DIR/error.log"
  examples/cluster/healthcheck.sh "$NGINX_DIR" "${REPLICAS[@]}" >"$WORK/healthcheck.log" 2>&1 &
  PIDS+=("$!")
  URL[pg3]="http://127.0.0.1:$LB_PORT"
  for _ in $(seq 1 100); do curl -sf -o /dev/null "${URL[pg3]}/readyz" && break; sleep 0.1; done
fi

# Tasks: their access tokens live 15 minutes, longer than the run.
for s in "${SETUPS[@]}"; do
  toks=""
  for _ in $(seq 1 "$TASKS"); do
    t=$(curl -sf -X POST "${URL[$s]}/v1/tasks" -H "Authorization: Bearer $SECRET" \
      -H 'Content-Type: application/json' -d '{"agent_id": "bench-bot", "goal": "bench"}' | jq -er .access_token)
    toks+="$t "
  done
  TOKENS[$s]=$toks
done

mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
if git rev-parse --git-dir >/dev/null 2>&1; then
  SOURCE="commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo ' + uncommitted changes in crates/')"
else
  SOURCE="source $ROOT (not a git checkout)"
fi
echo "== bench-cluster $(date -u +%FT%TZ)  $SOURCE  ($(nproc) cores)"
for s in "${SETUPS[@]}"; do echo "   $s: ${URL[$s]}/mcp"; done
echo "   $TASKS tasks and connections per setup; rate $RATE/s and full speed; $WARMUP + $DURATION per phase; $ROUNDS rounds"
echo "   uptime: $(uptime)"

# CPU time (utime + stime, clock ticks) of processes, from /proc/<pid>/stat.
ticks() {
  local t=0 p
  for p in "$@"; do
    if [[ -r "/proc/$p/stat" ]]; then
      t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat")))
    fi
  done
  echo "$t"
}
nginx_workers() {
  if [[ -s "$NGINX_DIR/nginx.pid" ]]; then pgrep -P "$(cat "$NGINX_DIR/nginx.pid")" || true; fi
}
# Every PostgreSQL process of the machine: the shared server also serves
# other work, so this is an upper bound of what the setup cost it.
postgres_pids() { pgrep -u postgres || true; }
HZ=$(getconf CLK_TCK)

rc=0
for r in $(seq 1 "$ROUNDS"); do
  # Rotate the order: round 1 a b c, round 2 b c a, …
  n=${#SETUPS[@]}
  for k in $(seq 0 $((n - 1))); do
    s=${SETUPS[$(((k + r - 1) % n))]}
    export BENCH_TOKENS="${TOKENS[$s]}"
    json="$OUT_DIR/bench-cluster-$STAMP-$s-r$r.json"
    # shellcheck disable=SC2086 # word splitting of the pid lists is wanted
    {
      g0=$(ticks ${GW_PIDS[$s]})
      n0=$(ticks $(nginx_workers))
      p0=$(ticks $(postgres_pids))
    }
    if ! "$LOAD" --target "$s=${URL[$s]}/mcp" --token-env "$s=BENCH_TOKENS" \
      --tool demo.echo --args '{"text":"hi"}' --rates "$RATE" --full-speed \
      --duration "$DURATION" --warmup "$WARMUP" --rounds 1 --max-connections "$TASKS" \
      --json "$json" >"$WORK/load-$s-r$r.out" 2>&1; then
      echo "bench-cluster: $s round $r: some calls failed (see below)" >&2
      tail -n 20 "$WORK/load-$s-r$r.out" >&2
      rc=3
    fi
    # shellcheck disable=SC2086
    {
      g1=$(ticks ${GW_PIDS[$s]})
      n1=$(ticks $(nginx_workers))
      p1=$(ticks $(postgres_pids))
    }
    jq -r --arg s "$s" --arg r "$r" '.phases[] | "   round \($r) \($s) \(.mode): \(.achieved_rate)/s p50 \(.latency_us.p50) µs p99 \(.latency_us.p99) µs errors \(.error_total) busy \(.machine_busy_pct)% harness cpu \(.harness_cpu_pct)%"' "$json"
    # CPU per call over the whole invocation (both phases, warm-ups and the
    # preflight call included).
    calls=$(jq '[.phases[] | .ok + .error_total + .warmup_ok + .warmup_errors] | add + 1' "$json")
    awk -v c="$calls" -v g=$((g1 - g0)) -v n=$((n1 - n0)) -v p=$((p1 - p0)) -v hz="$HZ" -v s="$s" -v r="$r" \
      'BEGIN { printf "   round %s %s CPU per call: gateway(s) %.0f µs, nginx %.0f µs, PostgreSQL (whole server) %.0f µs (%d calls)\n", r, s, g / hz / c * 1e6, n / hz / c * 1e6, p / hz / c * 1e6, c }' | tee -a "$WORK/cpu.txt"
  done
done

echo
echo "== medians over $ROUNDS rounds (latency from the intended send time, µs)"
printf '%-8s %12s %10s %10s %12s %10s %10s %8s\n' setup "full calls/s" "full p50" "full p99" "$RATE/s rate" "p50" "p99" "busy%"
for s in "${SETUPS[@]}"; do
  jq -s -r --arg s "$s" '
    def med: sort | if length == 0 then null else .[(length - 1) / 2 | floor] end;
    def ph(m): [.[] | .phases[] | select(.mode == m)];
    (ph("full")) as $f | (ph("'"$RATE"'/s")) as $r |
    [$s,
     ([$f[].achieved_rate] | med),
     ([$f[].latency_us.p50] | med), ([$f[].latency_us.p99] | med),
     ([$r[].achieved_rate] | med),
     ([$r[].latency_us.p50] | med), ([$r[].latency_us.p99] | med),
     ([$f[].machine_busy_pct] | med)] | @tsv' "$OUT_DIR"/bench-cluster-"$STAMP"-"$s"-r*.json |
    awk -F'\t' '{ printf "%-8s %12.1f %10.0f %10.0f %12.1f %10.0f %10.0f %8.0f\n", $1, $2, $3, $4, $5, $6, $7, $8 }'
done

echo
echo "== CPU per call, median over rounds of each column (µs)"
for s in "${SETUPS[@]}"; do
  for col in 1 2 3; do
    grep " $s CPU per call" "$WORK/cpu.txt" |
      sed 's/.*gateway(s) \([0-9]*\) µs, nginx \([0-9]*\) µs, PostgreSQL (whole server) \([0-9]*\) µs.*/\1 \2 \3/' |
      awk -v c="$col" '{ print $c }' | sort -n | awk '{ v[NR] = $1 } END { printf "%s ", v[int((NR + 1) / 2)] }'
  done | awk -v s="$s" '{ printf "   %-8s gateway(s) %6s   nginx %6s   PostgreSQL %6s\n", s, $1, $2, $3 }'
done

# The gateways' own view: mean ledger commit time over the whole run.
echo
echo "== ledger commits (each gateway's /metrics, whole run, warm-ups included)"
for f in "$WORK"/*.toml; do
  name=$(basename "$f" .toml)
  listen=$(sed -n 's/^listen = "\(.*\)"/\1/p' "$f")
  curl -sf "http://$listen/metrics" | awk -v n="$name" '
    $1 == "portcullis_ledger_commit_seconds_sum" { s = $2 } $1 == "portcullis_ledger_commit_seconds_count" { c = $2 }
    END { if (c > 0) printf "   %-8s %8d commits, mean %6.0f µs\n", n, c, s / c * 1e6 }'
done

if wants pg3; then
  echo
  echo "== revocation delay, replica 1 -> replica 3 of pg3 ($REV_ROUNDS rounds each)"
  for kind in token task; do
    "$LOAD" revocation --issue "http://${REPLICAS[0]}" --probe "http://${REPLICAS[2]}" \
      --agent bench-bot --bootstrap-env BENCH_SECRET --rounds "$REV_ROUNDS" --revoke "$kind" \
      --json "$OUT_DIR/bench-cluster-$STAMP-revocation-$kind.json" || rc=1
  done
fi
echo "   uptime: $(uptime)"
echo "   JSON: $OUT_DIR/bench-cluster-$STAMP-*.json"
exit "$rc"
