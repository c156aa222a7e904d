#!/usr/bin/env bash
# bench/evict.sh: how fast a workstation is given back to its owner, and what the owner
# feels meanwhile.
#
# Run as root after scripts/deps.sh (perl, python3):
#     sudo bench/evict.sh
# It builds the release binaries (skip with WISP_BIN_DIR=DIR holding wisp, wispd,
# wisp-server and rexec), copies them to a private directory, and brings up a cluster:
# srv1; ws1 (a home of jobs, its owner active, so it is never lent out), ws2 (the host
# whose owner comes back), ws3 and ws4 (idle: the registry may hand them out; also homes).
# For each N in BENCH_EVICT_JOBS (default "1 4 16"), BENCH_EVICT_ROUNDS times (default 3):
#   1. N jobs of BENCH_EVICT_MIB MiB each (default 64; python3, one bytearray of non-zero
#      bytes, then asleep) are started from ws1, ws3 and ws4 in turn with
#      `rexec --host ws2`, and the script
#      waits until ws2's agent reports each one resident.
#   2. Baseline: the owner's benchmark runs on ws2 with the N jobs there and no eviction.
#   3. Eviction: a probe writes ws2's owner override file (`active`: the owner is back) at
#      time 0 and watches, every 2 ms, the processes of ws2's jobs (every process in a job
#      sandbox under ws2's wispd, frozen copies included); the eviction time is when the
#      last one is gone. The owner's benchmark starts on ws2 at the same moment.
#   4. Checks that every job runs on another host (`wisp ps`), notes where they went and
#      the agent's own figure (log line `eviction done ... total_ms`), kills the jobs and
#      makes ws2 idle again.
# BENCH_WISPD_ARGS gives every wispd more arguments (e.g. "--preflush 1": then step 1
# also waits until ws2's agent has written each job's memory to its swap file).
# The owner's benchmark is BENCH_OWNER (default: a perl loop of about 1 s of CPU). Its
# slowdown is its time during eviction over its baseline time, per round.
# Caveat: every simulated host shares this machine's CPUs, so the slowdown also contains
# the targets' work (rebuilding the jobs, paging their memory in), which a real cluster
# does on other machines.
# Results (medians of the rounds) go to BENCH_OUT (default bench/results/evict-<UTC>.txt).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=${BENCH_NAME:-bevict}
SIZES=${BENCH_EVICT_JOBS:-1 4 16}
MIB=${BENCH_EVICT_MIB:-64}
ROUNDS=${BENCH_EVICT_ROUNDS:-3}
WISPD_ARGS=${BENCH_WISPD_ARGS:-} # e.g. "--preflush 1": extra wispd arguments
OWNER_BENCH_DEFAULT='perl -e '"'"'my $s = 0; for my $i (1 .. 40_000_000) { $s += $i % 7 } print "$s\n"'"'"
OWNER_BENCH=${BENCH_OWNER:-$OWNER_BENCH_DEFAULT}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${BENCH_OUT:-$ROOT/bench/results/evict-$STAMP.txt}

die() { echo "bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (namespaces, FUSE mounts)"
for t in perl python3 ip nsenter; do command -v "$t" >/dev/null || die "$t not found: run scripts/deps.sh first"; done

W=$(mktemp -d /var/tmp/wisp-bench-evict.XXXXXX)
LOG=$W/log
mkdir -p "$(dirname "$OUT")"
: >"$OUT"
CLUSTER_UP=0
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [ "$CLUSTER_UP" = 1 ] && "$WISP" cluster down --name "$NAME" >/dev/null 2>&1
    if [ "$rc" != 0 ]; then
        echo "bench: FAILED (exit $rc); last lines of the log:" >&2
        tail -n 30 "$LOG" >&2 2>/dev/null
        cp "$LOG" "$OUT.log" 2>/dev/null && echo "bench: full log in $OUT.log" >&2
    fi
    rm -rf "$W"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -z "${WISP_BIN_DIR:-}" ]; then
    echo "building release binaries (cargo build --release --bins)" >&2
    (cd "$ROOT" && cargo build --release --bins) >>"$LOG" 2>&1 || die "cargo build failed (see $LOG)"
    WISP_BIN_DIR=$ROOT/target/release
fi
mkdir -p "$W/bin"
for b in wisp wispd wisp-server rexec; do cp "$WISP_BIN_DIR/$b" "$W/bin/$b" || die "no $b in $WISP_BIN_DIR"; done
WISP=$W/bin/wisp
export WISP_BIN_DIR=$W/bin

on() { "$WISP" cluster exec --name "$NAME" "$1" -- bash -ec "$2"; }
w() { "$WISP" "$@" --cluster "$NAME"; }
# timed HOST CMD: wall time of CMD on HOST, in seconds.
timed() {
    on "$1" "s=\$(date +%s%N); { $2 ; } >/dev/null 2>&1; e=\$(date +%s%N); echo \$(( (e - s) / 1000 ))" |
        awk '{ printf "%.3f", $1 / 1e6 }'
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
rec() { printf '%-40s %s\n' "$1" "$2" | tee -a "$OUT" >&2; }

# The probe: time from writing the owner file to the last job process of ws2 gone.
cat >"$W/probe.py" <<'EOF'
import json, os, sys, time
name, host = sys.argv[1], sys.argv[2]
state = json.load(open(f"/run/wisp/{name}/state.json"))
daemon = next(h["daemon"] for h in state["hosts"] if h["name"] == host)
owner = f"/run/wisp/{name}/owner/{host}"
def ns(p):
    try:
        return os.readlink(f"/proc/{p}/ns/pid")
    except OSError:
        return None
def ppid(p):
    try:
        s = open(f"/proc/{p}/stat").read()
        return int(s[s.rfind(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None
home = ns(daemon)
procs = []
for e in os.listdir("/proc"):
    if not e.isdigit():
        continue
    p = int(e)
    if ns(p) in (None, home):
        continue
    q = p
    for _ in range(64):
        pp = ppid(q)
        if pp == daemon:
            procs.append(p)
            break
        if pp is None or pp <= 1:
            break
        q = pp
t0 = time.monotonic()
with open(owner + ".tmp", "w") as f:
    f.write("active\n")
os.rename(owner + ".tmp", owner)
# Only these can be on the host now: nothing new arrives while the owner is active.
while procs:
    procs = [p for p in procs if os.path.exists(f"/proc/{p}")]
    if time.monotonic() - t0 > 300:
        sys.exit(f"still {len(procs)} processes after 300 s")
    time.sleep(0.002)
print(f"{(time.monotonic() - t0) * 1000:.0f}")
EOF

{
    echo "# wisp eviction benchmark, bench/evict.sh, started $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "# git: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null)$(cd "$ROOT" && git diff --quiet 2>/dev/null || echo ' (work tree modified)')"
    echo "# cpu: $(nproc) x $(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1); memory $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# jobs: $SIZES x $MIB MiB, $ROUNDS rounds; owner benchmark: $OWNER_BENCH"
    echo "# wispd extra arguments: ${WISPD_ARGS:-none}"
} | tee -a "$OUT" >&2

echo "bringing up cluster $NAME" >&2
CLUSTER_UP=1
up_args=()
for a in $WISPD_ARGS; do up_args+=("--wispd-arg=$a"); done
"$WISP" cluster up --name "$NAME" --workstations 4 "${up_args[@]}" >>"$LOG" 2>&1 || die "cluster up failed"
WS2LOG=/run/wisp/$NAME/ws2.log
# Distinct jobs ws2's agent has pre-flushed (--preflush) so far.
flushed() { sed 's/\x1b\[[0-9;]*m//g' "$WS2LOG" | { grep 'pre-flushed:' || true; } | sed -n 's/.*job=\([0-9]*\).*/\1/p' | sort -u | wc -l; }
# Leases of eviction targets expire quickly, so every round finds ws3 and ws4 free again.
w registry policy --lease-ttl 2 >>"$LOG"
w owner ws1 active >>"$LOG"
for h in ws2 ws3 ws4; do w owner "$h" idle >>"$LOG"; done
on ws1 "mkdir -p /wisp/be"
# One object of MIB MiB of non-zero bytes (python3 ~10 MiB more; perl's `x` would keep a
# second copy).
JOB="python3 -c 'import time; b = bytearray(b\"y\") * ($MIB << 20); time.sleep(1e6)'"

for n in $SIZES; do
    base=() during=() evict=() agent=() ratio=()
    for r in $(seq "$ROUNDS"); do
        # 1. N jobs on ws2, resident (and, with --preflush, written to their swap files).
        pre0=$(flushed)
        # Started from ws1, ws3 and ws4 in turn: one host's rexecs each hold FUSE threads
        # blocked on their jobs' output pipes, and wispd has 16.
        runners=()
        i=0
        for h in ws1 ws3 ws4; do
            i=$((i + 1)) k=$(( (n + 3 - i) / 3 )) # this host's share of the n jobs
            [ "$k" -gt 0 ] || continue
            on "$h" "cd /wisp/be && for i in \$(seq $k); do rexec --host ws2 $JOB >/dev/null 2>&1 & done; wait" >>"$LOG" 2>&1 &
            runners+=($!)
        done
        for _ in $(seq 600); do
            k=$(w ps | awk -v m="$MIB" '$4 == "ws2" && $7 + 0 >= m' | wc -l)
            [ "$k" -ge "$n" ] && break
            sleep 0.2
        done
        [ "$k" -ge "$n" ] || die "only $k of $n jobs became resident on ws2"
        case " $WISPD_ARGS " in
        *" --preflush "*)
            # Every job of this round written once.
            for _ in $(seq 600); do [ $(( $(flushed) - pre0 )) -ge "$n" ] && break; sleep 0.2; done
            [ $(( $(flushed) - pre0 )) -ge "$n" ] || die "jobs not pre-flushed"
            ;;
        esac
        sleep 1
        # 2. Baseline.
        base+=("$(timed ws2 "$OWNER_BENCH")")
        # 3. Eviction, and the owner's benchmark at the same moment.
        python3 "$W/probe.py" "$NAME" ws2 >"$W/probe.out" 2>>"$LOG" &
        probe=$!
        during+=("$(timed ws2 "$OWNER_BENCH")")
        wait "$probe" || die "probe failed: $(cat "$W/probe.out")"
        evict+=("$(cat "$W/probe.out")")
        # 4. Where they went; the agent's own figure; clean up.
        ps=$(w ps)
        left=$(echo "$ps" | awk '$4 == "ws2"' | wc -l)
        moved=$(echo "$ps" | awk 'NR > 1 && $4 != "ws2" && $5 == "running"' | wc -l)
        [ "$left" = 0 ] && [ "$moved" = "$n" ] || die "after eviction: $left jobs on ws2, $moved running elsewhere:\n$ps"
        where=$(echo "$ps" | awk 'NR > 1 { print $4 }' | sort | uniq -c | awk '{ printf "%s%s:%s", sep, $2, $1; sep = "," }')
        a=$(sed 's/\x1b\[[0-9;]*m//g' "$WS2LOG" | grep 'eviction done' | tail -1 | sed -n 's/.*total_ms=\([0-9]*\).*/\1/p')
        w events -n "$n" | sed "s/^/#   N=$n round $r: /" >>"$OUT"
        agent+=("${a:-0}")
        ratio+=("$(awk -v a="${during[-1]}" -v b="${base[-1]}" 'BEGIN { printf "%.2f", a / b }')")
        echo "N=$n round $r: evicted in ${evict[-1]} ms (agent ${a:-?} ms) to $where; owner bench ${base[-1]} s -> ${during[-1]} s" >&2
        for id in $(echo "$ps" | awk 'NR > 1 { print $1 }'); do w kill -9 "$id" >>"$LOG" 2>&1 || true; done
        wait "${runners[@]}" 2>/dev/null || true
        w owner ws2 idle >>"$LOG"
        sleep 3 # the leases of this round's targets expire
    done
    rec "evict $n x $MIB MiB, ms" "$(echo "${evict[*]}" | median) (rounds: ${evict[*]}; agent: ${agent[*]})"
    rec "owner bench, $n jobs, no eviction, s" "$(echo "${base[*]}" | median) (rounds: ${base[*]})"
    rec "owner bench, $n jobs, during eviction, s" "$(echo "${during[*]}" | median) (rounds: ${during[*]})"
    rec "owner slowdown, $n jobs (median of rounds)" "$(echo "${ratio[*]}" | median) (rounds: ${ratio[*]})"
done
# ws2's agent on pre-flushing and evicting, for the record.
sed 's/\x1b\[[0-9;]*m//g' "$WS2LOG" | grep -E 'pre-flush|eviction done|evicting' >"$OUT.ws2.log" || true
echo "results in $OUT (ws2's agent: $OUT.ws2.log)" >&2
