# Exercises a stream file (a pseudo-device or a cluster pipe) the way programs use one:
# O_NONBLOCK (EAGAIN), poll, select and epoll waking when another process writes, and a
# blocking read; with "ioctl", also the queue device's ioctl. Prints one line per case.
# usage: stream_client.py PATH [ioctl]
import errno, fcntl, os, select, sys, threading, time

dev = sys.argv[1]


def say(*a):
    print(*a, flush=True)


def later(data, delay=0.3):
    def go():
        time.sleep(delay)
        w = os.open(dev, os.O_WRONLY)
        os.write(w, data)
        os.close(w)
    t = threading.Thread(target=go)
    t.start()
    return t


fd = os.open(dev, os.O_RDWR | os.O_NONBLOCK)
try:
    say("nonblock_read:", os.read(fd, 10))
except BlockingIOError:
    say("nonblock_read: EAGAIN")
p = select.poll()
p.register(fd, select.POLLIN)
say("poll_empty:", p.poll(200) == [])
t = later(b"poll")
r = p.poll(60000)
say("poll_wakes:", bool(r and r[0][1] & select.POLLIN), os.read(fd, 100))
t.join()
t = later(b"select")
r, _, _ = select.select([fd], [], [], 60)
say("select_wakes:", r == [fd], os.read(fd, 100))
t.join()
ep = select.epoll()
ep.register(fd, select.EPOLLIN)
t = later(b"epoll")
ev = ep.poll(60)
say("epoll_wakes:", bool(ev), os.read(fd, 100))
t.join()
_, w, _ = select.select([], [fd], [], 60)
say("writable:", w == [fd])
b = os.open(dev, os.O_RDONLY)
t = later(b"block")
say("blocking_read:", os.read(b, 100))
t.join()
if sys.argv[2:] == ["ioctl"]:
    buf = bytearray(64)
    IOWR = (3 << 30) | (64 << 16) | (ord("w") << 8) | 1
    res = fcntl.ioctl(fd, IOWR, buf, True)
    say("ioctl:", res, buf.rstrip(b"\0").decode(), os.getpid())
