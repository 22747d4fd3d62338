#!/usr/bin/env bash
# Fuzz-style property runs (tests/fuzz.rs) at full size: the reference parser, the table loader
# and the review decoder, each on arbitrary bytes and on structure-aware input, CASES cases per
# target (default 1,000,000), release build. Prints one line per target and the panics found.
# cargo-fuzz needs a nightly toolchain, which this project cannot install; the test run keeps a
# small version of the same targets.
#   scripts/fuzz.sh [CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-1000000}
cargo test --release --quiet --test fuzz --no-run
log=$(mktemp)
trap 'rm -f "$log"' EXIT
started=$(date +%s)
IMW_FUZZ_CASES=$cases cargo test --release --quiet --test fuzz -- --test-threads=2 \
  --format=pretty 2>&1 | tee "$log" | grep -E '^test ' || true
panics=$(grep -c 'panicked' "$log" || true)
echo "$cases cases per target, 6 targets, $(( $(date +%s) - started )) s: $panics panics"
grep -q '^test result: ok' "$log"
