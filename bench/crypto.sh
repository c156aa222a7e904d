#!/usr/bin/env bash
# bench/crypto.sh: what encryption costs the file system, with and without it in one run.
#
# Run as root after `cargo build --release --bins` (or set WISP_BIN_DIR):
#     sudo bench/crypto.sh
# One simulated cluster (srv1, ws1); wisp-server runs with
# --insecure-plaintext-for-benchmarks-only (it then ALLOWS unencrypted connections to
# clients that ask; others stay encrypted). On ws1, two mounts of the same server:
#   enc    /wisp        the normal wispd: every frame AES-256-GCM sealed
#   plain  /wisp-plain  a second wispd with --insecure-plaintext-for-benchmarks-only
# Workloads, in rounds alternating enc and plain (so other load on the machine hits both
# alike; medians reported): sequential write (dd conv=fsync), cold sequential read
# (caches dropped), small files (create + stat + unlink), make -j2 of a generated C project.
# Knobs: BENCH_NAME (crypto), BENCH_SEQ_MB (256), BENCH_FILES (1000), BENCH_NSRC (60),
# BENCH_ROUNDS (3), BENCH_OUT (bench/results/crypto-<UTC time>.txt).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=${BENCH_NAME:-crypto}
SEQ_MB=${BENCH_SEQ_MB:-256}
NFILES=${BENCH_FILES:-1000}
NSRC=${BENCH_NSRC:-60}
ROUNDS=${BENCH_ROUNDS:-3}
OUT=${BENCH_OUT:-$ROOT/bench/results/crypto-$(date -u +%Y%m%dT%H%M%SZ).txt}
BIN=${WISP_BIN_DIR:-$ROOT/target/release}

die() { echo "crypto: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root"
W=$(mktemp -d /var/tmp/wisp-crypto.XXXXXX)
LOG=$W/log
mkdir -p "$W/bin" "$(dirname "$OUT")"
for b in wisp wispd wisp-server rexec; do cp "$BIN/$b" "$W/bin/$b" || die "no $b in $BIN"; done
WISP=$W/bin/wisp
: >"$OUT"
cleanup() {
    local rc=$?
    set +e
    [ -s "$W/plain.pid" ] && kill "$(cat "$W/plain.pid")" 2>/dev/null
    "$WISP" cluster down --name "$NAME" >/dev/null 2>&1
    [ "$rc" != 0 ] && { tail -n 30 "$LOG" >&2; cp "$LOG" "$OUT.log"; }
    rm -rf "$W"
    exit "$rc"
}
trap cleanup EXIT

on() { "$WISP" cluster exec --name "$NAME" "$1" -- bash -ec "$2"; }
timed() {
    on ws1 "s=\$(date +%s%N); { $1 ; } >>$LOG 2>&1; e=\$(date +%s%N); echo \$(( (e - s) / 1000 ))" |
        awk '{ printf "%.3f", $1 / 1e6 }'
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
rec() { printf '%-32s %s\n' "$1" "$2" | tee -a "$OUT" >&2; }

{
    echo "# encryption cost, bench/crypto.sh, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "# git: $(cd "$ROOT" && git rev-parse --short HEAD)$(cd "$ROOT" && git diff --quiet || echo ' (modified)')"
    echo "# cpu: $(nproc) x $(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1); load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# seq=$SEQ_MB MiB, files=$NFILES, build=$NSRC sources make -j2, $ROUNDS rounds (medians; enc and plain alternate)"
} | tee -a "$OUT" >&2

"$WISP" cluster up --name "$NAME" --workstations 1 --server-arg=--insecure-plaintext-for-benchmarks-only >>"$LOG" 2>&1 ||
    die "cluster up failed"
SRV=10.99.0.11
PM=/wisp-plain
on ws1 "mkdir -p $PM && { $W/bin/wispd --server $SRV:7070 --mount $PM --name ws1-plain --no-agent --metrics none --input-devices none --insecure-plaintext-for-benchmarks-only >$W/plain.log 2>&1 & echo \$! >$W/plain.pid; } && for i in \$(seq 300); do grep -q ' $PM fuse' /proc/self/mounts && break; sleep 0.1; done && grep -q ' $PM fuse' /proc/self/mounts" ||
    die "the plaintext mount did not come up: $(cat "$W/plain.log" 2>/dev/null)"
grep -aqE 'plaintext.{0,16}true' "/run/wisp/$NAME/srv1.log" ||
    die "the server did not log a plaintext session"

"$ROOT/bench/gen-project.sh" "$W/proj" "$NSRC" >>"$LOG" 2>&1
tar -C "$W" -czf "$W/proj.tar.gz" proj
declare -A V
for r in $(seq "$ROUNDS"); do
    for mode in enc plain; do
        d=/wisp/enc$r
        [ $mode = plain ] && d=$PM/plain$r
        on ws1 "mkdir -p $d"
        s=$(timed "dd if=/dev/zero of=$d/big bs=1M count=$SEQ_MB conv=fsync status=none")
        V[$mode.seq_write]+="$(awk -v m="$SEQ_MB" -v s="$s" 'BEGIN { printf "%.1f", m / s }') "
        drop_caches
        s=$(timed "dd if=$d/big of=/dev/null bs=1M status=none")
        V[$mode.seq_read_cold]+="$(awk -v m="$SEQ_MB" -v s="$s" 'BEGIN { printf "%.1f", m / s }') "
        on ws1 "rm -f $d/big"
        s=$(timed "mkdir -p $d/small && cd $d/small && for i in \$(seq $NFILES); do echo x >f\$i; done && stat -c %s f* >/dev/null && rm -f f*")
        V[$mode.small_files]+="$(awk -v n="$NFILES" -v s="$s" 'BEGIN { printf "%.0f", n / s }') "
        on ws1 "tar -C $d -xzf $W/proj.tar.gz"
        s=$(timed "make -s -j2 -C $d/proj")
        V[$mode.make]+="$s "
        on ws1 "rm -rf $d"
    done
done
for m in seq_write seq_read_cold small_files make; do
    e=$(median <<<"${V[enc.$m]}")
    p=$(median <<<"${V[plain.$m]}")
    unit=MBps; [ $m = small_files ] && unit=files_per_s; [ $m = make ] && unit=s
    rec "enc.$m.$unit" "$e   (all: ${V[enc.$m]})"
    rec "plain.$m.$unit" "$p   (all: ${V[plain.$m]})"
    if [ $m = make ]; then
        rec "cost.$m" "$(awk -v e="$e" -v p="$p" 'BEGIN { printf "%+.1f %% time", (e / p - 1) * 100 }')"
    else
        rec "cost.$m" "$(awk -v e="$e" -v p="$p" 'BEGIN { printf "%+.1f %% throughput", (e / p - 1) * 100 }')"
    fi
done
echo "results in $OUT" >&2
