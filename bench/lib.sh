# bench/lib.sh: what bench/migrate.sh, bench/pipe.sh and bench/registry.sh share. Source it
# after `set -euo pipefail` with NAME (cluster name) and KIND (results file prefix) set.
# Sets ROOT, BIN, WISP, OUT and W (a scratch directory); checks root and the binaries;
# takes the clusters in CLUSTERS (NAME by default) down and removes W on exit; `on HOST
# SCRIPT` runs a bash script on a host of cluster NAME.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${WISP_BIN_DIR:-$ROOT/target/release}
WISP=$BIN/wisp
OUT=${BENCH_OUT:-$ROOT/bench/results/$KIND-$(date -u +%Y%m%dT%H%M%SZ).txt}
[ "$(id -u)" = 0 ] || { echo "bench/$KIND: needs root" >&2; exit 1; }
[ -x "$WISP" ] || { echo "bench/$KIND: $WISP missing: cargo build --release --bins" >&2; exit 1; }
export WISP_BIN_DIR=$BIN
mkdir -p "$(dirname "$OUT")"
W=$(mktemp -d "/var/tmp/wisp-$KIND.XXXXXX")
CLUSTERS=("$NAME")
bench_cleanup() {
    for n in "${CLUSTERS[@]}"; do "$WISP" cluster down --name "$n" >/dev/null 2>&1 || true; done
    rm -rf "$W"
}
trap bench_cleanup EXIT
on() { "$WISP" cluster exec --name "$NAME" "$1" -- bash -ec "$2"; }
