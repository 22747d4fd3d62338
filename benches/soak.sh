#!/usr/bin/env bash
# Soak: REQUESTS reviews (default 1,000,000) of a 3-container Pod over HTTP/2 against a local
# release server, with the server's RSS sampled every second. Reports RSS after warm-up (the
# first WARMUP seconds), its peak and its last value after, and whether it stayed within
# +5 MiB. Loopback only; bounded by count and by time (h2load is given at most 20 minutes).
#   benches/soak.sh [REQUESTS] [CLIENTS] [STREAMS] [WARMUP]
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-1000000}
clients=${2:-8}
streams=${3:-16}
warmup=${4:-10}
command -v h2load >/dev/null || { echo "h2load missing: apt-get install nghttp2-client" >&2; exit 1; }

cargo build --release --quiet
work=$(mktemp -d)
. benches/lib.sh
trap 'kill "$pid" "$sampler" 2>/dev/null || true; rm -rf "$work"' EXIT
make_certs
port=$(( 20000 + RANDOM % 20000 ))
start_server "$port" "$work/server.log" warn --config tests/data/admission/table.yaml
pid=$server_pid
compact_review

# One RSS sample (KiB) per second while the load runs.
( while kill -0 "$pid" 2>/dev/null; do
    awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" >>"$work/rss" 2>/dev/null || true
    sleep 1
  done ) &
sampler=$!
started=$(date +%s)
timeout 1200 h2load -n "$requests" -c "$clients" -m "$streams" -d "$work/review.json" \
  -H 'content-type: application/json' "https://127.0.0.1:$port/mutate" >"$work/h2load.out" 2>&1 || true
took=$(( $(date +%s) - started ))
sleep 2
kill "$sampler" 2>/dev/null || true
grep -E '^(finished in|requests:|status codes:)' "$work/h2load.out"
python3 - "$work/rss" "$warmup" "$took" <<'PY'
import sys
rss = [int(l) for l in open(sys.argv[1]) if l.strip()]
warmup, took = int(sys.argv[2]), int(sys.argv[3])
if len(rss) <= warmup:
    print(f"only {len(rss)} samples: run longer than the {warmup} s warm-up"); sys.exit(0)
base, after = rss[warmup], rss[warmup:]
peak, last = max(after), after[-1]
growth = (peak - base) / 1024
print(f"{len(rss)} RSS samples over {took} s: {rss[0]/1024:.1f} MiB at start, {base/1024:.1f} MiB "
      f"after {warmup} s of warm-up, peak {peak/1024:.1f} MiB, last {last/1024:.1f} MiB: "
      f"+{growth:.1f} MiB after warm-up ({'flat' if growth <= 5 else 'GROWS'}: target +5 MiB)")
PY
