"""Compatibility matrix, pika's asynchronous connection (AsyncioConnection,
callback API; awaited here through futures): python matrix_pika_async.py AMQP STOMP WS."""
import asyncio
import time

import pika
from pika.adapters.asyncio_connection import AsyncioConnection

from matrix_common import AMQP_PORT, big_body, check, report, restart, sha, standard

CLIENT = "pika (asyncio)"


async def connect(**kw):
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    closed = loop.create_future()

    def on_close(_c, reason):
        if not closed.done():
            closed.set_result(reason)

    c = AsyncioConnection(
        pika.ConnectionParameters("127.0.0.1", AMQP_PORT, **kw),
        on_open_callback=lambda c: fut.set_result(c),
        on_open_error_callback=lambda _c, e: fut.set_exception(RuntimeError(f"open failed: {e}")),
        on_close_callback=on_close,
        custom_ioloop=loop,
    )
    await fut
    c.closed_future = closed
    return c


async def channel(c):
    fut = asyncio.get_running_loop().create_future()
    c.channel(on_open_callback=fut.set_result)
    return await fut


def call(fn, *a, **kw):
    """Calls a pika method that takes callback=, returns a future of its frame."""
    fut = asyncio.get_running_loop().create_future()

    def done(frame=None):
        if not fut.done():
            fut.set_result(frame)

    fn(*a, callback=done, **kw)
    return fut


async def close(c):
    if c.is_open:
        c.close()
    await asyncio.wait_for(c.closed_future, 5)


async def count(ch, q):
    return (await call(ch.queue_declare, q, passive=True)).method.message_count


async def until(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Sink:
    """A consumer that collects (method, properties, body)."""

    def __init__(self, ch, q, auto_ack=True):
        self.got = []
        self.ch = ch
        self.tag = ch.basic_consume(q, lambda _ch, m, p, b: self.got.append((m, p, b)), auto_ack=auto_ack)

    def bodies(self):
        return [b for _, _, b in self.got]


async def declare_bind():
    c = await connect()
    ch = await channel(c)
    sinks = {}
    for t in ["direct", "fanout", "topic", "headers"]:
        await call(ch.exchange_declare, f"pa2.{t}", t)
        q = (await call(ch.queue_declare, "", exclusive=True)).method.queue
        key = {"direct": "k1", "fanout": "", "topic": "*.b.#", "headers": ""}[t]
        args = {"x-match": "all", "h": "1"} if t == "headers" else None
        await call(ch.queue_bind, q, f"pa2.{t}", routing_key=key, arguments=args)
        sinks[t] = Sink(ch, q)
    pub = lambda x, k, b, h=None: ch.basic_publish(x, k, b, pika.BasicProperties(headers=h))
    pub("pa2.direct", "k1", b"d")
    pub("pa2.direct", "k2", b"d-miss")
    pub("pa2.fanout", "x", b"f")
    pub("pa2.topic", "a.b.c.d", b"t")
    pub("pa2.topic", "a.c", b"t-miss")
    pub("pa2.headers", "", b"h", {"h": "1", "other": 2})
    pub("pa2.headers", "", b"h-miss", {"other": 2})
    await until(lambda: all(s.got for s in sinks.values()), what="one delivery per exchange type")
    await asyncio.sleep(0.2)
    for t, want in [("direct", b"d"), ("fanout", b"f"), ("topic", b"t"), ("headers", b"h")]:
        check(sinks[t].bodies() == [want], f"{t}: {sinks[t].bodies()}")
    await close(c)


async def publish_consume_ack():
    c = await connect()
    ch = await channel(c)
    q = "pa2.ack"
    await call(ch.queue_declare, q)
    for i in range(20):
        ch.basic_publish("", q, f"m{i}".encode())
    s = Sink(ch, q, auto_ack=False)
    await until(lambda: len(s.got) == 20, what="20 deliveries")
    check(s.bodies() == [f"m{i}".encode() for i in range(20)], f"order {s.bodies()}")
    for m, _, _ in s.got[:10]:
        ch.basic_ack(m.delivery_tag)
    closed = asyncio.get_running_loop().create_future()
    ch.add_on_close_callback(lambda *_: closed.set_result(True))
    ch.close()
    await closed
    ch = await channel(c)
    s = Sink(ch, q, auto_ack=False)
    await until(lambda: len(s.got) == 10, what="10 redeliveries")
    check(all(m.redelivered for m, _, _ in s.got), "redelivered flag not set")
    check(s.bodies() == [f"m{i}".encode() for i in range(10, 20)], f"redelivered {s.bodies()}")
    ch.basic_ack(s.got[-1][0].delivery_tag, multiple=True)
    await call(ch.basic_cancel, s.tag)
    check(await count(ch, q) == 0, "queue not empty after acks")
    await close(c)


async def prefetch():
    c = await connect()
    ch = await channel(c)
    q = "pa2.prefetch"
    await call(ch.queue_declare, q)
    for i in range(10):
        ch.basic_publish("", q, str(i).encode())
    await call(ch.basic_qos, prefetch_count=3)
    s = Sink(ch, q, auto_ack=False)
    for want in [3, 4]:
        if want == 4:
            ch.basic_ack(s.got[0][0].delivery_tag)
        await until(lambda: len(s.got) >= want, what=f"{want} deliveries")
        await asyncio.sleep(0.3)
        check(len(s.got) == want, f"{len(s.got)} unacked deliveries, prefetch 3 allows {want}")
    await close(c)


async def confirms():
    c = await connect()
    ch = await channel(c)
    acks, nacks = set(), set()

    def on_confirm(frame):
        m = frame.method
        tags = range(1, m.delivery_tag + 1) if m.multiple else [m.delivery_tag]
        (acks if isinstance(m, pika.spec.Basic.Ack) else nacks).update(tags)

    await call(ch.confirm_delivery, on_confirm)
    await call(ch.queue_declare, "pa2.confirm")
    await call(ch.queue_declare, "pa2.full", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    for i in range(50):
        ch.basic_publish("", "pa2.confirm", str(i).encode())
    ch.basic_publish("", "pa2.full", b"1")
    ch.basic_publish("", "pa2.full", b"2")
    await until(lambda: len(acks) + len(nacks) >= 52, what="52 confirms")
    check(acks == set(range(1, 52)) and nacks == {52}, f"acks {sorted(acks)} nacks {sorted(nacks)}")
    await close(c)


async def mandatory_return():
    c = await connect()
    ch = await channel(c)
    returned = []
    ch.add_on_return_callback(lambda _ch, m, _p, b: returned.append((m.reply_code, m.routing_key, b)))
    await call(ch.queue_declare, "pa2.routable")
    ch.basic_publish("", "pa2.routable", b"ok", mandatory=True)
    ch.basic_publish("amq.topic", "nowhere", b"r", mandatory=True)
    await until(lambda: returned, what="basic.return")
    await asyncio.sleep(0.2)
    check(returned == [(312, "nowhere", b"r")], f"returns {returned}")
    check(await count(ch, "pa2.routable") == 1, "routable mandatory message missing")
    await close(c)


async def dead_letter():
    c = await connect()
    ch = await channel(c)
    await call(ch.queue_declare, "pa2.dlq")
    await call(ch.queue_declare, "pa2.src", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "pa2.dlq"})
    src = Sink(ch, "pa2.src", auto_ack=False)
    dlq = Sink(ch, "pa2.dlq")
    ch.basic_publish("", "pa2.src", b"dead")
    await until(lambda: src.got, what="delivery")
    ch.basic_nack(src.got[0][0].delivery_tag, requeue=False)
    await until(lambda: dlq.got, what="dead letter")
    _, p, b = dlq.got[0]
    death = p.headers["x-death"][0]
    check(b == b"dead" and death["reason"] == "rejected" and death["queue"] == "pa2.src", f"{b} {death}")
    await close(c)


async def ttl():
    c = await connect()
    ch = await channel(c)
    await call(ch.queue_declare, "pa2.ttl", arguments={"x-message-ttl": 200})
    await call(ch.queue_declare, "pa2.exp")
    ch.basic_publish("", "pa2.ttl", b"gone")
    ch.basic_publish("", "pa2.exp", b"short", pika.BasicProperties(expiration="100"))
    ch.basic_publish("", "pa2.exp", b"keep")
    await asyncio.sleep(1.0)
    a, b = Sink(ch, "pa2.ttl"), Sink(ch, "pa2.exp")
    await until(lambda: b.got, what="the unexpired message")
    await asyncio.sleep(0.3)
    check(a.bodies() == [] and b.bodies() == [b"keep"], f"ttl {a.bodies()} expiration {b.bodies()}")
    await close(c)


async def priority():
    c = await connect()
    ch = await channel(c)
    await call(ch.queue_declare, "pa2.prio", arguments={"x-max-priority": 10})
    for i, p in enumerate([1, 5, 9, 0, 5]):
        ch.basic_publish("", "pa2.prio", f"p{p}-{i}".encode(), pika.BasicProperties(priority=p))
    check(await count(ch, "pa2.prio") == 5, "5 queued")
    s = Sink(ch, "pa2.prio")
    await until(lambda: len(s.got) == 5, what="5 deliveries")
    check(s.bodies() == [b"p9-2", b"p5-1", b"p5-4", b"p1-0", b"p0-3"], f"order {s.bodies()}")
    await close(c)


async def transactions():
    c = await connect()
    ch = await channel(c)
    await call(ch.queue_declare, "pa2.tx")
    await call(ch.tx_select)
    ch.basic_publish("", "pa2.tx", b"rolled-back")
    await call(ch.tx_rollback)
    ch.basic_publish("", "pa2.tx", b"committed")
    check(await count(ch, "pa2.tx") == 0, "publish visible before commit")
    await call(ch.tx_commit)
    check(await count(ch, "pa2.tx") == 1, "commit")
    await close(c)


async def reconnect():
    c = await connect()
    ch = await channel(c)
    acks = []
    await call(ch.confirm_delivery, lambda f: acks.append(f.method.delivery_tag))
    await call(ch.queue_declare, "pa2.durable", durable=True)
    for i in range(3):
        ch.basic_publish("", "pa2.durable", f"s{i}".encode(), pika.BasicProperties(delivery_mode=2))
    await until(lambda: acks and max(acks) == 3, what="confirms")
    await asyncio.get_running_loop().run_in_executor(None, restart)
    reason = await asyncio.wait_for(c.closed_future, 10)
    c = await connect(connection_attempts=20, retry_delay=0.25)
    ch = await channel(c)
    s = Sink(ch, "pa2.durable")
    await until(lambda: len(s.got) == 3, what="3 messages after restart")
    check(s.bodies() == [b"s0", b"s1", b"s2"], f"after restart {s.bodies()}")
    await close(c)
    return f"old connection closed: {type(reason).__name__}"


async def large():
    data, digest = big_body()
    c = await connect()
    ch = await channel(c)
    await call(ch.queue_declare, "pa2.large")
    ch.basic_publish("", "pa2.large", data)
    s = Sink(ch, "pa2.large")
    await until(lambda: s.got, timeout=20, what="the large message")
    b = s.got[0][2]
    check(len(b) == len(data) and sha(b) == digest, f"{len(b)} bytes, checksum differs")
    await close(c)


async def connections_500():
    t = time.monotonic()
    conns = await asyncio.gather(*(connect() for _ in range(500)))
    opened = time.monotonic() - t
    chans = await asyncio.gather(*(channel(c) for c in conns))
    await call(chans[0].queue_declare, "pa2.c500")
    for i, ch in enumerate(chans):
        ch.basic_publish("", "pa2.c500", str(i).encode())
    deadline = time.monotonic() + 10
    while await count(chans[0], "pa2.c500") != 500:
        check(time.monotonic() < deadline, "500 messages from 500 connections")
        await asyncio.sleep(0.05)
    await asyncio.gather(*(close(c) for c in conns))
    return f"500 opened concurrently in {opened:.1f}s"


async def main():
    for name, fn in standard(globals()):
        start = time.monotonic()
        try:
            detail = await asyncio.wait_for(fn(), 60) or ""
            report(CLIENT, name, True, detail, time.monotonic() - start)
        except Exception as e:  # noqa: BLE001 - every failure is a matrix cell
            import traceback
            traceback.print_exc()
            report(CLIENT, name, False, f"{type(e).__name__}: {e}", time.monotonic() - start)


asyncio.run(main())
