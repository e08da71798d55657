#!/usr/bin/env bash
# Stops what examples/cluster/start.sh started (its run directory's pid
# list): the health checker, nginx, the replicas (SIGTERM: each signs a last
# checkpoint), the demo upstream.
#
#   examples/cluster/stop.sh [--drop-db] [--clean]
#     --drop-db   also drop the example's database (CLUSTER_PG, CLUSTER_DB)
#     --clean     also remove the run directory (logs, key, configurations)
# Environment: CLUSTER_RUN_DIR, CLUSTER_PG, CLUSTER_DB as for start.sh.
set -uo pipefail

RUN_DIR="${CLUSTER_RUN_DIR:-/tmp/portcullis-cluster}"
PG="${CLUSTER_PG:-postgres://postgres@127.0.0.1:5432}"
DB="${CLUSTER_DB:-portcullis_cluster}"
drop_db=0
clean=0
for arg in "$@"; do
  case "$arg" in
    --drop-db) drop_db=1 ;;
    --clean) clean=1 ;;
    *) echo "usage: stop.sh [--drop-db] [--clean]" >&2; exit 2 ;;
  esac
done

if [[ -f "$RUN_DIR/pids" ]]; then
  # In reverse order of starting: the checker first, the upstream last.
  mapfile -t lines < <(tac "$RUN_DIR/pids")
  for line in "${lines[@]}"; do
    read -r name pid <<<"$line"
    [[ -n "${pid:-}" ]] || continue
    if [[ "$name" == nginx ]]; then
      nginx -p "$RUN_DIR/nginx" -c "$RUN_DIR/nginx/nginx.conf" -e "$RUN_DIR/nginx/error.log" -s quit 2>/dev/null \
        || kill "$pid" 2>/dev/null
    else
      kill "$pid" 2>/dev/null
    fi
    # Up to 10 s each to exit cleanly, then SIGKILL.
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "stop.sh: $name ($pid) did not exit; killing it" >&2
      kill -9 "$pid" 2>/dev/null
    fi
    echo "stopped $name"
  done
  rm -f "$RUN_DIR/pids"
else
  echo "stop.sh: no $RUN_DIR/pids: nothing to stop"
fi

if [[ $drop_db == 1 ]]; then
  psql "$PG/postgres" -q -c "DROP DATABASE IF EXISTS $DB" && echo "dropped database $DB"
fi
if [[ $clean == 1 && -d "$RUN_DIR" ]]; then
  rm -rf "$RUN_DIR" && echo "removed $RUN_DIR"
fi
