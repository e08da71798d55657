#!/usr/bin/env bash
# Regenerates the console screenshots of docs/console.md from a real run:
# a `portcullis serve` with the built-in demo warehouse upstream, a real MCP
# client whose call waits for approval, and a person in headless Chromium
# (the scenario of crates/cli/tests/console_browser.py, saving a PNG of
# each page on the way).
#
#   scripts/console-screenshots.sh [OUT_DIR]    (default: docs/console)
#
# Needs chromium, chromium-driver, and the Python packages selenium and
# mcp (.ci/run installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/console}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/portcullis-target}"
cargo build --locked -q -p portcullis-cli
bin="$CARGO_TARGET_DIR/debug/portcullis"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 crates/cli/tests/console_browser.py "$bin" "$work" "$out"
ls -1 "$out"/*.png
