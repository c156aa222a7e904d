#!/usr/bin/env bash
# Build wisp and run the demo on a simulated cluster on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "error: the demo builds a simulated cluster (namespaces, FUSE): run as root" >&2; exit 1; }
scripts/deps.sh
cargo build --release --bins --locked
exec target/release/wisp demo "$@"
