#!/usr/bin/env bash
# bench/migrate.sh: migration time by memory size and mode, on one simulated cluster.
#
# For each size (MiB of dirty memory in one process) and each mode (eager, lazy, pre-copy
# + lazy), a job started with `rexec --host ws2` is moved to ws3 with `wisp migrate`, which
# reports how long the job was frozen and how long the move took in all. Side by side in
# the same run: the floor for an eager flush, writing the same amount with dd to /wisp and
# to local ext4 from ws2; and a job dirtying 50 MB/s moved with pre-copy.
#
# Run as root after scripts/deps.sh and `cargo build --release --bins`:
#     bench/migrate.sh
# Knobs: MIG_SIZES ("8 64 256 1024 2048"), MIG_MODES ("eager lazy precopy"), MIG_RATE (50,
# MB/s for the pre-copy writer), WISP_BIN_DIR, BENCH_OUT (default
# bench/results/migrate-<UTC time>.txt). The cluster is taken down on exit.
set -euo pipefail
NAME=migb KIND=migrate
. "$(dirname "$0")/lib.sh"
SIZES=${MIG_SIZES:-8 64 256 1024 2048}
MODES=${MIG_MODES:-eager lazy precopy}
RATE=${MIG_RATE:-50}

{
    echo "# migration benchmark, bench/migrate.sh, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "# $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT"

"$WISP" cluster up --name "$NAME" --workstations 3 >/dev/null
"$WISP" owner --cluster "$NAME" ws2 idle >/dev/null
"$WISP" owner --cluster "$NAME" ws3 idle >/dev/null
"$WISP" owner --cluster "$NAME" ws1 active >/dev/null

# The job: fill MiB of memory with a pattern, then dirty RATE MB/s of it (0: none) until
# killed.
cat >"$W/dirty.c" <<'EOF'
#include <stdlib.h>
#include <string.h>
#include <time.h>
int main(int argc, char **argv) {
    size_t mib = strtoul(argv[1], 0, 10), rate = strtoul(argv[2], 0, 10);
    size_t len = mib << 20, at = 0;
    unsigned char *m = malloc(len);
    for (size_t i = 0; i < len; i += 4096) m[i] = (unsigned char)(i >> 12);
    struct timespec tick = {0, 100000000};
    for (unsigned n = 0;; n++) {
        for (size_t d = 0; d < (rate << 20) / 10; d += 4096) {
            m[at] = (unsigned char)n;
            at = (at + 4096) % len;
        }
        nanosleep(&tick, 0);
    }
}
EOF
on ws1 "mkdir -p /wisp/migb && gcc -O2 -o /wisp/migb/dirty $W/dirty.c"

job_id() { "$WISP" jobs --cluster "$NAME" | awk 'NR > 1 { print $1; exit }'; }
# move SIZE RATE MODE: start the job on ws2, move it to ws3, print "frozen_ms total_ms".
move() {
    local size=$1 rate=$2 mode=$3 flag= job m
    case $mode in lazy) flag=--lazy ;; precopy) flag=--precopy ;; esac
    on ws1 "cd /wisp/migb && exec rexec --host ws2 /wisp/migb/dirty $size $rate" >/dev/null 2>&1 &
    local runner=$!
    for _ in $(seq 300); do job=$(job_id); [ -n "$job" ] && break; sleep 0.1; done
    [ -n "$job" ] || { echo "bench/migrate.sh: the job did not start" >&2; exit 1; }
    sleep "$(awk -v s="$size" 'BEGIN { print 1 + s / 400 }')" # filled
    m=$("$WISP" migrate --cluster "$NAME" "$job" --to ws3 $flag)
    "$WISP" kill --cluster "$NAME" "$job" >/dev/null 2>&1 || true
    wait "$runner" 2>/dev/null || true
    for _ in $(seq 600); do [ -z "$(job_id)" ] && [ -z "$(on ws1 'ls -A /wisp/.swap 2>/dev/null')" ] && break; sleep 0.1; done
    sed -n 's/.*frozen \([0-9]*\) ms.* \([0-9]*\) ms in all.*/\1 \2/p' <<<"$m"
}

echo "== floor: writing the same bytes from ws2 (dd bs=1M conv=fsync), MB/s" | tee -a "$OUT"
for size in $SIZES; do
    w=$(on ws2 "t0=\$(date +%s%N); dd if=/dev/zero of=/wisp/migb/floor bs=1M count=$size conv=fsync status=none; t1=\$(date +%s%N); rm /wisp/migb/floor; echo \$(( $size * 1048576 * 1000 / (t1 - t0) ))")
    e=$(on ws2 "t0=\$(date +%s%N); dd if=/dev/zero of=$W/floor bs=1M count=$size conv=fsync status=none; t1=\$(date +%s%N); rm $W/floor; echo \$(( $size * 1048576 * 1000 / (t1 - t0) ))")
    printf '%-8s /wisp %6s MB/s   ext4 %6s MB/s\n' "${size}MiB" "$w" "$e" | tee -a "$OUT"
done

echo "== migration ws2 -> ws3: frozen ms / total ms" | tee -a "$OUT"
printf '%-8s' size | tee -a "$OUT"
for mode in $MODES; do printf ' %22s' "$mode" | tee -a "$OUT"; done
echo | tee -a "$OUT"
declare -A FROZEN
for size in $SIZES; do
    printf '%-8s' "${size}MiB" | tee -a "$OUT"
    for mode in $MODES; do
        read -r f t <<<"$(move "$size" 0 "$mode")"
        FROZEN[$size.$mode]=$f
        printf ' %22s' "$f / $t" | tee -a "$OUT"
    done
    echo | tee -a "$OUT"
done
read -r f t <<<"$(move 256 "$RATE" precopy)"
echo "256MiB job dirtying $RATE MB/s, pre-copy: frozen $f ms, $t ms in all" | tee -a "$OUT"
read -r f t <<<"$(move 256 "$RATE" eager)"
echo "256MiB job dirtying $RATE MB/s, eager:    frozen $f ms, $t ms in all" | tee -a "$OUT"

# A plot of the frozen time (log scale: one # per doubling from 1 ms).
echo "== frozen time, log2 scale (each # doubles it; 1 ms = one #)" | tee -a "$OUT"
for mode in $MODES; do
    for size in $SIZES; do
        f=${FROZEN[$size.$mode]:-0}
        bar=$(awk -v f="$f" 'BEGIN { n = (f > 0) ? int(log(f) / log(2)) + 1 : 0; s = ""; for (i = 0; i < n; i++) s = s "#"; print s }')
        printf '%-8s %-6s %7s ms %s\n' "$mode" "${size}M" "$f" "$bar" | tee -a "$OUT"
    done
done
echo "results written to $OUT" >&2
