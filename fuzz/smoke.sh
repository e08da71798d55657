#!/usr/bin/env bash
# Fuzz smoke for CI: builds the cargo-fuzz targets on the stable toolchain
# (RUSTC_BOOTSTRAP=1 lets it accept the -Zsanitizer=address that cargo-fuzz
# passes) and runs each target for SMOKE_SECONDS on a copy of the committed
# seed corpus. Any crash, panic, failed property, leak or timeout fails the
# run; so does a missing cargo-fuzz that cannot be installed.
# See docs/fuzzing.md.
#
# Environment:
#   PORTCULLIS_FUZZ_TARGET_DIR  build folder (default /var/tmp/portcullis-fuzz-target);
#                               kept apart from the workspace's, whose cache the
#                               sanitizer flags would otherwise invalidate
#   SMOKE_SECONDS               seconds per target (default 20)
#   SMOKE_SANITIZER             address (default) or none: about 4x the
#                               executions, no leak or memory-error checks;
#                               give it its own PORTCULLIS_FUZZ_TARGET_DIR
set -euo pipefail
# cargo-fuzz finds its project as fuzz/ under the repository root.
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
SMOKE_SECONDS="${SMOKE_SECONDS:-20}"
SMOKE_SANITIZER="${SMOKE_SANITIZER:-address}"
export CARGO_TARGET_DIR="${PORTCULLIS_FUZZ_TARGET_DIR:-/var/tmp/portcullis-fuzz-target}"
export RUSTC_BOOTSTRAP=1
# The workspace's RUSTFLAGS (if any) must not leak into the sanitizer build.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS

fail() {
  printf 'fuzz smoke FAILED: %s\n' "$*" >&2
  exit 1
}

installed_version() {
  cargo fuzz --version 2>/dev/null | awk '{print $2}'
}
if [ "$(installed_version)" != "$CARGO_FUZZ_VERSION" ]; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  # Its own build folder: cargo install must not share the sanitizer one.
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR}-install" \
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" \
    || fail "could not install cargo-fuzz $CARGO_FUZZ_VERSION"
  hash -r
  [ "$(installed_version)" = "$CARGO_FUZZ_VERSION" ] \
    || fail "cargo-fuzz $CARGO_FUZZ_VERSION is not on PATH after installing it"
fi
cargo fuzz --version

# cargo fuzz has no --locked: check the committed fuzz/Cargo.lock first (it
# goes stale when a crate the targets use gains a dependency).
cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null \
  || fail "fuzz/Cargo.lock is out of date: run 'cargo update --manifest-path fuzz/Cargo.toml --workspace' and commit it"

# Not a workspace member, so `cargo fmt --all` does not see it.
cargo fmt --manifest-path fuzz/Cargo.toml -- --check \
  || fail "fuzz/ is not formatted: run 'cargo fmt --manifest-path fuzz/Cargo.toml'"

listed="$(cargo fuzz list)" || fail "cargo fuzz list failed"
mapfile -t targets <<<"$listed"
[ -n "$listed" ] || fail "cargo fuzz list found no targets"

# -a: debug assertions and overflow checks on, as in the test suite.
cargo fuzz build -a -s "$SMOKE_SANITIZER" \
  || fail "cargo fuzz build failed (needs a C++ compiler for libFuzzer)"

work="$(mktemp -d "${TMPDIR:-/tmp}/portcullis-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

for t in "${targets[@]}"; do
  [ -d "fuzz/corpus/$t" ] || fail "no seed corpus at fuzz/corpus/$t"
  mkdir -p "$work/corpus/$t" "$work/artifacts/$t"
  # Runs grow a copy of the seeds, never the committed folder.
  cp fuzz/corpus/"$t"/* "$work/corpus/$t/"
  # A target's own dictionary (fuzz/<target>.dict) if it has one.
  dict="$PWD/fuzz/$t.dict"
  [ -f "$dict" ] || dict="$PWD/fuzz/mcp.dict"
  echo "-- $t: ${SMOKE_SECONDS} s"
  if ! cargo fuzz run -a -s "$SMOKE_SANITIZER" "$t" "$work/corpus/$t" -- \
      -dict="$dict" \
      -max_total_time="$SMOKE_SECONDS" \
      -timeout=10 \
      -rss_limit_mb=2048 \
      -artifact_prefix="$work/artifacts/$t/" \
      -print_final_stats=1 >"$work/$t.log" 2>&1; then
    tail -n 60 "$work/$t.log" >&2
    for a in "$work/artifacts/$t"/*; do
      [ -f "$a" ] || continue
      mkdir -p fuzz/artifacts/"$t"
      cp "$a" fuzz/artifacts/"$t"/
      echo "crashing input kept at fuzz/artifacts/$t/$(basename "$a"); replay with:" >&2
      echo "  RUSTC_BOOTSTRAP=1 cargo fuzz run -a -s $SMOKE_SANITIZER $t fuzz/artifacts/$t/$(basename "$a")" >&2
      base64 -w0 "$a" >&2
      echo >&2
    done
    fail "$t"
  fi
  grep -E '^#[0-9]+[[:space:]]+DONE|stat::(number_of_executed_units|average_exec_per_sec)' "$work/$t.log" || true
done
echo "fuzz smoke passed: ${targets[*]}"
