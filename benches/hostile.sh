#!/usr/bin/env bash
# Hostile callers on loopback: any Pod in the cluster can reach /mutate, so a flood of 3 MiB
# junk reviews must neither grow the server past its memory limit nor go unanswered. Sends
# ROUNDS x PARALLEL bodies (five junk shapes, just under the 3 MiB limit), PARALLEL at a time,
# over HTTP/2 and HTTP/1.1, while ordinary reviews go on beside them; then prints the peak RSS
# (VmHWM), the RSS after, and the answers by status. Bounded by count and time.
#   benches/hostile.sh [ROUNDS] [PARALLEL]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-4}
parallel=${2:-16}

cargo build --release --quiet
work=$(mktemp -d)
. benches/lib.sh
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
make_certs
port=$(( 20000 + RANDOM % 20000 ))
start_server "$port" "$work/server.log" warn --config tests/data/admission/table.yaml
pid=$server_pid
compact_review
rss() { awk -v k="$1" '$1 == k {print $2}' "/proc/$pid/status"; }
idle=$(rss VmRSS:)

# The junk a forged review can carry, each just under the body limit.
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
review = json.load(open("tests/data/admission/pod_plain.json"))
size = 3 * 1024 * 1024 - 1024
shapes = {
    "zeros": ("containers", "0"),
    "empty-objects": ("containers", "{}"),
    "containers": ("initContainers", '{"name":"c","image":"nginx:1.27"}'),
    "pull-secrets": ("imagePullSecrets", '{"name":"s"}'),
    "nested": ("volumes", "[" * 100 + "1" + "]" * 100),
}
for name, (key, item) in shapes.items():
    review["request"]["uid"] = "hostile-" + name
    review["request"]["object"]["spec"][key] = "__HOSTILE__"
    text = json.dumps(review, separators=(",", ":"))
    room = size - len(text)
    n = max(1, room // (len(item) + 1))
    body = text.replace('"__HOSTILE__"', "[" + ",".join([item] * n) + "]", 1)
    open(f"{work}/{name}.json", "w").write(body)
    del review["request"]["object"]["spec"][key]
PY

flood() { # curl's protocol flag; prints one status per request
  local protocol=$1 args=() i=0
  for _ in $(seq "$rounds"); do
    for shape in zeros empty-objects containers pull-secrets nested; do
      for _ in $(seq $(( (parallel + 4) / 5 ))); do
        args+=(--next "$protocol" -sk -o /dev/null -w '%{http_code}\n' --max-time 60
          -H 'content-type: application/json' --data-binary "@$work/$shape.json"
          "https://127.0.0.1:$port/mutate")
        i=$((i + 1))
      done
    done
  done
  timeout 300 curl --no-progress-meter --parallel --parallel-max "$parallel" "${args[@]:1}" || true
}
ordinary() { # ordinary reviews beside the flood; prints one status each
  for _ in $(seq 50); do
    curl -sk -o /dev/null -w '%{http_code}\n' --max-time 10 -H 'content-type: application/json' \
      --data-binary "@$work/review.json" "https://127.0.0.1:$port/mutate" || echo "000"
  done
}

for protocol in --http2 --http1.1; do
  ordinary >"$work/ordinary$protocol" &
  beside=$!
  flood "$protocol" >"$work/hostile$protocol"
  wait "$beside"
done
peak=$(rss VmHWM:)
after=$(rss VmRSS:)
printf 'serve RSS: idle %.1f MiB, peak %.1f MiB, after %.1f MiB\n' \
  "$(echo "$idle / 1024" | bc -l)" "$(echo "$peak / 1024" | bc -l)" "$(echo "$after / 1024" | bc -l)"
for protocol in --http2 --http1.1; do
  printf 'hostile %-8s answers: %s\n' "${protocol#--}" \
    "$(sort "$work/hostile$protocol" | uniq -c | awk '{printf "%s×%s ", $2, $1}')"
  printf 'ordinary %-7s answers: %s\n' "${protocol#--}" \
    "$(sort "$work/ordinary$protocol" | uniq -c | awk '{printf "%s×%s ", $2, $1}')"
done
kill -0 "$pid" 2>/dev/null && echo "serve is still up" || echo "serve died"
