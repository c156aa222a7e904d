# A pseudo-device server in Python, speaking wispd's local protocol (docs/pseudodev.md)
# with nothing but the standard library: a byte queue. Writes append; reads take what is
# queued, or answer EAGAIN when it is empty (wispd then blocks the caller until this server
# announces POLLIN); ioctl _IOWR('w', 1, 64) answers 42 and "host pid uid gid" of the caller.
# usage: pdev_queue.py PATH
import json, socket, sys

POLLIN, POLLOUT, EAGAIN, ENOSYS = 1, 4, 11, 38
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\0wisp-pdev")
f = s.makefile("rb")


def send(head, data=b""):
    if data:
        head["len"] = len(data)
    s.sendall(json.dumps(head).encode() + b"\n" + data)


def recv():
    line = f.readline()
    if not line:
        return None, b""
    head = json.loads(line)
    return head, f.read(head.get("len", 0))


send({"op": "attach", "path": sys.argv[1], "mode": 0o666})
head, _ = recv()
if head is None or head.get("op") != "attached":
    sys.exit(f"attach refused: {head}")
print("attached", head["dev"], flush=True)
queue = bytearray()


def ready():
    send({"op": "ready", "events": (POLLIN if queue else 0) | POLLOUT})


ready()
while True:
    head, data = recv()
    if head is None:
        break
    op, rid = head.get("op"), head.get("id", 0)
    if op == "open":
        send({"op": "reply", "id": rid})
    elif op == "read":
        if not queue:
            send({"op": "reply", "id": rid, "errno": EAGAIN})
            continue
        n = head.get("size", 0)
        out = bytes(queue[:n])
        del queue[:n]
        send({"op": "reply", "id": rid}, out)
        ready()
    elif op == "write":
        queue += data
        send({"op": "reply", "id": rid, "size": len(data)})
        ready()
    elif op == "ioctl":
        who = " ".join(str(head.get(k, 0)) for k in ("host", "pid", "uid", "gid")).encode()
        out = who[: head.get("out_size", 0)]
        send({"op": "reply", "id": rid, "result": 42}, out)
    elif op == "close":
        pass
    else:
        send({"op": "reply", "id": rid, "errno": ENOSYS})
