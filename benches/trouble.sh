#!/usr/bin/env bash
# Mirror trouble must cost admission nothing. h2load posts a 3-container Pod review to a local
# release server in three set-ups, and prints reviews/s and latency percentiles of each:
#   always        a docker.io/** rule that swaps always (no registry is asked): the reference
#   hanging       the same rule with swap: if-present, the mirror a TCP listener that accepts
#                 connections and never answers
#   unresolvable  the embedded table (its mirror is ghcr.io) on a machine without a network
# Targets (after the first timeout, which one warm-up review takes): p99 <= 5 ms and at least
# 50 % of the always-swap throughput. Throughput is measured at full load (CLIENTS x STREAMS);
# latency at a steady RATE below it, one stream per client (at full load a 2-core machine
# queues, and p99 measures the queue), leaving out the first half second (TLS handshakes). Everything stays on loopback: the
# script re-runs itself in a network namespace of its own (unshare -n), where no name resolves.
# Bounded by count and time.
#   benches/trouble.sh [REQUESTS] [CLIENTS] [STREAMS] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-20000}
clients=${2:-16}
streams=${3:-8}
rate=${4:-4000}

if [ -z "${IMW_NETNS:-}" ]; then
  command -v h2load >/dev/null || { echo "h2load missing: apt-get install nghttp2-client" >&2; exit 1; }
  cargo build --release --quiet
  if unshare -n true 2>/dev/null; then
    exec unshare -n env IMW_NETNS=own "$0" "$@"
  fi
  echo "(no network namespace here: the unresolvable case is skipped)"
  IMW_NETNS=none
fi
[ "$IMW_NETNS" = own ] && ip link set lo up

work=$(mktemp -d)
. benches/lib.sh
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
make_certs
compact_review

# A mirror that accepts and never answers; it ends by itself.
hang_port=$(( 30000 + RANDOM % 10000 ))
python3 - "$hang_port" <<'PY' &
import socket, sys, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1024)
held = []
threading.Timer(900, lambda: __import__("os")._exit(0)).start()
while True:
    c, _ = s.accept(); held.append(c)
PY
pids+=($!)

table() { # swap policy
  cat <<EOF
mirrors:
  m: {type: repository, registry: "127.0.0.1:$hang_port", prefix: mirror, naming: preserve}
rules:
  - {name: hub, match: ["docker.io/**"], mirror: m, swap: $1, copy: off}
registries:
  "127.0.0.1:$hang_port": {insecure: true}
checks: {timeout: 1s}
EOF
}
table always >"$work/always.yaml"
table if-present >"$work/hanging.yaml"

run() { # name, extra serve args...
  local name=$1; shift
  local port=$(( 20000 + RANDOM % 10000 ))
  start_server "$port" "$work/$name.server.log" error "$@"
  local pid=$server_pid
  pids+=("$pid")
  # The first review of a troubled mirror waits for its check; this one pays for all.
  local first
  first=$(curl -sk -o /dev/null -w '%{time_total}' -H 'content-type: application/json' \
    --data-binary @"$work/review.json" "https://127.0.0.1:$port/mutate")
  local h2=(-d "$work/review.json" -H 'content-type: application/json' "https://127.0.0.1:$port/mutate")
  timeout 120 h2load -n "$requests" -c "$clients" -m "$streams" "${h2[@]}" \
    >"$work/$name.out" 2>&1 || true
  local per_client=$(( rate / clients ))
  # One stream per client: h2load paces --rps per client and would send streams in bursts.
  timeout 120 h2load -n $(( rate * 3 )) -c "$clients" -m 1 --rps="$per_client" \
    --log-file="$work/$name.log" "${h2[@]}" >"$work/$name.steady" 2>&1 || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local rps ok pct
  rps=$(awk '/^finished in/ {print $4}' "$work/$name.out")
  ok=$(awk '/^status codes:/ {print $3}' "$work/$name.out")
  # Log lines: start (µs), status, elapsed (µs). The first half second holds the handshakes.
  sort -n "$work/$name.log" | awk 'NR == 1 {t0 = $1} $1 - t0 >= 500000 {print $3}' | sort -n >"$work/$name.lat"
  pct=$(awk '{a[NR]=$1} END {
    if (NR == 0) {print "no samples"; exit}
    printf "p50 %.2f ms  p90 %.2f ms  p99 %.2f ms  max %.2f ms", a[int(NR*0.5)]/1000, a[int(NR*0.9)]/1000, a[int(NR*0.99)]/1000, a[NR]/1000 }' "$work/$name.lat")
  printf '%-13s %10s req/s  2xx %-7s first %5.3f s  at %s/s: %s\n' "$name" "$rps" "$ok" "$first" "$rate" "$pct"
  echo "$rps" >"$work/$name.rps"
  awk '{a[NR]=$1} END {print (NR ? a[int(NR*0.99)]/1000 : 999)}' "$work/$name.lat" >"$work/$name.p99"
}

echo "h2load: $requests requests, $clients clients x $streams streams; latency at $rate reviews/s; loopback (network: $IMW_NETNS namespace)"
run always --config "$work/always.yaml"
run hanging --config "$work/hanging.yaml"
cases=(hanging)
if [ "$IMW_NETNS" = own ]; then
  run unresolvable
  cases+=(unresolvable)
fi
for c in "${cases[@]}"; do
  python3 - "$work" "$c" <<'PY'
import sys
w, c = sys.argv[1], sys.argv[2]
base = float(open(f"{w}/always.rps").read() or 0)
rps = float(open(f"{w}/{c}.rps").read() or 0)
p99 = float(open(f"{w}/{c}.p99").read() or 0)
share = rps / base if base else 0
ok = p99 <= 5 and share >= 0.5
print(f"{c:<13} {share:5.0%} of always-swap throughput, p99 {p99:.2f} ms: {'meets' if ok else 'MISSES'} the target (p99 <= 5 ms, >= 50 %)")
PY
done
