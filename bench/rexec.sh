#!/usr/bin/env bash
# bench/rexec.sh: the cost of running one command elsewhere. Side by side in one run, from
# ws1: a local fork+exec of `true`, `ssh ws2 true` (sshd run in ws2's namespaces, key
# login), and `rexec --host ws2 true` (registry lease, cluster pipes for stdio, the agent's
# sandbox on ws2, exit status back).
#
# Run as root after scripts/deps.sh and `cargo build --release --bins`:
#     bench/rexec.sh
# Knobs: REXEC_N (200 runs each), WISP_BIN_DIR, BENCH_OUT (default
# bench/results/rexec-<UTC time>.txt). The cluster and sshd go away on exit.
set -euo pipefail
NAME=rexb KIND=rexec
. "$(dirname "$0")/lib.sh"
N=${REXEC_N:-200}
PORT=2223
for t in /usr/sbin/sshd ssh ssh-keygen; do
    command -v "$t" >/dev/null || { echo "bench/rexec.sh: $t missing: run scripts/deps.sh" >&2; exit 1; }
done
{
    echo "# rexec benchmark, bench/rexec.sh, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "# $(nproc) CPUs, load average at start: $(cut -d' ' -f1-3 /proc/loadavg); $N runs each; hosts share the CPUs (no pinning)"
} | tee "$OUT"
"$WISP" cluster up --name "$NAME" --workstations 2 >/dev/null
"$WISP" owner --cluster "$NAME" ws2 idle >/dev/null
WS2=10.99.0.102

mkdir -p "$W/ssh" /run/sshd
chmod 700 "$W/ssh"
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/hostkey"
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/id"
cp "$W/ssh/id.pub" "$W/ssh/authorized_keys"
"$WISP" cluster exec --name "$NAME" ws2 -- /usr/sbin/sshd -D -e -f /dev/null -p "$PORT" \
    -o ListenAddress="$WS2" -o HostKey="$W/ssh/hostkey" -o AuthorizedKeysFile="$W/ssh/authorized_keys" \
    -o PermitRootLogin=prohibit-password -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no \
    -o UsePAM=no -o StrictModes=no -o PidFile="$W/sshd.pid" >>"$W/sshd.log" 2>&1 &
for _ in $(seq 100); do [ -s "$W/sshd.pid" ] && break; sleep 0.1; done
[ -s "$W/sshd.pid" ] || { cat "$W/sshd.log" >&2; echo "bench/rexec.sh: sshd did not start" >&2; exit 1; }
stop_sshd() { kill "$(cat "$W/sshd.pid")" 2>/dev/null || true; bench_cleanup; }
trap stop_sshd EXIT
SSH="ssh -p $PORT -i $W/ssh/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR root@$WS2"

# per_run LABEL COMMAND: run COMMAND N times on ws1 (cwd /wisp/rb), print ms per run.
per_run() {
    local ms
    ms=$(on ws1 "mkdir -p /wisp/rb && cd /wisp/rb && $2 >/dev/null && t0=\$(date +%s%N) && for i in \$(seq $N); do $2 >/dev/null; done && t1=\$(date +%s%N) && awk -v t=\$((t1 - t0)) -v n=$N 'BEGIN { printf \"%.2f\", t / n / 1e6 }'")
    printf '%-34s %8s ms per run\n' "$1" "$ms" | tee -a "$OUT"
}
echo "== one command, ws1 -> ws2" | tee -a "$OUT"
per_run "local fork+exec (/bin/true)" "/bin/true"
per_run "ssh ws2 true" "$SSH true"
per_run "rexec --host ws2 true" "rexec --host ws2 true"
per_run "rexec true (registry picks ws2)" "rexec true"
echo "results written to $OUT" >&2
