#!/usr/bin/env bash
# bench/pipe.sh: cluster pipes between two hosts beside a local pipe and a TCP connection
# between the same two hosts' namespaces, in one run: throughput (1 GiB by default, dd
# bs=64k) and round-trip latency (1-byte ping-pong, 2,000 rounds, two pipes or one socket).
#
# Run as root after scripts/deps.sh and `cargo build --release --bins`:
#     bench/pipe.sh
# Knobs: PIPE_MB (1024), PIPE_ROUNDS (2000), WISP_BIN_DIR, BENCH_OUT (default
# bench/results/pipe-<UTC time>.txt). The cluster is taken down on exit.
set -euo pipefail
NAME=pipeb KIND=pipe
. "$(dirname "$0")/lib.sh"
MB=${PIPE_MB:-1024}
ROUNDS=${PIPE_ROUNDS:-2000}
ms_since() { awk -v t0="$1" -v t1="$(date +%s%N)" 'BEGIN { printf "%.0f", (t1 - t0) / 1e6 }'; }

{
    echo "# pipe benchmark, bench/pipe.sh, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "# $(nproc) CPUs, load average at start: $(cut -d' ' -f1-3 /proc/loadavg); $MB MiB, $ROUNDS round trips"
} | tee "$OUT"
"$WISP" cluster up --name "$NAME" --workstations 2 >/dev/null
WS2=$("$WISP" cluster status --name "$NAME" 2>/dev/null | awk '$1 == "ws2" { print $3; exit }')
WS2=${WS2:-10.99.0.102}

# Python helpers: a ping-pong over two files (pipes) and over TCP.
cat >"$W/pp.py" <<'EOF'
import os, socket, sys, time
mode, n = sys.argv[1], int(sys.argv[2])
if mode == "pipe-ping":          # pipe-ping N OUT IN
    o = os.open(sys.argv[3], os.O_WRONLY); i = os.open(sys.argv[4], os.O_RDONLY)
    t = time.perf_counter()
    for _ in range(n):
        os.write(o, b"x"); assert os.read(i, 1) == b"x"
    print(f"{(time.perf_counter() - t) / n * 1e6:.0f}")
elif mode == "pipe-pong":        # pipe-pong N IN OUT
    i = os.open(sys.argv[3], os.O_RDONLY); o = os.open(sys.argv[4], os.O_WRONLY)
    for _ in range(n):
        os.write(o, os.read(i, 1))
elif mode == "tcp-pong":         # tcp-pong N PORT
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[3]))); s.listen(1); c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(n):
        c.sendall(c.recv(1))
elif mode == "tcp-ping":         # tcp-ping N HOST PORT
    for _ in range(100):
        try:
            c = socket.create_connection((sys.argv[3], int(sys.argv[4]))); break
        except OSError:
            time.sleep(0.05)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = time.perf_counter()
    for _ in range(n):
        c.sendall(b"x"); assert c.recv(1) == b"x"
    print(f"{(time.perf_counter() - t) / n * 1e6:.0f}")
elif mode == "tcp-sink":         # tcp-sink PORT: read to EOF
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(1); c, _ = s.accept()
    while c.recv(1 << 16): pass
elif mode == "dev-ping":         # dev-ping N DEV: write 1 byte to a queue device, read it back
    fd = os.open(sys.argv[3], os.O_RDWR)
    t = time.perf_counter()
    for _ in range(n):
        os.write(fd, b"x"); assert os.read(fd, 1) == b"x"
    print(f"{(time.perf_counter() - t) / n * 1e6:.0f}")
elif mode == "tcp-source":       # tcp-source MB HOST PORT
    for _ in range(100):
        try:
            c = socket.create_connection((sys.argv[3], int(sys.argv[4]))); break
        except OSError:
            time.sleep(0.05)
    buf = b"\0" * (1 << 16)
    for _ in range(n * 16):
        c.sendall(buf)
    c.close()
EOF

echo "== throughput, $MB MiB ws1 -> ws2 (local: within ws1)" | tee -a "$OUT"
t0=$(date +%s%N)
on ws1 "dd if=/dev/zero bs=64k count=$((MB * 16)) status=none | dd of=/dev/null bs=64k status=none"
local_ms=$(ms_since "$t0")
on ws1 "wisp mkpipe /wisp/bp"
t0=$(date +%s%N)
on ws2 "dd if=/wisp/bp of=/dev/null bs=64k status=none" &
r=$!
on ws1 "dd if=/dev/zero of=/wisp/bp bs=64k count=$((MB * 16)) status=none"
wait $r
cluster_ms=$(ms_since "$t0")
on ws2 "python3 $W/pp.py tcp-sink 7999" &
r=$!
t0=$(date +%s%N)
on ws1 "python3 $W/pp.py tcp-source $MB $WS2 7999"
wait $r
tcp_ms=$(ms_since "$t0")
for x in "local pipe:$local_ms" "TCP ws1->ws2:$tcp_ms" "cluster pipe ws1->ws2:$cluster_ms"; do
    printf '%-24s %8s ms  %6s MB/s\n' "${x%%:*}" "${x##*:}" "$(awk -v mb="$MB" -v ms="${x##*:}" 'BEGIN { printf "%.0f", mb * 1.048576 / (ms / 1000) }')" | tee -a "$OUT"
done

echo "== round trip, 1 byte, $ROUNDS rounds (us per round trip)" | tee -a "$OUT"
on ws1 "mkfifo $W/f1 $W/f2"
on ws1 "python3 $W/pp.py pipe-pong $ROUNDS $W/f1 $W/f2" &
r=$!
l=$(on ws1 "python3 $W/pp.py pipe-ping $ROUNDS $W/f1 $W/f2")
wait $r
on ws2 "python3 $W/pp.py tcp-pong $ROUNDS 7998" &
r=$!
t=$(on ws1 "python3 $W/pp.py tcp-ping $ROUNDS $WS2 7998")
wait $r
on ws1 "wisp mkpipe /wisp/p1 && wisp mkpipe /wisp/p2"
on ws2 "python3 $W/pp.py pipe-pong $ROUNDS /wisp/p1 /wisp/p2" &
r=$!
c=$(on ws1 "python3 $W/pp.py pipe-ping $ROUNDS /wisp/p1 /wisp/p2")
wait $r
# A pseudo-device round trip: a write and a read of one byte, from ws2, of the Python queue
# device (tests/tests/data/pdev_queue.py) served on ws1: two device operations, each
# ws2 wispd -> ws1 wispd -> device server and back.
on ws1 "setsid nohup python3 $ROOT/tests/tests/data/pdev_queue.py /wisp/q >$W/q.log 2>&1 </dev/null &"
for _ in $(seq 200); do grep -q attached "$W/q.log" 2>/dev/null && break; sleep 0.1; done
d=$(on ws2 "python3 $W/pp.py dev-ping $ROUNDS /wisp/q")
printf '%-24s %8s us\n' "local FIFO" "$l" "TCP ws1<->ws2" "$t" "cluster pipe ws1<->ws2" "$c" "device ws2->ws1 (w+r)" "$d" | tee -a "$OUT"
echo "results written to $OUT" >&2
