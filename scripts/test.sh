#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs them all.
#   promtool       (Debian: prometheus)       checks every /metrics scrape
#   docker-registry, skopeo, htpasswd         real OCI registries for registry tests
#   kubectl                                   renders deploy/ offline (already on the machine)
#   curl                                      an independent HTTP/1.1 and HTTP/2 client
#   python3, python3-venv                     the tests pip-install their pinned Python tools
#                                             (helm-python-sdk: Helm's own SDK; moto: AWS STS
#                                             and ECR on loopback) into a venv
#                                             under target/tmp/pyenv on first use
# The Kubernetes end-to-end tests (tests/kube.rs) run when KUBEBUILDER_ASSETS names a directory
# with kube-apiserver and etcd, as envtest users expect; .ci/run sets it from
# ../shared/envtest/setup.sh. Without it they are skipped, and this script says so, once, at
# the end.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
command -v htpasswd >/dev/null 2>&1 || need+=(apache2-utils)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

kube_note=""
if [ -z "${KUBEBUILDER_ASSETS:-}" ]; then
  kube_note="Kubernetes end-to-end tests skipped: KUBEBUILDER_ASSETS is not set (export KUBEBUILDER_ASSETS=\$(../shared/envtest/setup.sh target/envtest))"
elif [ ! -x "$KUBEBUILDER_ASSETS/kube-apiserver" ] || [ ! -x "$KUBEBUILDER_ASSETS/etcd" ]; then
  kube_note="Kubernetes end-to-end tests skipped: KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS has no kube-apiserver and etcd"
fi
# The tests' Python tools (tests/tools/requirements.txt), installed while Rust builds; a test
# that finds them missing installs them itself.
venv=target/tmp/pyenv
mkdir -p target/tmp
( { [ -x "$venv/bin/python" ] || python3 -m venv "$venv"; } \
  && "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/tools/requirements.txt ) \
  >target/tmp/pip.log 2>&1 &
pip_pid=$!
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
wait "$pip_pid" || echo "pip install of tests/tools/requirements.txt failed (target/tmp/pip.log); the tests will try again"
cargo test --locked 2>&1 | tee "$log"
# One closing line for the whole run (cargo's last line is the doc-test count).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
[ -z "$kube_note" ] || echo "$kube_note"
