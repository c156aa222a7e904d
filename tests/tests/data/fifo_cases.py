"""FIFO semantics cases, run against a local FIFO (mkfifo) and a cluster pipe (wisp mkpipe);
tests/tests/pipes.rs compares the two tables line by line. Usage: fifo_cases.py MAKE DIR"""
import errno, os, signal, sys, time
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
mk, base = sys.argv[1], sys.argv[2]
n = [0]
def fresh():
    # One FIFO per case (the case runs in a child process; the parent numbers them).
    p = f"{base}/fifo{n[0]}"
    assert os.system(f"{mk} {p}") == 0
    return p
def child(f):
    pid = os.fork()
    if pid == 0:
        try:
            f()
        finally:
            os._exit(0)
    return pid
def case(name, f):
    # Each case in its own process with a deadline, so one that hangs says so and the
    # table is complete either way.
    n[0] += 1
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rd)
        signal.alarm(15)
        try:
            r = f()
        except OSError as e:
            r = "error " + errno.errorcode[e.errno]
        os.write(wr, r.encode())
        os._exit(0)
    os.close(wr)
    out = b""
    while True:
        d = os.read(rd, 4096)
        if not d:
            break
        out += d
    os.waitpid(pid, 0)
    print(f"{name}: {out.decode() or 'hung (killed after 15 s)'}", flush=True)

def data_then_eof():
    p = fresh()
    def w():
        fd = os.open(p, os.O_WRONLY); os.write(fd, b"hello"); os.close(fd)
    pid = child(w)
    r = os.open(p, os.O_RDONLY)
    a = os.read(r, 100); b = os.read(r, 100)
    os.waitpid(pid, 0)
    return f"{a!r} then {b!r}"
def epipe_after_reader_closes():
    p = fresh()
    def r():
        fd = os.open(p, os.O_RDONLY); os.close(fd)
    pid = child(r)
    w = os.open(p, os.O_WRONLY)
    os.waitpid(pid, 0)
    time.sleep(0.2)
    os.write(w, b"x")
    return "write succeeded"
def nonblock_write_open_without_reader():
    p = fresh()
    os.open(p, os.O_WRONLY | os.O_NONBLOCK)
    return "opened"
def nonblock_read_open_without_writer():
    p = fresh()
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    return f"opened, read {os.read(fd, 10)!r}"
def nonblock_read_empty_while_a_writer_holds_it():
    p = fresh()
    def w():
        fd = os.open(p, os.O_WRONLY); time.sleep(1.0); os.close(fd)
    pid = child(w)
    r = os.open(p, os.O_RDONLY)
    os.set_blocking(r, False)
    time.sleep(0.2)
    try:
        res = f"read {os.read(r, 10)!r}"
    except OSError as e:
        res = "read error " + errno.errorcode[e.errno]
    os.waitpid(pid, 0)
    return res
def eof_only_after_the_last_writer():
    p = fresh()
    def w1():
        fd = os.open(p, os.O_WRONLY); time.sleep(0.3); os.write(fd, b"a"); os.close(fd)
    def w2():
        fd = os.open(p, os.O_WRONLY); time.sleep(0.6); os.write(fd, b"b"); time.sleep(0.3); os.close(fd)
    pids = [child(w1), child(w2)]
    r = os.open(p, os.O_RDONLY)
    time.sleep(0.15)
    got = b""
    while True:
        d = os.read(r, 10)
        if not d:
            break
        got += d
    for pid in pids:
        os.waitpid(pid, 0)
    return f"{bytes(sorted(got))!r} then EOF"
def writes_up_to_pipe_buf_are_whole():
    p = fresh()
    def w():
        fd = os.open(p, os.O_WRONLY)
        for i in range(20):
            os.write(fd, bytes([65 + i]) * 4096)
        os.close(fd)
    # Our own write end keeps EOF away until both writers are done (one may finish before
    # the other opens).
    r = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    keep = os.open(p, os.O_WRONLY)
    os.set_blocking(r, True)
    pids = [child(w), child(w)]
    got = b""
    while len(got) < 2 * 20 * 4096:
        got += os.read(r, 65536)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(keep)
    runs = [got[i:i + 4096] for i in range(0, len(got), 4096)]
    whole = all(len(set(x)) == 1 and len(x) == 4096 for x in runs)
    return f"{len(got)} bytes, every 4096-byte record whole: {whole}"

for f in [data_then_eof, epipe_after_reader_closes, nonblock_write_open_without_reader,
          nonblock_read_open_without_writer, nonblock_read_empty_while_a_writer_holds_it,
          eof_only_after_the_last_writer, writes_up_to_pipe_buf_are_whole]:
    case(f.__name__, f)
