#!/usr/bin/env bash
# The whole test suite, with its own set-up: installs what the tests need
# (redis-server; Python YAML, systemd-analyze and kubectl for the deploy
# checks) when missing, then runs
# formatting, lints, every test, and the deploy/ checks.
# Usage: scripts/test.sh   (CI: .ci/run calls exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi
}

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
command -v curl >/dev/null || missing+=(curl)
# deploy/check.sh: the systemd unit and the Kubernetes manifests.
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v kubectl >/dev/null || missing+=(kubernetes-client)
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Redis tests start their own redis-server processes on free loopback
# ports; a system service is not needed.

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "==> cargo test"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --no-fail-fast
    cargo test --locked --doc
else
    cargo test --locked --no-fail-fast
fi
echo "==> deploy/ checks"
cargo build --locked --bin tollgate
target_dir="${CARGO_TARGET_DIR:-$(pwd)/target}"
TOLLGATE_BIN="$target_dir/debug/tollgate" deploy/check.sh
echo "==> all tests passed"
