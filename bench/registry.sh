#!/usr/bin/env bash
# bench/registry.sh: the registry under heartbeats from many simulated hosts, with 1 and
# with 3 replicas side by side in one run, and the cost of a lookup that crosses into
# another domain (file server) against one that stays in the root domain.
#
# Run as root after scripts/deps.sh and `cargo build --release --bins`:
#     bench/registry.sh
# Knobs (environment): REG_HOSTS (1000), REG_PERIOD (2, seconds between one host's
# heartbeats), REG_SECS (20), REG_STATS (5000, stats per lookup case), WISP_BIN_DIR,
# BENCH_OUT (default bench/results/registry-<UTC time>.txt).
# Each cluster is taken down on exit, also on failure.
set -euo pipefail
NAME=regb1 KIND=registry
. "$(dirname "$0")/lib.sh"
CLUSTERS=(regb1 regb3)
HOSTS=${REG_HOSTS:-1000}
PERIOD=${REG_PERIOD:-2}
SECS=${REG_SECS:-20}
NSTATS=${REG_STATS:-5000}

{
    echo "# registry benchmark, bench/registry.sh, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "# $(nproc) CPUs, load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# $HOSTS simulated hosts, one heartbeat every $PERIOD s each, for $SECS s"
} | tee "$OUT"

for replicas in 1 3; do
    name=regb$replicas
    "$WISP" cluster up --name "$name" --servers "$replicas" --workstations 1 >/dev/null
    echo "== $replicas replica(s)" | tee -a "$OUT"
    "$WISP" registry bench --cluster "$name" --hosts "$HOSTS" --period "$PERIOD" --secs "$SECS" | tee -a "$OUT"
    if [ "$replicas" = 3 ]; then
        # /home on srv2; ws1 then stats a file in each domain, names cached on ws1, and
        # once more with a fresh lookup each time (a new name per stat).
        "$WISP" domains --cluster "$name" add /home 10.99.0.12:7070 >/dev/null
        sleep 3
        lookups() { # lookups DIR: ws1 stats DIR/f NSTATS times, and NSTATS new names
            "$WISP" cluster exec --name "$name" ws1 -- bash -ec "
                mkdir -p $1 && touch $1/f
                t0=\$(date +%s%N); for i in \$(seq $NSTATS); do stat -c %i $1/f; done >/dev/null; t1=\$(date +%s%N)
                for i in \$(seq $NSTATS); do stat $1/missing\$i 2>/dev/null || true; done; t2=\$(date +%s%N)
                echo \$(( (t1 - t0) / $NSTATS / 1000 )) \$(( (t2 - t1) / $NSTATS / 1000 ))"
        }
        read -r root_hit root_miss <<<"$(lookups /wisp/rootdir)"
        read -r home_hit home_miss <<<"$(lookups /wisp/home/dir)"
        {
            echo "lookup cost per stat (us, whole stat(1) process): root domain cached $root_hit, missing name $root_miss"
            echo "lookup cost per stat (us, whole stat(1) process): across into /home cached $home_hit, missing name $home_miss"
        } | tee -a "$OUT"
    fi
    "$WISP" cluster down --name "$name" >/dev/null
done
echo "results written to $OUT" >&2
