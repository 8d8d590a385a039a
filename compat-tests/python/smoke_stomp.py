"""stomp.py against a running broker's STOMP port, in STOMP 1.0, 1.1 and 1.2:
send/subscribe, client-individual ACK and NACK, transactions, topics.
python smoke_stomp.py STOMP_PORT."""
import queue
import sys

import stomp

port = int(sys.argv[1])


class Listener(stomp.ConnectionListener):
    def __init__(self):
        self.messages = queue.Queue()
        self.errors = []

    def on_message(self, frame):
        self.messages.put(frame)

    def on_error(self, frame):
        self.errors.append((frame.headers, frame.body))


def get(listener):
    return listener.messages.get(timeout=10)


def nothing(listener, wait=0.3):
    try:
        frame = listener.messages.get(timeout=wait)
    except queue.Empty:
        return
    sys.exit(f"unexpected message {frame.headers} {frame.body!r}")


def connect(version):
    hosts = [("127.0.0.1", port)]
    if version == "1.0":
        conn = stomp.Connection10(hosts)
    elif version == "1.1":
        # vhost: stomp.py sends the host name otherwise, which is not a vhost (as with RabbitMQ).
        conn = stomp.Connection11(hosts, vhost="/")
    else:
        conn = stomp.Connection12(hosts, vhost="/", heartbeats=(1000, 1000))
    listener = Listener()
    conn.set_listener("l", listener)
    conn.connect("guest", "guest", wait=True)
    return conn, listener


def ack(conn, version, frame, **kw):
    if version == "1.2":
        conn.ack(frame.headers["ack"], **kw)
    elif version == "1.1":
        conn.ack(frame.headers["message-id"], frame.headers["subscription"], **kw)
    else:
        conn.ack(frame.headers["message-id"], **kw)


def nack(conn, version, frame):
    if version == "1.2":
        conn.nack(frame.headers["ack"])
    elif version == "1.1":
        conn.nack(frame.headers["message-id"], frame.headers["subscription"])
    else:
        conn.send_frame("NACK", {"message-id": frame.headers["message-id"]})


for version in ["1.0", "1.1", "1.2"]:
    dest = "/queue/py-" + version
    conn, listener = connect(version)
    for i in range(5):
        conn.send(dest, f"m{i}", headers={"x-n": str(i), "persistent": "true"})
    conn.subscribe(dest, id="s1", ack="client-individual", headers={"prefetch-count": "10"})
    got = [get(listener) for _ in range(5)]
    assert [f.body for f in got] == [f"m{i}" for i in range(5)], [f.body for f in got]
    assert [f.headers["x-n"] for f in got] == [str(i) for i in range(5)]
    assert all(f.headers["subscription"] == "s1" and f.headers["destination"] == dest for f in got)
    for f in got[:4]:
        ack(conn, version, f)
    nack(conn, version, got[4])
    again = get(listener)
    assert again.body == "m4" and again.headers["redelivered"] == "true", again.headers
    ack(conn, version, again)
    nothing(listener)

    # A transaction's SENDs arrive at COMMIT; an aborted one's never.
    tx = conn.begin()
    conn.send(dest, "tx-1", headers={"transaction": tx})
    nothing(listener)
    conn.commit(tx)
    committed = get(listener)
    assert committed.body == "tx-1", committed.body
    tx = conn.begin()
    conn.send(dest, "aborted", headers={"transaction": tx})
    conn.abort(tx)
    nothing(listener)
    # ACK inside a transaction.
    tx = conn.begin()
    ack(conn, version, committed, transaction=tx)
    conn.commit(tx)

    # Topics: a subscription per subscriber.
    conn.subscribe("/topic/py." + version.replace(".", ""), id="t1")
    conn.send("/topic/py." + version.replace(".", ""), "topic message")
    assert get(listener).body == "topic message"
    conn.unsubscribe(id="s1")
    conn.send(dest, "after unsubscribe")
    nothing(listener)
    conn.disconnect()
    assert not listener.errors, listener.errors

# What the previous sessions left in the queues is still there.
conn, listener = connect("1.2")
conn.subscribe("/queue/py-1.2", id="rest", ack="auto")
assert get(listener).body == "after unsubscribe"
conn.disconnect()
print("stomp.py ok")
