"""Compatibility matrix, py-amqp (the transport under kombu and Celery):
python matrix_pyamqp.py AMQP STOMP WS."""
import socket
import time

import amqp

from matrix_common import AMQP_PORT, big_body, check, restart, run, sha, standard, wait_until

CLIENT = "py-amqp"


def connect(**kw):
    c = amqp.Connection(f"127.0.0.1:{AMQP_PORT}", userid="guest", password="guest", virtual_host="/", **kw)
    c.connect()
    return c


def body(m):
    return m.body if isinstance(m.body, bytes) else m.body.encode()


def get(ch, q, timeout=5.0, no_ack=True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = ch.basic_get(q, no_ack=no_ack)
        if m is not None:
            return m
        time.sleep(0.02)
    raise AssertionError(f"no message in {q}")


def drain(ch, q):
    out = []
    while (m := ch.basic_get(q, no_ack=True)) is not None:
        out.append(body(m))
    return out


def count(ch, q):
    return ch.queue_declare(q, passive=True).message_count


def pump(c, seconds):
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            c.drain_events(timeout=left)
        except socket.timeout:
            break


def declare_bind():
    c = connect()
    ch = c.channel()
    q = {}
    for t in ["direct", "fanout", "topic", "headers"]:
        ch.exchange_declare(f"pa.{t}", t, auto_delete=False)
        q[t] = ch.queue_declare("", exclusive=True).queue
    ch.queue_bind(q["direct"], "pa.direct", "k1")
    ch.queue_bind(q["fanout"], "pa.fanout", "")
    ch.queue_bind(q["topic"], "pa.topic", "a.#")
    ch.queue_bind(q["headers"], "pa.headers", "", arguments={"x-match": "any", "h": "1", "g": "2"})
    pub = lambda x, k, b, **p: ch.basic_publish(amqp.Message(b, **p), exchange=x, routing_key=k)
    pub("pa.direct", "k1", b"d")
    pub("pa.direct", "k2", b"d-miss")
    pub("pa.fanout", "any", b"f")
    pub("pa.topic", "a.b.c", b"t")
    pub("pa.topic", "b.a", b"t-miss")
    pub("pa.headers", "", b"h", application_headers={"g": "2", "nested": {"deep": [1, "x"]}})
    pub("pa.headers", "", b"h-miss", application_headers={"h": "3"})
    for t, want in [("direct", b"d"), ("fanout", b"f"), ("topic", b"t"), ("headers", b"h")]:
        got = [body(get(ch, q[t]))] + drain(ch, q[t])
        check(got == [want], f"{t}: {got}")
    c.close()


def publish_consume_ack():
    c = connect()
    ch = c.channel()
    q = "pa.ack"
    ch.queue_declare(q, auto_delete=False)
    for i in range(20):
        ch.basic_publish(amqp.Message(f"m{i}"), routing_key=q)
    got = []
    ch.basic_consume(q, callback=got.append)
    deadline = time.monotonic() + 5
    while len(got) < 20 and time.monotonic() < deadline:
        pump(c, 0.2)
    check([body(m) for m in got] == [f"m{i}".encode() for i in range(20)], f"got {len(got)}")
    for m in got[:10]:
        ch.basic_ack(m.delivery_tag)
    ch.close()
    ch = c.channel()
    again = []
    for _ in range(10):
        m = get(ch, q, no_ack=False)
        check(m.delivery_info["redelivered"], "redelivered flag not set")
        again.append(body(m))
        ch.basic_ack(m.delivery_tag)
    check(again == [f"m{i}".encode() for i in range(10, 20)], f"redelivered {again}")
    check(count(ch, q) == 0, "queue not empty after acks")
    c.close()


def prefetch():
    c = connect()
    ch = c.channel()
    q = "pa.prefetch"
    ch.queue_declare(q, auto_delete=False)
    for i in range(10):
        ch.basic_publish(amqp.Message(str(i)), routing_key=q)
    ch.basic_qos(0, 3, False)
    got = []
    ch.basic_consume(q, callback=got.append)
    for want in [3, 4]:
        if want == 4:
            ch.basic_ack(got[0].delivery_tag)
        deadline = time.monotonic() + 5
        while len(got) < want and time.monotonic() < deadline:
            pump(c, 0.05)
        pump(c, 0.3)
        check(len(got) == want, f"{len(got)} unacked deliveries, prefetch 3 allows {want}")
    c.close()


def confirms():
    c = connect(confirm_publish=True)
    ch = c.channel()
    ch.queue_declare("pa.confirm", auto_delete=False)
    for i in range(50):
        ch.basic_publish(amqp.Message(str(i)), routing_key="pa.confirm")  # waits for each ack
    ch.queue_declare("pa.full", auto_delete=False, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    ch.basic_publish(amqp.Message("1"), routing_key="pa.full")
    try:
        ch.basic_publish(amqp.Message("2"), routing_key="pa.full")
        raise AssertionError("publish to a full reject-publish queue was confirmed")
    except amqp.exceptions.MessageNacked:
        pass
    check(count(ch, "pa.confirm") == 50, "50 confirmed messages not all queued")
    c.close()


def mandatory_return():
    c = connect()
    ch = c.channel()
    returned = []
    ch.events["basic_return"].add(lambda exc, x, k, m: returned.append((exc.reply_code, x, k, body(m))))
    ch.basic_publish(amqp.Message("r"), exchange="amq.direct", routing_key="nowhere", mandatory=True)
    deadline = time.monotonic() + 5
    while not returned and time.monotonic() < deadline:
        pump(c, 0.1)
    check(returned == [(312, "amq.direct", "nowhere", b"r")], f"returns {returned}")
    c.close()


def dead_letter():
    c = connect()
    ch = c.channel()
    ch.queue_declare("pa.dlq", auto_delete=False)
    ch.queue_declare("pa.src", auto_delete=False, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "pa.dlq"})
    ch.basic_publish(amqp.Message("dead"), routing_key="pa.src")
    m = get(ch, "pa.src", no_ack=False)
    ch.basic_reject(m.delivery_tag, requeue=False)
    d = get(ch, "pa.dlq")
    check(body(d) == b"dead", body(d))
    death = d.headers["x-death"][0]
    check(death["reason"] == "rejected" and death["queue"] == "pa.src", f"x-death {death}")
    c.close()


def ttl():
    c = connect()
    ch = c.channel()
    ch.queue_declare("pa.ttl", auto_delete=False, arguments={"x-message-ttl": 200})
    ch.queue_declare("pa.exp", auto_delete=False)
    ch.basic_publish(amqp.Message("gone"), routing_key="pa.ttl")
    ch.basic_publish(amqp.Message("short", expiration="100"), routing_key="pa.exp")
    ch.basic_publish(amqp.Message("keep"), routing_key="pa.exp")
    time.sleep(1.0)
    check(drain(ch, "pa.ttl") == [], "x-message-ttl did not expire")
    left = drain(ch, "pa.exp")
    check(left == [b"keep"], f"per-message expiration: {left}")
    c.close()


def priority():
    c = connect()
    ch = c.channel()
    ch.queue_declare("pa.prio", auto_delete=False, arguments={"x-max-priority": 10})
    for i, p in enumerate([1, 5, 9, 0, 5]):
        ch.basic_publish(amqp.Message(f"p{p}-{i}", priority=p), routing_key="pa.prio")
    got = [body(get(ch, "pa.prio"))] + drain(ch, "pa.prio")
    check(got == [b"p9-2", b"p5-1", b"p5-4", b"p1-0", b"p0-3"], f"order {got}")
    c.close()


def transactions():
    c = connect()
    ch = c.channel()
    ch.queue_declare("pa.tx", auto_delete=False)
    ch.tx_select()
    ch.basic_publish(amqp.Message("rolled-back"), routing_key="pa.tx")
    ch.tx_rollback()
    ch.basic_publish(amqp.Message("committed"), routing_key="pa.tx")
    check(count(ch, "pa.tx") == 0, "publish visible before commit")
    ch.tx_commit()
    check(drain(ch, "pa.tx") == [b"committed"], "commit")
    c.close()


def reconnect():
    c = connect(confirm_publish=True)
    ch = c.channel()
    ch.queue_declare("pa.durable", durable=True, auto_delete=False)
    for i in range(3):
        ch.basic_publish(amqp.Message(f"s{i}", delivery_mode=2), routing_key="pa.durable")
    restart()
    try:
        ch.queue_declare("pa.durable", passive=True)
        raise AssertionError("the old connection still works after the restart")
    except (amqp.exceptions.AMQPError, OSError):
        pass
    c = connect()
    ch = c.channel()
    got = [body(get(ch, "pa.durable"))] + drain(ch, "pa.durable")
    check(got == [b"s0", b"s1", b"s2"], f"after restart {got}")
    c.close()


def large():
    data, digest = big_body()
    c = connect()
    ch = c.channel()
    ch.queue_declare("pa.large", auto_delete=False)
    ch.basic_publish(amqp.Message(data), routing_key="pa.large")
    got = []
    ch.basic_consume("pa.large", callback=got.append)
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        pump(c, 0.5)
    check(got, "timed out")
    b = body(got[0])
    ch.basic_ack(got[0].delivery_tag)
    check(len(b) == len(data) and sha(b) == digest, f"{len(b)} bytes, checksum differs")
    c.close()


def connections_500():
    t = time.monotonic()
    conns = [connect() for _ in range(500)]
    opened = time.monotonic() - t
    for i, c in enumerate(conns):
        ch = c.channel()
        if i == 0:
            ch.queue_declare("pa.c500", auto_delete=False)
        ch.basic_publish(amqp.Message(str(i)), routing_key="pa.c500")
    ch0 = conns[0].channel()
    wait_until(lambda: count(ch0, "pa.c500") == 500, what="500 messages from 500 connections")
    for c in conns:
        c.close()
    return f"500 opened in {opened:.1f}s"


run(CLIENT, standard(globals()))
