#!/usr/bin/env bash
# Active health checks for the cluster example's nginx (open-source nginx
# has none of its own): polls each replica's /readyz every HC_INTERVAL
# seconds, and when a replica changes state rewrites the upstream blocks in
# NGINX_DIR/upstreams.conf (a replica that is not ready is `down`) and
# reloads nginx.
#
# Usage: healthcheck.sh [--once] NGINX_DIR HOST:PORT...
#   --once   check every replica once, write upstreams.conf, exit (no reload)
#
# Environment:
#   HC_INTERVAL   seconds between rounds (default 1)
#   HC_TIMEOUT    seconds a /readyz answer may take (default 1)
#   HC_RISE       consecutive 200s before a down replica is up again (default 2)
#   HC_FALL       consecutive failures before an up replica is down (default 1)
#   HC_MAX_FAILS, HC_FAIL_TIMEOUT   nginx's passive checks per server
#                 (default 1 and 5s)
#
# A replica is up only on a 200 from /readyz: a refused connection, a
# timeout or a 503 (its ledger is unreachable) all count as failures. When
# every replica is down, nginx answers 502 to everything: the cluster fails
# closed. Each state change is logged on stdout.
set -uo pipefail

once=0
if [[ "${1:-}" == "--once" ]]; then
  once=1
  shift
fi
if [[ $# -lt 2 ]]; then
  echo "usage: healthcheck.sh [--once] NGINX_DIR HOST:PORT..." >&2
  exit 2
fi
nginx_dir=$1
shift
replicas=("$@")
interval=${HC_INTERVAL:-1}
timeout=${HC_TIMEOUT:-1}
rise=${HC_RISE:-2}
fall=${HC_FALL:-1}
max_fails=${HC_MAX_FAILS:-1}
fail_timeout=${HC_FAIL_TIMEOUT:-5s}

# Per replica: current state (1 up, 0 down) and the run of opposite results.
declare -A up streak
for r in "${replicas[@]}"; do
  up[$r]=0
  streak[$r]=0
done

ready() {
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time "$timeout" "http://$1/readyz") || true
  [[ "$code" == 200 ]]
}

servers() {
  local r
  for r in "${replicas[@]}"; do
    if [[ ${up[$r]} == 1 ]]; then
      printf '    server %s max_fails=%s fail_timeout=%s;\n' "$r" "$max_fails" "$fail_timeout"
    else
      printf '    server %s down;\n' "$r"
    fi
  done
}

write_conf() {
  local tmp="$nginx_dir/upstreams.conf.tmp"
  {
    echo "# Written by healthcheck.sh at $(date -u +%FT%TZ); do not edit."
    echo "upstream portcullis {"
    servers
    echo "    keepalive 32;"
    echo "}"
    echo "upstream portcullis_mcp {"
    echo "    hash \$http_authorization consistent;"
    servers
    echo "    keepalive 32;"
    echo "}"
    echo "upstream portcullis_console {"
    echo "    hash \$remote_addr consistent;"
    servers
    echo "    keepalive 32;"
    echo "}"
  } >"$tmp" && mv -f "$tmp" "$nginx_dir/upstreams.conf"
}

reload() {
  if ! nginx -p "$nginx_dir" -c "$nginx_dir/nginx.conf" -e "$nginx_dir/error.log" -s reload; then
    echo "healthcheck: nginx reload failed" >&2
  fi
}

# A round: returns 0 when some replica changed state.
check_all() {
  local r changed=1 ok
  for r in "${replicas[@]}"; do
    if ready "$r"; then ok=1; else ok=0; fi
    if [[ $ok == "${up[$r]}" ]]; then
      streak[$r]=0
      continue
    fi
    streak[$r]=$((streak[$r] + 1))
    local need=$fall
    [[ $ok == 1 ]] && need=$rise
    # The first round decides at once: no history to debounce.
    if [[ ${streak[$r]} -ge $need || $once == 1 || $first == 1 ]]; then
      up[$r]=$ok
      streak[$r]=0
      changed=0
      echo "$(date -u +%FT%T.%3NZ) healthcheck: $r is $([[ $ok == 1 ]] && echo up || echo down)"
    fi
  done
  return $changed
}

first=1
check_all
write_conf
if [[ $once == 1 ]]; then
  exit 0
fi
reload
first=0
trap 'exit 0' INT TERM
while sleep "$interval"; do
  if check_all; then
    write_conf
    reload
  fi
done
