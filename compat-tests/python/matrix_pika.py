"""Compatibility matrix, pika BlockingConnection: python matrix_pika.py AMQP STOMP WS."""
import time

import pika

from matrix_common import AMQP_PORT, big_body, check, restart, run, sha, standard, wait_until

CLIENT = "pika (blocking)"


def params(**kw):
    return pika.ConnectionParameters("127.0.0.1", AMQP_PORT, **kw)


def connect(**kw):
    return pika.BlockingConnection(params(**kw))


def get(ch, q, timeout=5.0, auto_ack=True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m, p, b = ch.basic_get(q, auto_ack=auto_ack)
        if m:
            return m, p, b
        time.sleep(0.02)
    raise AssertionError(f"no message in {q}")


def pump(c, seconds):
    """Processes I/O for `seconds` (process_data_events returns at the first event)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        c.process_data_events(time_limit=left)


def pump_until(c, pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        check(time.monotonic() < deadline, f"timed out waiting for {what}")
        c.process_data_events(time_limit=0.05)


def drain(ch, q):
    out = []
    while True:
        m, _, b = ch.basic_get(q, auto_ack=True)
        if not m:
            return out
        out.append(b)


def declare_bind():
    c = connect()
    ch = c.channel()
    q = {}
    for t in ["direct", "fanout", "topic", "headers"]:
        ch.exchange_declare(f"pk.{t}", t)
        q[t] = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q["direct"], "pk.direct", "k1")
    ch.queue_bind(q["fanout"], "pk.fanout", "")
    ch.queue_bind(q["topic"], "pk.topic", "a.*.c")
    ch.queue_bind(q["headers"], "pk.headers", "", arguments={"x-match": "all", "h": "1"})
    ch.basic_publish("pk.direct", "k1", b"d")
    ch.basic_publish("pk.direct", "k2", b"d-miss")
    ch.basic_publish("pk.fanout", "any", b"f")
    ch.basic_publish("pk.topic", "a.b.c", b"t")
    ch.basic_publish("pk.topic", "a.b.d", b"t-miss")
    ch.basic_publish("pk.headers", "", b"h", pika.BasicProperties(headers={"h": "1"}))
    ch.basic_publish("pk.headers", "", b"h-miss", pika.BasicProperties(headers={"h": "2"}))
    for t, want in [("direct", b"d"), ("fanout", b"f"), ("topic", b"t"), ("headers", b"h")]:
        got = [get(ch, q[t])[2]] + drain(ch, q[t])
        check(got == [want], f"{t}: {got}")
    ch.queue_unbind(q["direct"], "pk.direct", "k1")
    ch.basic_publish("pk.direct", "k1", b"unbound")
    time.sleep(0.2)
    check(drain(ch, q["direct"]) == [], "delivered after unbind")
    c.close()


def publish_consume_ack():
    c = connect()
    ch = c.channel()
    q = "pk.ack"
    ch.queue_declare(q)
    for i in range(20):
        ch.basic_publish("", q, f"m{i}".encode())
    got = []
    for m, _, b in ch.consume(q, inactivity_timeout=5):
        check(m is not None, "timed out consuming")
        got.append((m.delivery_tag, b))
        if len(got) == 20:
            break
    check([b for _, b in got] == [f"m{i}".encode() for i in range(20)], f"order {got}")
    for tag, _ in got[:10]:
        ch.basic_ack(tag)
    ch.close()  # the 10 unacked go back to the queue
    ch = c.channel()
    again = []
    for m, _, b in ch.consume(q, inactivity_timeout=5):
        check(m is not None, "timed out consuming redeliveries")
        check(m.redelivered, "redelivered flag not set")
        again.append(b)
        ch.basic_ack(m.delivery_tag)
        if len(again) == 10:
            break
    ch.cancel()
    check(again == [f"m{i}".encode() for i in range(10, 20)], f"redelivered {again}")
    check(ch.queue_declare(q, passive=True).method.message_count == 0, "queue not empty after acks")
    c.close()


def prefetch():
    c = connect()
    ch = c.channel()
    q = "pk.prefetch"
    ch.queue_declare(q)
    for i in range(10):
        ch.basic_publish("", q, str(i).encode())
    ch.basic_qos(prefetch_count=3)
    got = []
    ch.basic_consume(q, lambda _ch, m, _p, _b: got.append(m))
    for acked, want in [(None, 3), (False, 4), (True, 7)]:
        if acked is not None:
            ch.basic_ack(got[-1 if acked else 0].delivery_tag, multiple=acked)
        pump_until(c, lambda: len(got) >= want, what=f"{want} deliveries")
        pump(c, 0.3)
        check(len(got) == want, f"{len(got)} unacked deliveries, prefetch 3 allows {want}")
    c.close()


def confirms():
    c = connect()
    ch = c.channel()
    ch.confirm_delivery()
    ch.queue_declare("pk.confirm")
    for i in range(50):
        ch.basic_publish("", "pk.confirm", str(i).encode())  # raises NackError on a nack
    ch.queue_declare("pk.full", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    ch.basic_publish("", "pk.full", b"1")
    try:
        ch.basic_publish("", "pk.full", b"2")
        raise AssertionError("publish to a full reject-publish queue was confirmed")
    except pika.exceptions.NackError:
        pass
    check(ch.queue_declare("pk.confirm", passive=True).method.message_count == 50, "50 confirmed messages not all queued")
    c.close()


def mandatory_return():
    c = connect()
    ch = c.channel()
    returned = []
    ch.add_on_return_callback(lambda _ch, m, _p, b: returned.append((m.reply_code, m.reply_text, m.exchange, m.routing_key, b)))
    ch.queue_declare("pk.routable")
    ch.basic_publish("", "pk.routable", b"ok", mandatory=True)
    ch.basic_publish("amq.direct", "nowhere", b"r", mandatory=True)
    deadline = time.monotonic() + 5
    while not returned and time.monotonic() < deadline:
        c.process_data_events(time_limit=0.1)
    pump(c, 0.2)
    check(returned == [(312, "NO_ROUTE", "amq.direct", "nowhere", b"r")], f"returns {returned}")
    check(get(ch, "pk.routable")[2] == b"ok", "routable mandatory message missing")
    c.close()


def dead_letter():
    c = connect()
    ch = c.channel()
    ch.queue_declare("pk.dlq")
    ch.queue_declare("pk.src", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "pk.dlq"})
    ch.basic_publish("", "pk.src", b"dead")
    m, _, _ = get(ch, "pk.src", auto_ack=False)
    ch.basic_reject(m.delivery_tag, requeue=False)
    _, p, b = get(ch, "pk.dlq")
    check(b == b"dead", b)
    death = p.headers["x-death"][0]
    check(death["reason"] == "rejected" and death["queue"] == "pk.src" and death["count"] == 1, f"x-death {death}")
    c.close()


def ttl():
    c = connect()
    ch = c.channel()
    ch.queue_declare("pk.ttl", arguments={"x-message-ttl": 200})
    ch.queue_declare("pk.exp")
    ch.basic_publish("", "pk.ttl", b"gone")
    ch.basic_publish("", "pk.exp", b"short", pika.BasicProperties(expiration="100"))
    ch.basic_publish("", "pk.exp", b"keep")
    time.sleep(1.0)
    check(drain(ch, "pk.ttl") == [], "x-message-ttl did not expire")
    left = drain(ch, "pk.exp")
    check(left == [b"keep"], f"per-message expiration: {left}")
    c.close()


def priority():
    c = connect()
    ch = c.channel()
    ch.queue_declare("pk.prio", arguments={"x-max-priority": 10})
    for i, p in enumerate([1, 5, 9, 0, 5]):
        ch.basic_publish("", "pk.prio", f"p{p}-{i}".encode(), pika.BasicProperties(priority=p))
    got = [get(ch, "pk.prio")[2]] + drain(ch, "pk.prio")
    check(got == [b"p9-2", b"p5-1", b"p5-4", b"p1-0", b"p0-3"], f"order {got}")
    c.close()


def transactions():
    c = connect()
    ch = c.channel()
    ch.queue_declare("pk.tx")
    ch.tx_select()
    ch.basic_publish("", "pk.tx", b"rolled-back")
    ch.tx_rollback()
    ch.basic_publish("", "pk.tx", b"committed")
    check(ch.queue_declare("pk.tx", passive=True).method.message_count == 0, "publish visible before commit")
    ch.tx_commit()
    m, _, b = get(ch, "pk.tx", auto_ack=False)
    check(b == b"committed", b)
    ch.basic_ack(m.delivery_tag)
    ch.tx_rollback()  # the ack is undone: the message is still unacked
    ch.close()
    ch = c.channel()
    check(get(ch, "pk.tx")[2] == b"committed", "rolled-back ack settled the message")
    c.close()


def reconnect():
    c = connect()
    ch = c.channel()
    ch.confirm_delivery()
    ch.queue_declare("pk.durable", durable=True)
    for i in range(3):
        ch.basic_publish("", "pk.durable", f"s{i}".encode(), pika.BasicProperties(delivery_mode=2))
    restart()
    try:
        ch.queue_declare("pk.durable", passive=True)
        raise AssertionError("the old connection still works after the restart")
    except pika.exceptions.AMQPError:
        pass
    c = connect(connection_attempts=20, retry_delay=0.25)
    ch = c.channel()
    got = [get(ch, "pk.durable")[2]] + drain(ch, "pk.durable")
    check(got == [b"s0", b"s1", b"s2"], f"after restart {got}")
    c.close()


def large():
    body, digest = big_body()
    c = connect()
    ch = c.channel()
    ch.queue_declare("pk.large")
    ch.basic_publish("", "pk.large", body)
    for m, _, b in ch.consume("pk.large", inactivity_timeout=20):
        check(m is not None, "timed out")
        ch.basic_ack(m.delivery_tag)
        check(len(b) == len(body) and sha(b) == digest, f"{len(b)} bytes, checksum differs")
        break
    ch.cancel()
    c.close()


def connections_500():
    t = time.monotonic()
    conns = [connect() for _ in range(500)]
    opened = time.monotonic() - t
    for i, c in enumerate(conns):
        ch = c.channel()
        if i == 0:
            ch.queue_declare("pk.c500")
        ch.basic_publish("", "pk.c500", str(i).encode())
    ch0 = conns[0].channel()
    wait_until(lambda: ch0.queue_declare("pk.c500", passive=True).method.message_count == 500, what="500 messages from 500 connections")
    for c in conns:
        c.close()
    return f"500 opened in {opened:.1f}s"


run(CLIENT, standard(globals()))
