#!/usr/bin/env bash
# Run wisp's whole test suite the way CI does: install dependencies, build, test.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "error: the tests build simulated clusters (namespaces, FUSE): run as root" >&2; exit 1; }
scripts/deps.sh
cargo build --release --bins --locked
# Leftovers of an interrupted run must not break this one.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^wisp-t' || true); do ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; ip netns del "$ns" 2>/dev/null || true; done
# nextest runs each test in its own process and kills one that hangs (.config/nextest.toml).
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi
cargo nextest run --release --locked --workspace --profile ci
# Every network decoder fuzzed for a bounded time (fuzz/, docs/faults.md); a crash fails.
scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
