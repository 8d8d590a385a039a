"""Compatibility matrix, stomp.py in STOMP 1.0, 1.1 and 1.2 (one matrix row
each): python matrix_stomppy.py AMQP STOMP WS.
AMQP-only scenarios map to STOMP: confirms to RECEIPTs, dead-lettering to
NACK with requeue:false on a queue declared with x-dead-letter-* SUBSCRIBE
headers, priorities to the priority header on an x-max-priority queue;
mandatory returns do not exist in STOMP (n/a)."""
import queue
import threading
import time

import stomp

from matrix_common import STOMP_PORT, NotApplicable, check, restart, run, sha, standard

HOSTS = [("127.0.0.1", STOMP_PORT)]
MAX_FRAME = 4 * 1024 * 1024


class Listener(stomp.ConnectionListener):
    def __init__(self):
        self.messages = queue.Queue()
        self.receipts = set()
        self.errors = []
        self.disconnected = threading.Event()

    def on_message(self, frame):
        self.messages.put(frame)

    def on_receipt(self, frame):
        self.receipts.add(frame.headers["receipt-id"])

    def on_error(self, frame):
        self.errors.append((frame.headers.get("message"), frame.body))

    def on_disconnected(self):
        self.disconnected.set()


def make(version, binary=False):
    kw = {"auto_decode": not binary}
    if version == "1.0":
        return stomp.Connection10(HOSTS, **kw)
    if version == "1.1":
        return stomp.Connection11(HOSTS, vhost="/", **kw)
    return stomp.Connection12(HOSTS, vhost="/", **kw)


def connect(version, binary=False):
    conn = make(version, binary)
    listener = Listener()
    conn.set_listener("l", listener)
    conn.connect("guest", "guest", wait=True)
    return conn, listener


def get(listener, timeout=5):
    try:
        return listener.messages.get(timeout=timeout)
    except queue.Empty:
        state = "disconnected" if listener.disconnected.is_set() else "connected"
        raise AssertionError(f"no MESSAGE within {timeout} s ({state}, errors {listener.errors})") from None


def nothing(listener, wait=0.3):
    try:
        f = listener.messages.get(timeout=wait)
    except queue.Empty:
        return
    raise AssertionError(f"unexpected MESSAGE {f.headers.get('destination')} {f.body!r}")


def ack(conn, version, frame):
    if version == "1.2":
        conn.ack(frame.headers["ack"])
    elif version == "1.1":
        conn.ack(frame.headers["message-id"], frame.headers["subscription"])
    else:
        conn.ack(frame.headers["message-id"])


def nack(conn, version, frame, requeue):
    h = {"requeue": "true" if requeue else "false"}
    if version == "1.2":
        conn.nack(frame.headers["ack"], **h)
    elif version == "1.1":
        conn.nack(frame.headers["message-id"], frame.headers["subscription"], **h)
    else:
        conn.send_frame("NACK", dict(h, **{"message-id": frame.headers["message-id"]}))


def wait_receipt(listener, r, timeout=5):
    deadline = time.monotonic() + timeout
    while r not in listener.receipts:
        check(time.monotonic() < deadline, f"no RECEIPT {r}")
        time.sleep(0.01)


def scenarios(v):
    tag = v.replace(".", "")

    def declare_bind():
        conn, l = connect(v)
        conn.subscribe(f"/exchange/amq.topic/sp{tag}.*.x", id="t")
        conn.subscribe(f"/exchange/amq.direct/sp{tag}-k", id="d")
        conn.subscribe(f"/queue/sp{tag}-declared", id="q", headers={"durable": "true", "auto-delete": "false"})
        conn.send(f"/topic/sp{tag}.a.x", "t", receipt="r1")
        wait_receipt(l, "r1")  # subscriptions are bound before routing
        conn.send(f"/topic/sp{tag}.a.y", "t-miss")
        conn.send(f"/exchange/amq.direct/sp{tag}-k", "d")
        conn.send(f"/exchange/amq.direct/sp{tag}-other", "d-miss")
        conn.send(f"/amq/queue/sp{tag}-declared", "q")  # the queue SUBSCRIBE declared
        got = sorted((f.headers["subscription"], f.body) for f in [get(l), get(l), get(l)])
        check(got == [("d", "d"), ("q", "q"), ("t", "t")], f"routed {got}")
        nothing(l)
        conn.disconnect()
        check(not l.errors, l.errors)

    def publish_consume_ack():
        dest = f"/queue/sp{tag}-ack"
        conn, l = connect(v)
        for i in range(10):
            conn.send(dest, f"m{i}")
        conn.subscribe(dest, id="s", ack="client-individual")
        got = [get(l) for _ in range(10)]
        check([f.body for f in got] == [f"m{i}" for i in range(10)], f"order {[f.body for f in got]}")
        for f in got[:5]:
            ack(conn, v, f)
        conn.disconnect()  # the 5 unacked go back to the queue
        conn, l = connect(v)
        conn.subscribe(dest, id="s2", ack="client-individual")
        again = [get(l) for _ in range(5)]
        check([f.body for f in again] == [f"m{i}" for i in range(5, 10)], f"redelivered {[f.body for f in again]}")
        check(all(f.headers["redelivered"] == "true" for f in again), "redelivered header")
        for f in again:
            ack(conn, v, f)
        nothing(l)
        conn.disconnect()

    def prefetch():
        dest = f"/queue/sp{tag}-prefetch"
        conn, l = connect(v)
        for i in range(6):
            conn.send(dest, str(i))
        conn.subscribe(dest, id="s", ack="client-individual", headers={"prefetch-count": "2"})
        first = [get(l), get(l)]
        nothing(l, 0.5)
        ack(conn, v, first[0])
        get(l)
        nothing(l, 0.5)
        conn.disconnect()

    def confirms():
        dest = f"/queue/sp{tag}-receipts"
        conn, l = connect(v)
        for i in range(20):
            conn.send(dest, str(i), headers={"persistent": "true"}, receipt=f"c{i}")
        for i in range(20):
            wait_receipt(l, f"c{i}")
        conn.subscribe(dest, id="s")
        check([get(l).body for _ in range(20)] == [str(i) for i in range(20)], "receipted messages")
        conn.disconnect()
        return "confirms mapped to RECEIPT frames"

    def mandatory_return():
        raise NotApplicable("STOMP has no mandatory flag or basic.return")

    def dead_letter():
        src, dlq = f"/queue/sp{tag}-src", f"/queue/sp{tag}-dlq"
        args = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"sp{tag}-dlq"}
        conn, l = connect(v)
        conn.subscribe(dlq, id="dlq")
        conn.subscribe(src, id="src", ack="client-individual", headers=args)
        conn.send(src, "dead")
        f = get(l)
        check(f.headers["subscription"] == "src", f.headers)
        nack(conn, v, f, requeue=False)
        d = get(l)
        check(d.headers["subscription"] == "dlq" and d.body == "dead", d.headers)
        check(d.headers.get("x-first-death-reason") == "rejected", f"x-first-death-reason {d.headers.get('x-first-death-reason')}")
        conn.disconnect()

    def ttl():
        dest = f"/queue/sp{tag}-exp"
        conn, l = connect(v)
        conn.send(dest, "short", headers={"expiration": "100"})
        conn.send(dest, "keep", receipt="r")
        wait_receipt(l, "r")
        time.sleep(0.8)
        conn.subscribe(dest, id="s")
        check(get(l).body == "keep", "expired message delivered")
        nothing(l)
        conn.disconnect()

    def priority():
        dest = f"/queue/sp{tag}-prio"
        args = {"x-max-priority": "10"}
        conn, l = connect(v)
        conn.subscribe(dest, id="declare", headers=args)
        conn.unsubscribe(id="declare")
        for i, p in enumerate([1, 5, 9, 0, 5]):
            conn.send(dest, f"p{p}-{i}", headers={"priority": str(p)}, receipt=f"p{i}")
        wait_receipt(l, "p4")
        conn.subscribe(dest, id="s", headers=args)
        got = [get(l).body for _ in range(5)]
        check(got == ["p9-2", "p5-1", "p5-4", "p1-0", "p0-3"], f"order {got}")
        conn.disconnect()

    def transactions():
        dest = f"/queue/sp{tag}-tx"
        conn, l = connect(v)
        conn.subscribe(dest, id="s", ack="client-individual")
        tx = conn.begin()
        conn.send(dest, "aborted", headers={"transaction": tx})
        conn.abort(tx)
        tx = conn.begin()
        conn.send(dest, "committed", headers={"transaction": tx})
        nothing(l)
        conn.commit(tx)
        check(get(l).body == "committed", "commit")
        nothing(l)
        conn.disconnect()

    def reconnect():
        dest = f"/queue/sp{tag}-durable"
        conn, l = connect(v)
        for i in range(3):
            conn.send(dest, f"s{i}", headers={"persistent": "true"}, receipt=f"s{i}")
        wait_receipt(l, "s2")
        restart()
        check(l.disconnected.wait(10), "the old connection did not notice the restart")
        t = time.monotonic()
        conn, l = connect(v)
        conn.subscribe(dest, id="s")
        got = [get(l).body for _ in range(3)]
        check(got == ["s0", "s1", "s2"], f"after restart {got}")
        conn.disconnect()
        import sys
        print(f"reconnect {v}: first 3 messages {time.monotonic() - t:.2f} s after connecting", file=sys.stderr)

    def large():
        import os
        dest = f"/queue/sp{tag}-large"
        conn, l = connect(v, binary=True)
        body = os.urandom(MAX_FRAME - 64 * 1024)
        conn.send(dest, body, headers={"content-type": "application/octet-stream"}, receipt="big")
        wait_receipt(l, "big", 20)
        conn.subscribe(dest, id="s")
        f = get(l, 20)
        check(len(f.body) == len(body) and sha(f.body) == sha(body), f"{len(f.body)} bytes, checksum differs")
        conn.disconnect()
        conn, l = connect(v, binary=True)
        try:
            conn.send(dest, os.urandom(16 * 1024 * 1024))
        except OSError:
            pass  # the broker closed the connection while the frame was still being written
        check(l.disconnected.wait(20), "the connection stayed open after a 16 MiB frame")
        how = f"ERROR {l.errors[0][0]!r}" if l.errors else "connection closed"
        return f"16 MiB frame refused ({how}), as RabbitMQ's 4 MiB stomp.max_frame_size; 3.94 MiB round-trips"

    def connections_500():
        dest = f"/queue/sp{tag}-c500"
        t = time.monotonic()
        conns = [connect(v) for _ in range(500)]
        opened = time.monotonic() - t
        for i, (c, _) in enumerate(conns):
            c.send(dest, str(i))
        c0, l0 = conns[0]
        c0.subscribe(dest, id="s")
        got = set()
        for _ in range(500):
            try:
                got.add(get(l0).body)
            except AssertionError:
                raise AssertionError(f"no MESSAGE within timeout after {len(got)} of 500") from None
        check(got == {str(i) for i in range(500)}, f"{len(got)} distinct messages")
        for c, _ in conns:
            c.disconnect()
        return f"500 opened in {opened:.1f}s"

    return standard(locals())


for version in ["1.0", "1.1", "1.2"]:
    run(f"stomp.py {version}", scenarios(version))
