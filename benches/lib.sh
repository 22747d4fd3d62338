# What the load scripts share (sourced, after `cd` to the repository and with $work set).
# Loopback only; every wait is bounded.

bin=./target/release/image-mirror-webhook

# Development certificates for localhost in $work.
make_certs() {
  "$bin" certs --out "$work" --dns localhost >/dev/null 2>&1
}

# The 3-container Pod review on one line in $work/review.json (h2load sends the file as is).
compact_review() {
  python3 -c 'import json,sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2],"w"), separators=(",",":"))' \
    tests/data/admission/pod_three_containers.json "$work/review.json"
}

# start_server PORT LOG RUST_LOG [serve flags...]: a release server on 127.0.0.1:PORT (metrics on
# PORT+1) with $work's certificates; sets server_pid and returns once /healthz answers (10 s at
# most).
start_server() {
  local port=$1 log=$2 level=$3
  shift 3
  RUST_LOG=$level "$bin" serve --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$((port + 1))" \
    --tls-cert "$work/tls.crt" --tls-key "$work/tls.key" --shutdown-delay 0s "$@" >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    curl -sk "https://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
}
