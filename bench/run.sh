#!/usr/bin/env bash
# bench/run.sh: wisp against local ext4 and sshfs, side by side, on one simulated cluster.
#
# Run as root on Debian 12 after scripts/deps.sh (sshfs, openssh-server, gcc, make, perl):
#     sudo bench/run.sh
# It builds the release binaries (skip with WISP_BIN_DIR=DIR, a directory holding wisp,
# wispd, wisp-server and rexec), copies them to a private directory (so a rebuild during the
# run cannot swap them), brings up a cluster (srv1, ws1, ws2), runs sshd inside srv1 and
# mounts it with sshfs inside ws1, and runs every workload on ws1 against:
#   ext4   a directory under /var/tmp on the machine's root file system
#   sshfs  root@10.99.0.11:DIR (sshd in srv1's namespace, DIR on the same root fs)
#   wisp   /wisp (wisp-server in srv1, its data under /var/tmp/wisp/NAME, same root fs)
# Workloads: small files (create, stat, unlink), 1 GiB sequential write / cold read /
# cached re-read, and a build of a generated C project (make -j2; on wisp also make -j4
# SHELL=rexec with ws2 lent out), with wisp server RPC counts.
# Everything (mounts, sshd, the cluster, temp files) is removed on exit, also on failure.
#
# Knobs (environment): BENCH_NAME (cluster name, default bench), BENCH_FILES (10000),
# BENCH_FILE_SIZE (1024), BENCH_SEQ_MB (1024), BENCH_NSRC (200), BENCH_JOBS (2),
# BENCH_REXEC_JOBS (4), BENCH_BUILD_ROUNDS (3: the builds run in rounds, ext4, sshfs, wisp,
# wisp+rexec in each, and the median of the rounds is reported, so that load from other
# work on the machine hits all of them alike), BENCH_OUT (results file, default
# bench/results/<UTC time>.txt).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=${BENCH_NAME:-bench}
NFILES=${BENCH_FILES:-10000}
FSIZE=${BENCH_FILE_SIZE:-1024}
SEQ_MB=${BENCH_SEQ_MB:-1024}
NSRC=${BENCH_NSRC:-200}
JOBS=${BENCH_JOBS:-2}
RJOBS=${BENCH_REXEC_JOBS:-4}
ROUNDS=${BENCH_BUILD_ROUNDS:-3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${BENCH_OUT:-$ROOT/bench/results/$STAMP.txt}
SRV_IP=10.99.0.11
SSH_PORT=2222

die() { echo "bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (namespaces, FUSE mounts, drop_caches)"
for t in sshfs /usr/sbin/sshd ssh-keygen gcc make perl tar ip nsenter fusermount3; do
    command -v "$t" >/dev/null || die "$t not found: run scripts/deps.sh first"
done
[ -x /usr/lib/openssh/sftp-server ] || die "/usr/lib/openssh/sftp-server missing: apt-get install openssh-server"

W=$(mktemp -d /var/tmp/wisp-bench.XXXXXX)
LOG=$W/log
mkdir -p "$(dirname "$OUT")"
: >"$OUT"
SSHFS_MNT=$W/mnt-sshfs
CLUSTER_UP=0

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ "$CLUSTER_UP" = 1 ]; then
        # The sshfs mount lives only in ws1's mount namespace: unmount it there.
        "$WISP" cluster exec --name "$NAME" ws1 -- sh -c "grep -q ' $SSHFS_MNT fuse.sshfs' /proc/self/mounts && { fusermount3 -u $SSHFS_MNT || umount -l $SSHFS_MNT; }" >/dev/null 2>&1
        [ -s "$W/sshd.pid" ] && kill "$(cat "$W/sshd.pid")" 2>/dev/null
        [ -s "$W/nocache.pid" ] && kill "$(cat "$W/nocache.pid")" 2>/dev/null
        [ -n "${SSHD_PID:-}" ] && kill "$SSHD_PID" 2>/dev/null
        "$WISP" cluster down --name "$NAME" >/dev/null 2>&1 # kills anything left in its namespaces
    fi
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

# --- binaries ------------------------------------------------------------------------------
if [ -z "${WISP_BIN_DIR:-}" ]; then
    echo "building release binaries (cargo build --release --bins)" >&2
    (cd "$ROOT" && cargo build --release --bins) >>"$LOG" 2>&1 || die "cargo build failed (see $LOG)"
    WISP_BIN_DIR=$ROOT/target/release
fi
mkdir -p "$W/bin"
for b in wisp wispd wisp-server rexec; do cp "$WISP_BIN_DIR/$b" "$W/bin/$b" || die "no $b in $WISP_BIN_DIR"; done
WISP=$W/bin/wisp

# --- helpers -------------------------------------------------------------------------------
declare -A R # results: key -> value

rec() { R[$1]=$2; printf '%-28s %s\n' "$1" "$2" >>"$OUT"; printf '  %-28s %s\n' "$1" "$2" >&2; }
on() { "$WISP" cluster exec --name "$NAME" "$1" -- bash -ec "$2"; }
# timed HOST CMD: run CMD on HOST, print its wall time in seconds (measured on the host).
timed() {
    on "$1" "s=\$(date +%s%N); { $2 ; } >>$LOG 2>&1; e=\$(date +%s%N); echo \$(( (e - s) / 1000 ))" |
        awk '{ printf "%.3f", $1 / 1e6 }'
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# wisp server counters (asked from srv1, so ws1's mount sees no traffic): rpcs prints the
# request count, counters prints "requests callbacks bytes_read bytes_written".
counters() {
    on srv1 "wisp status --server $SRV_IP:7070 --json" |
        sed -n 's/.*"requests":\([0-9]*\).*"bytes_read":\([0-9]*\).*"bytes_written":\([0-9]*\).*"callbacks":\([0-9]*\).*/\1 \4 \2 \3/p'
}
rpcs() { counters | cut -d' ' -f1; }
mbps() { awk -v mb="$1" -v s="$2" 'BEGIN { printf "%.0f", mb / s }'; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
fmt_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'; }

# --- machine -------------------------------------------------------------------------------
{
    echo "# wisp benchmark, bench/run.sh, started $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "# git: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null)$(cd "$ROOT" && git diff --quiet 2>/dev/null || echo ' (work tree modified)')"
    echo "# binaries: $WISP_BIN_DIR ($([ "$WISP_BIN_DIR" = "$ROOT/target/release" ] && echo "built from this tree" || echo "given with WISP_BIN_DIR; not necessarily this tree"); wispd $(date -u -r "$WISP_BIN_DIR/wispd" '+%Y-%m-%d %H:%M UTC'))"
    echo "# cpu: $(nproc) x $(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1)"
    echo "# memory: $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "# kernel: $(uname -r); $(. /etc/os-release && echo "$PRETTY_NAME")"
    echo "# root fs: $(findmnt -no SOURCE,FSTYPE,OPTIONS -T /var/tmp)"
    echo "# sshfs: $(sshfs --version 2>&1 | grep -i "^sshfs" | head -1); $(ssh -V 2>&1)"
    echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg); other simulated clusters up: $(ip netns list | grep -c -- '-br' || true)"
    echo "# files=$NFILES x $FSIZE B, seq=$SEQ_MB MiB, build=$NSRC sources, make -j$JOBS, rexec make -j$RJOBS, $ROUNDS build rounds"
} | tee -a "$OUT" >&2

# --- the cluster, sshd, sshfs --------------------------------------------------------------
echo "bringing up cluster $NAME" >&2
CLUSTER_UP=1
"$WISP" cluster up --name "$NAME" --workstations 2 >>"$LOG" 2>&1 || die "cluster up failed"

mkdir -p "$W/ssh" "$W/sshfs-export" "$SSHFS_MNT" "$W/ext4"
chmod 700 "$W/ssh"
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/hostkey"
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/id"
cp "$W/ssh/id.pub" "$W/ssh/authorized_keys"
mkdir -p /run/sshd # privilege separation directory
"$WISP" cluster exec --name "$NAME" srv1 -- /usr/sbin/sshd -D -e -f /dev/null -p "$SSH_PORT" \
    -o ListenAddress="$SRV_IP" -o HostKey="$W/ssh/hostkey" -o AuthorizedKeysFile="$W/ssh/authorized_keys" \
    -o PermitRootLogin=prohibit-password -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no \
    -o UsePAM=no -o StrictModes=no -o PidFile="$W/sshd.pid" \
    -o Subsystem="sftp /usr/lib/openssh/sftp-server" >>"$W/sshd.log" 2>&1 &
SSHD_PID=$!
for _ in $(seq 100); do [ -s "$W/sshd.pid" ] && break; sleep 0.1; done
[ -s "$W/sshd.pid" ] || { cat "$W/sshd.log" >&2; die "sshd did not start"; }
# sshfs with its defaults (what a user gets), plus what a non-interactive mount needs.
on ws1 "sshfs -p $SSH_PORT -o IdentityFile=$W/ssh/id,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes root@$SRV_IP:$W/sshfs-export $SSHFS_MNT && grep -q ' $SSHFS_MNT fuse.sshfs' /proc/self/mounts" >>"$LOG" 2>&1 ||
    die "sshfs mount failed"

# rexec: ws2 lent out, ws1 (the user's own host) not, so remote jobs go to ws2.
"$WISP" owner --cluster "$NAME" ws2 idle >>"$LOG" 2>&1
"$WISP" owner --cluster "$NAME" ws1 active >>"$LOG" 2>&1
on ws1 "mkdir -p /wisp/bench"

declare -A DIR=([ext4]=$W/ext4 [sshfs]=$SSHFS_MNT [wisp]=/wisp/bench)
FSES=(ext4 sshfs wisp)

# Background request rate of the wisp server (heartbeats, the status calls themselves).
r0=$(rpcs); t0=$(date +%s%N); sleep 5; r1=$(rpcs); t1=$(date +%s%N)
BG=$(awk -v d=$((r1 - r0)) -v ns=$((t1 - t0)) 'BEGIN { printf "%.2f", d / (ns / 1e9) }')
rec wisp.background_rpc_per_s "$BG"
# Null round trip ws1 -> wisp server (the Ping of `wisp status`), best of 10.
rtt=$(on ws1 "for i in \$(seq 10); do wisp status --server $SRV_IP:7070; done" |
    sed -n 's/.*round trip \([0-9.]*\) ms.*/\1/p' | sort -n | head -1)
rec wisp.null_rpc_ms "$rtt"
net_rpcs() { awk -v d="$1" -v s="$2" -v bg="$BG" 'BEGIN { v = d - bg * s; if (v < 0) v = 0; printf "%.0f", v }'; }

# --- 1. small files ------------------------------------------------------------------------
echo "== small files: create, stat, unlink $NFILES x $FSIZE B (one process, one directory)" | tee -a "$OUT" >&2
# The server's request counter, read from ws1 between phases (not through the mount).
printf '#!/bin/sh\nwisp status --server %s:7070 --json | sed -n '"'"'s/.*"requests":\\([0-9]*\\).*"callbacks":\\([0-9]*\\).*/\\1 \\2/p'"'"'\n' "$SRV_IP" "$NAME" >"$W/rpcs.sh"
chmod +x "$W/rpcs.sh"
for fs in "${FSES[@]}"; do
    hook=
    [[ $fs == wisp* ]] && hook="SMALLFILES_HOOK=$W/rpcs.sh"
    out=$(on ws1 "$hook perl $ROOT/bench/smallfiles.pl ${DIR[$fs]}/sf $NFILES $FSIZE")
    prev= prevcb=
    while read -r what a b c; do
        if [ "$what" = hook ]; then
            if [ "$a" != start ]; then
                rec "wisp.$a.rpcs_per_file" "$(awk -v d=$((b - prev)) -v s="$secs" -v bg="$BG" -v n="$NFILES" 'BEGIN { v = (d - bg * s) / n; if (v < 0) v = 0; printf "%.2f", v }')"
                rec "wisp.$a.callbacks" "$((c - prevcb))"
            fi
            prev=$b prevcb=$c
        else
            secs=$a
            rec "$fs.$what.ops_per_s" "$b"
            rec "$fs.$what.s" "$a"
        fi
    done <<<"$out"
done

# --- 2. sequential I/O ---------------------------------------------------------------------
echo "== sequential: write $SEQ_MB MiB (dd bs=1M conv=fsync from /dev/zero), cold read, cached re-read" | tee -a "$OUT" >&2
for fs in "${FSES[@]}"; do
    f=${DIR[$fs]}/big
    s=$(timed ws1 "dd if=/dev/zero of=$f bs=1M count=$SEQ_MB conv=fsync status=none")
    rec "$fs.seq_write.MBps" "$(mbps "$SEQ_MB" "$s")"
    # MiB the wisp server sent for one read (shows whether a re-read came from the cache).
    served() { [[ $fs == wisp* ]] && rec "wisp.$1.server_MiB" "$(( ($(counters | cut -d' ' -f3) - $2) / 1048576 ))"; return 0; }
    if [ "$fs" = wisp ]; then
        # Cold on another client: ws2 never had the file; server's disk cache dropped too.
        drop_caches
        b0=$(counters | cut -d' ' -f3)
        s=$(timed ws2 "dd if=$f of=/dev/null bs=1M status=none")
        rec "wisp.seq_read_cold_ws2.MBps" "$(mbps "$SEQ_MB" "$s")"
        served seq_read_cold_ws2 "$b0"
    fi
    # Cold on ws1: drop_caches empties every page cache of this one kernel: the client's
    # (ext4, FUSE) and the server's backing files alike.
    drop_caches
    [[ $fs == wisp* ]] && b0=$(counters | cut -d' ' -f3)
    s=$(timed ws1 "dd if=$f of=/dev/null bs=1M status=none")
    rec "$fs.seq_read_cold.MBps" "$(mbps "$SEQ_MB" "$s")"
    served seq_read_cold "${b0:-0}"
    # Cached re-read, three times (a 1 GiB memory copy is at the mercy of other load): median.
    [[ $fs == wisp* ]] && b0=$(counters | cut -d' ' -f3)
    vals=
    for i in 1 2 3; do
        s=$(timed ws1 "dd if=$f of=/dev/null bs=1M status=none")
        vals+="$(mbps "$SEQ_MB" "$s") "
    done
    rec "$fs.seq_read_cached.all_MBps" "$vals"
    rec "$fs.seq_read_cached.MBps" "$(median <<<"$vals")"
    served seq_read_cached "${b0:-0}" # over the three re-reads
    on ws1 "rm -f $f"
done

# --- 3. build ------------------------------------------------------------------------------
echo "== build: unpack a generated C project ($NSRC+1 sources), make -j$JOBS, then a no-op make" | tee -a "$OUT" >&2
"$ROOT/bench/gen-project.sh" "$W/proj" "$NSRC" >>"$LOG" 2>&1
tar -C "$W" -czf "$W/proj.tar.gz" proj
build_on() { # build_on FS DIR MAKEARGS KEY ROUND
    local fs=$1 d=$2 margs=$3 key=$4.r$5 ra rb ca cb s
    s=$(timed ws1 "mkdir -p $d && tar -C $d -xzf $W/proj.tar.gz")
    rec "$fs.$key.unpack_s" "$s"
    [[ $fs == wisp* ]] && read -r ra ca _ <<<"$(counters)"
    s=$(timed ws1 "cd $d/proj && make $margs")
    [[ $fs == wisp* ]] && read -r rb cb _ <<<"$(counters)"
    rec "$fs.$key.s" "$s"
    [[ $fs == wisp* ]] && rec "$fs.$key.rpcs" "$(net_rpcs $((rb - ra)) "$s")" && rec "$fs.$key.callbacks" "$((cb - ca))"
    on ws1 "test \"\$($d/proj/prog)\" = \"$EXPECT\"" || die "$fs: the built program gives the wrong output"
    [[ $fs == wisp* ]] && ra=$(rpcs)
    s=$(timed ws1 "cd $d/proj && make $margs")
    [[ $fs == wisp* ]] && rb=$(rpcs)
    rec "$fs.$key.noop_s" "$s"
    [[ $fs == wisp* ]] && rec "$fs.$key.noop_rpcs" "$(net_rpcs $((rb - ra)) "$s")"
    on ws1 "rm -rf $d"
}
(cd "$W/proj" && make -s -j"$JOBS" >>"$LOG" 2>&1)
EXPECT=$("$W/proj/prog")
rm -rf "$W/proj"
for r in $(seq "$ROUNDS"); do
    for fs in "${FSES[@]}"; do
        build_on "$fs" "${DIR[$fs]}/b$r" "-s -j$JOBS" build "$r"
    done
    # rexec: every recipe goes through `rexec -v -c RECIPE`; -v says where each one ran.
    build_on wisp "${DIR[wisp]}/x$r" "-s -j$RJOBS SHELL=rexec .SHELLFLAGS='-v -c'" build_rexec "$r"
done
for key in ext4.build sshfs.build wisp.build wisp.build_rexec; do
    for m in unpack_s s noop_s rpcs callbacks noop_rpcs; do
        vals=
        for r in $(seq "$ROUNDS"); do vals+="${R[$key.r$r.$m]:-} "; done
        [ -n "${vals// /}" ] && rec "$key.$m" "$(median <<<"$vals")"
    done
done
# The same build with wisp's client caches off: a second mount on ws1 whose wispd caches no
# names or attributes and writes through (the kernel page cache and callbacks stay).
NC=/wisp-nocache
on ws1 "mkdir -p $NC && { wispd --server $SRV_IP:7070 --mount $NC --name ws1-nocache --no-agent --no-name-cache --writeback-delay 0 --metrics none --input-devices none >$W/nocache.log 2>&1 & echo \$! >$W/nocache.pid; } && for i in \$(seq 100); do grep -q ' $NC fuse' /proc/self/mounts && break; sleep 0.1; done && grep -q ' $NC fuse' /proc/self/mounts" ||
    die "the cache-off mount did not come up"
on ws1 "mkdir -p $NC/bench"
for r in $(seq "$ROUNDS"); do
    build_on wispnc "$NC/bench/n$r" "-s -j$JOBS" build "$r"
done
for m in s noop_s rpcs callbacks noop_rpcs; do
    vals=
    for r in $(seq "$ROUNDS"); do vals+="${R[wispnc.build.r$r.$m]:-} "; done
    [ -n "${vals// /}" ] && rec "wispnc.build.$m" "$(median <<<"$vals")"
done
kill "$(cat "$W/nocache.pid")" 2>/dev/null
rec wisp.build_rexec.jobs_on_ws2 "$(( $(grep -c 'rexec: running on ws2' "$LOG" || true) / ROUNDS ))"
rec wisp.build_rexec.jobs_local "$(( $(grep -c 'rexec: no idle host; running locally' "$LOG" || true) / ROUNDS ))"

echo "# load average at end: $(cut -d' ' -f1-3 /proc/loadavg); finished $(date -u '+%H:%M:%S UTC')" | tee -a "$OUT" >&2

# --- summary -------------------------------------------------------------------------------
{
    echo
    echo "== summary (higher is better for ops/s and MB/s, lower for seconds)"
    printf '%-26s %10s %10s %10s %11s %11s\n' workload ext4 sshfs wisp wisp/ext4 wisp/sshfs
    row() { # row LABEL KEY
        local a=${R[ext4.$2]:-} b=${R[sshfs.$2]:-} c=${R[wisp.$2]:-}
        printf '%-26s %10s %10s %10s %11s %11s\n' "$1" "${a:--}" "${b:--}" "${c:--}" \
            "$([ -n "$a" ] && [ -n "$c" ] && fmt_ratio "$c" "$a" || echo -)" \
            "$([ -n "$b" ] && [ -n "$c" ] && fmt_ratio "$c" "$b" || echo -)"
    }
    row "create (ops/s)" create.ops_per_s
    row "stat (ops/s)" stat.ops_per_s
    row "unlink (ops/s)" unlink.ops_per_s
    row "seq write (MB/s)" seq_write.MBps
    row "seq read cold (MB/s)" seq_read_cold.MBps
    row "seq read cached (MB/s)" seq_read_cached.MBps
    row "unpack (s, median)" build.unpack_s
    row "make -j$JOBS (s, median)" build.s
    row "make no-op (s, median)" build.noop_s
    echo "wisp cold read on ws2 (never cached there): ${R[wisp.seq_read_cold_ws2.MBps]} MB/s"
    echo "wisp make -j$RJOBS SHELL=rexec: ${R[wisp.build_rexec.s]} s (median of $ROUNDS; per build ${R[wisp.build_rexec.jobs_on_ws2]} recipes on ws2, ${R[wisp.build_rexec.jobs_local]} local); $(fmt_ratio "${R[wisp.build_rexec.s]}" "${R[ext4.build.s]}") x ext4 make -j$JOBS"
    echo "client caches (names, attributes, delayed writes) on vs off, make -j$JOBS: ${R[wisp.build.s]} s vs ${R[wispnc.build.s]} s; server requests ${R[wisp.build.rpcs]} vs ${R[wispnc.build.rpcs]}; no-op make ${R[wisp.build.noop_rpcs]} vs ${R[wispnc.build.noop_rpcs]}"
    echo "wisp server requests: make -j$JOBS ${R[wisp.build.rpcs]}, no-op make ${R[wisp.build.noop_rpcs]}, rexec make ${R[wisp.build_rexec.rpcs]}, per small file: create ${R[wisp.create.rpcs_per_file]}, stat ${R[wisp.stat.rpcs_per_file]}, unlink ${R[wisp.unlink.rpcs_per_file]} (background ${BG}/s subtracted); null RPC ${R[wisp.null_rpc_ms]} ms"
} | tee -a "$OUT"
echo "results written to $OUT" >&2
