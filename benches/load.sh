#!/usr/bin/env bash
# Load on loopback only: h2load (Debian nghttp2-client) posts a 3-container Pod review to a
# local release server, then requests the trivial /readyz of the same TLS stack, over HTTP/2
# and over HTTP/1.1 (h2load --h1), and prints reviews/s, latency percentiles and, per
# protocol, the same-run ratio between the two (targets: 50 % over HTTP/2, 40 % over
# HTTP/1.1). Bounded by count and time.
#   benches/load.sh [REQUESTS] [CLIENTS] [STREAMS]
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-20000}
clients=${2:-8}
streams=${3:-4}
command -v h2load >/dev/null || { echo "h2load missing: apt-get install nghttp2-client" >&2; exit 1; }

cargo build --release --quiet
work=$(mktemp -d)
. benches/lib.sh
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
make_certs
port=$(( 20000 + RANDOM % 20000 ))
start_server "$port" "$work/server.log" warn --config tests/data/admission/table.yaml
pid=$server_pid
compact_review
rss() { awk -v k="$1:" '$1 == k {printf "%.1f", $2 / 1024}' "/proc/$pid/status"; }
idle=$(rss VmRSS)

run() { # name, extra h2load args...
  local name=$1; shift
  timeout 120 h2load -n "$requests" -c "$clients" -m "$streams" --log-file="$work/$name.log" "$@" \
    >"$work/$name.out" 2>&1 || true
  local rps
  rps=$(awk '/^finished in/ {print $4}' "$work/$name.out")
  local ok
  ok=$(awk '/^status codes:/ {print $3}' "$work/$name.out")
  # Per-request log: start time (µs), status, elapsed (µs).
  local pct
  pct=$(awk '{print $3}' "$work/$name.log" | sort -n | awk '{a[NR]=$1} END {
    if (NR == 0) {print "no samples"; exit}
    printf "p50 %.2f ms  p90 %.2f ms  p99 %.2f ms  max %.2f ms", a[int(NR*0.5)]/1000, a[int(NR*0.9)]/1000, a[int(NR*0.99)]/1000, a[NR]/1000 }')
  printf '%-8s %10s req/s  2xx %-7s %s\n' "$name" "$rps" "$ok" "$pct"
  echo "$rps" >"$work/$name.rps"
}
echo "h2load: $requests requests, $clients clients x $streams streams, 127.0.0.1:$port"
run review -d "$work/review.json" -H 'content-type: application/json' "https://127.0.0.1:$port/mutate"
run readyz "https://127.0.0.1:$port/readyz"
# HTTP/1.1 has one request in flight per connection: as many connections as HTTP/2 had streams.
run review-h1 --h1 -c $((clients * streams)) -m 1 -d "$work/review.json" -H 'content-type: application/json' "https://127.0.0.1:$port/mutate"
run readyz-h1 --h1 -c $((clients * streams)) -m 1 "https://127.0.0.1:$port/readyz"
# Latency at a fixed 4,000 reviews/s over HTTP/2 (8 clients x 500/s for 10 s; target p99 <= 1 ms),
# and the server's memory: idle, and its peak over the whole run (targets 20 and 48 MiB).
run fixed-4000 --rps 500 -c 8 -m 1 -n 40000 -d "$work/review.json" -H 'content-type: application/json' "https://127.0.0.1:$port/mutate"
echo "RSS: idle ${idle} MiB, after the fixed-rate run $(rss VmRSS) MiB, peak $(rss VmHWM) MiB (targets: idle 20, under load 48)"
python3 - "$work" <<'PY'
import sys
w = sys.argv[1]
def rps(n):
    try:
        return float(open(f"{w}/{n}.rps").read() or 0)
    except (OSError, ValueError):
        return 0.0
for proto, r, h, target in (("HTTP/2", "review", "readyz", 50), ("HTTP/1.1", "review-h1", "readyz-h1", 40)):
    r, h = rps(r), rps(h)
    if r and h:
        print(f"{proto}: /mutate runs at {100 * r / h:.0f} % of the rate of /readyz (target {target} %)")
PY
