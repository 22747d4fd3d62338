#!/usr/bin/env bash
# A flame graph of `serve` under h2load on loopback: perf (Debian linux-perf, the cpu-clock
# software event, which works where hardware counters are not exposed) samples the release
# server while h2load posts the 3-container review over TLS + HTTP/2; inferno (crates.io,
# installed under target/tools) folds the stacks and draws the SVG. Bounded by count and time.
#   benches/profile.sh [REQUESTS] [OUT.svg]
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-200000}
out=${2:-target/profile/serve.svg}
command -v h2load >/dev/null || { echo "h2load missing: apt-get install nghttp2-client" >&2; exit 1; }
command -v perf >/dev/null || { echo "perf missing: apt-get install linux-perf" >&2; exit 1; }
tools=target/tools
[ -x "$tools/bin/inferno-flamegraph" ] || cargo install --quiet --root "$tools" inferno

# Frame pointers and symbols, so that perf can walk the stacks.
RUSTFLAGS="-C force-frame-pointers=yes" CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
  cargo build --release --quiet --target-dir target/profile
bin=./target/profile/release/image-mirror-webhook
work=$(mktemp -d)
. benches/lib.sh
trap 'kill "$server_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
make_certs
compact_review
port=$(( 20000 + RANDOM % 20000 ))
start_server "$port" "$work/server.log" warn --config tests/data/admission/table.yaml
timeout 60 perf record -e cpu-clock -F 1999 -g -p "$server_pid" -o "$work/perf.data" >/dev/null 2>&1 &
perf_pid=$!
sleep 1
timeout 120 h2load -n "$requests" -c 16 -m 8 -d "$work/review.json" \
  -H 'content-type: application/json' "https://127.0.0.1:$port/mutate" | grep -E "^(finished|status codes)"
kill -INT "$perf_pid" 2>/dev/null || true
wait "$perf_pid" 2>/dev/null || true
mkdir -p "$(dirname "$out")"
perf script -i "$work/perf.data" 2>/dev/null | "$tools/bin/inferno-collapse-perf" >"$work/folded"
"$tools/bin/inferno-flamegraph" <"$work/folded" >"$out"
echo "flame graph: $out"
# The heaviest frames by own samples, for a note without a picture.
awk '{n=$NF; $NF=""; split($0, f, ";"); self[f[length(f)]] += n; total += n}
     END {for (k in self) printf "%6.2f%%  %s\n", 100*self[k]/total, k}' "$work/folded" | sort -rn | head -25
