#!/usr/bin/env bash
# Starts the cluster example on loopback: the demo warehouse upstream, three
# `portcullis serve` replicas sharing one PostgreSQL ledger and ONE signing
# key, nginx in front of them, and the active health checker
# (healthcheck.sh). Everything runs from a run directory (default
# /tmp/portcullis-cluster): generated configurations, the key, logs, pid
# files, nginx's configuration. Stop it all with stop.sh.
#
#   examples/cluster/start.sh            # builds the release binary first
#   examples/cluster/stop.sh [--drop-db] [--clean]
#
# Ports (loopback): 8800 nginx, 8801-8803 replicas, 8810 the demo upstream.
#
# Environment:
#   CLUSTER_RUN_DIR    run directory (default /tmp/portcullis-cluster)
#   CLUSTER_PG         PostgreSQL server URL without a database
#                      (default postgres://postgres@127.0.0.1:5432); the
#                      user must be able to CREATE DATABASE
#   CLUSTER_DB         database name (default portcullis_cluster)
#   CLUSTER_BASE_PORT  nginx's port; replicas and upstream follow
#                      (default 8800: 8801-8803, 8810)
#   CLUSTER_NO_BUILD=1 use the portcullis binary already built
#   CLUSTER_BIN=FILE   use this portcullis binary (no build)
#   CARGO_TARGET_DIR   where cargo builds (default: the workspace's target/)
# Needs: cargo, nginx, psql, curl.
set -Eeuo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
RUN_DIR="${CLUSTER_RUN_DIR:-/tmp/portcullis-cluster}"
PG="${CLUSTER_PG:-postgres://postgres@127.0.0.1:5432}"
DB="${CLUSTER_DB:-portcullis_cluster}"
BASE="${CLUSTER_BASE_PORT:-8800}"
LB_PORT=$BASE
UP_PORT=$((BASE + 10))
REPLICAS=("127.0.0.1:$((BASE + 1))" "127.0.0.1:$((BASE + 2))" "127.0.0.1:$((BASE + 3))")

for tool in nginx psql curl; do
  command -v "$tool" >/dev/null || {
    echo "start.sh: $tool is required (nginx: apt-get install nginx-light)" >&2
    exit 2
  }
done
if [[ ! "$DB" =~ ^[a-z_][a-z0-9_]*$ ]]; then
  echo "start.sh: CLUSTER_DB must be a lowercase identifier" >&2
  exit 2
fi
if [[ -e "$RUN_DIR/pids" ]]; then
  echo "start.sh: $RUN_DIR/pids exists: the cluster is running (or was not stopped); run stop.sh" >&2
  exit 1
fi

mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
: >"$RUN_DIR/pids"
# Anything failing from here on stops what was started.
trap 'echo "start.sh: failed; stopping what was started" >&2; CLUSTER_RUN_DIR="$RUN_DIR" "$HERE/stop.sh"' ERR

# --- the binary (a private copy: a later build must not swap it under us)
if [[ -z "${CLUSTER_BIN:-}" && "${CLUSTER_NO_BUILD:-0}" != 1 ]]; then
  (cd "$ROOT" && cargo build --release --locked -p portcullis-cli)
fi
SOURCE_BIN="${CLUSTER_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}"
mkdir -p "$RUN_DIR/bin"
cp "$SOURCE_BIN" "$RUN_DIR/bin/portcullis"
BIN="$RUN_DIR/bin/portcullis"

# --- ONE signing key for every replica (kept across restarts)
if [[ ! -f "$RUN_DIR/keys/signing.ed25519" ]]; then
  "$BIN" keygen --out "$RUN_DIR/keys/signing.ed25519" >/dev/null
fi

# --- the database (the first replica creates the schema in it)
if [[ "$(psql "$PG/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]]; then
  psql "$PG/postgres" -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE $DB"
fi

# wait_http PID URL LOG: until URL answers 200; fails if PID exits or after 30 s.
wait_http() {
  local pid=$1 url=$2 log=$3
  for _ in $(seq 1 300); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "start.sh: process $pid exited; its log:" >&2
      cat "$log" >&2
      return 1
    fi
    if curl -sf -o /dev/null --max-time 1 "$url"; then return 0; fi
    sleep 0.1
  done
  echo "start.sh: $url not ready after 30 s; log:" >&2
  cat "$log" >&2
  return 1
}

# --- the upstream: the demo warehouse over Streamable HTTP, one for all replicas
"$BIN" demo-server warehouse --http "127.0.0.1:$UP_PORT" --db "$RUN_DIR/warehouse.db" \
  >"$RUN_DIR/upstream.log" 2>&1 &
echo "upstream $!" >>"$RUN_DIR/pids"
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$UP_PORT") 2>/dev/null && break
  sleep 0.1
done

# --- the replicas: this directory's portcullis.toml, each with its own listen
cp -r "$HERE/policies" "$RUN_DIR/"
n=0
for r in "${REPLICAS[@]}"; do
  n=$((n + 1))
  sed -e "s|^listen = .*|listen = \"$r\"|" \
    -e "s|^issuer = .*|issuer = \"http://127.0.0.1:$LB_PORT\"|" \
    -e "s|^url = \"postgres://.*|url = \"$PG/$DB\"|" \
    -e "s|^url = \"http://127.0.0.1:[0-9]*/mcp\"|url = \"http://127.0.0.1:$UP_PORT/mcp\"|" \
    "$HERE/portcullis.toml" >"$RUN_DIR/replica-$n.toml"
  (cd "$RUN_DIR" && exec "$BIN" serve --config "replica-$n.toml") >"$RUN_DIR/replica-$n.log" 2>&1 &
  echo "replica-$n $!" >>"$RUN_DIR/pids"
done
n=0
while read -r name pid; do
  [[ "$name" == replica-* ]] || continue
  n=$((n + 1))
  wait_http "$pid" "http://${REPLICAS[$((n - 1))]}/readyz" "$RUN_DIR/$name.log"
done <"$RUN_DIR/pids"

# --- nginx, configured in the run directory
NGINX_DIR="$RUN_DIR/nginx"
mkdir -p "$NGINX_DIR/tmp"
sed -e "s|@NGINX_DIR@|$NGINX_DIR|g" -e "s|@LISTEN@|127.0.0.1:$LB_PORT|g" \
  -e "s|@USER@|$(id -un)|g" "$HERE/nginx.conf.in" >"$NGINX_DIR/nginx.conf"
"$HERE/healthcheck.sh" --once "$NGINX_DIR" "${REPLICAS[@]}" >/dev/null
nginx -p "$NGINX_DIR" -c "$NGINX_DIR/nginx.conf" -e "$NGINX_DIR/error.log" -t -q
nginx -p "$NGINX_DIR" -c "$NGINX_DIR/nginx.conf" -e "$NGINX_DIR/error.log"
for _ in $(seq 1 50); do [[ -s "$NGINX_DIR/nginx.pid" ]] && break; sleep 0.1; done
echo "nginx $(cat "$NGINX_DIR/nginx.pid")" >>"$RUN_DIR/pids"

# --- the active health checker
"$HERE/healthcheck.sh" "$NGINX_DIR" "${REPLICAS[@]}" >"$RUN_DIR/healthcheck.log" 2>&1 &
echo "healthcheck $!" >>"$RUN_DIR/pids"
wait_http "$(cat "$NGINX_DIR/nginx.pid")" "http://127.0.0.1:$LB_PORT/readyz" "$NGINX_DIR/error.log"
trap - ERR

cat <<INFO
Portcullis cluster example running (run directory $RUN_DIR):
  load balancer (nginx)  http://127.0.0.1:$LB_PORT      (REST API, /mcp, /readyz)
  replicas               ${REPLICAS[*]/#/http://}
  demo upstream          http://127.0.0.1:$UP_PORT/mcp
  ledger                 $PG/$DB
  logs                   $RUN_DIR/*.log, $NGINX_DIR/error.log, $RUN_DIR/healthcheck.log

Start a task through the load balancer, then call a tool on any replica:
  curl -s -X POST http://127.0.0.1:$LB_PORT/v1/tasks -H 'Authorization: Bearer demo-cluster-secret' \\
    -d '{"agent_id": "ingest-bot", "goal": "try the cluster"}'
  curl -s -X POST http://${REPLICAS[1]}/v1/tasks/TASK_ID/calls -H 'Authorization: Bearer ACCESS_TOKEN' \\
    -d '{"tool": "warehouse.connect", "arguments": {"database": "sales"}}'
Audit log (any replica's configuration): $BIN audit verify --config $RUN_DIR/replica-1.toml
Stop: $HERE/stop.sh   (--drop-db also drops database $DB, --clean removes $RUN_DIR)
INFO
