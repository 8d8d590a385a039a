"""pika (blocking connection) against a running broker: python smoke_pika.py PORT."""
import sys
import pika

port = int(sys.argv[1])
conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
ch = conn.channel()
ch.queue_declare("pika-q", durable=True)
ch.confirm_delivery()
for i in range(100):
    ch.basic_publish("", "pika-q", f"m{i}".encode(), pika.BasicProperties(delivery_mode=2), mandatory=True)
try:
    ch.basic_publish("amq.direct", "no-such-key", b"x", mandatory=True)
    sys.exit("unroutable mandatory message was not returned")
except pika.exceptions.UnroutableError:
    pass
got = []
for method, props, body in ch.consume("pika-q", inactivity_timeout=2):
    if method is None:
        break
    got.append(body.decode())
    ch.basic_ack(method.delivery_tag)
    if len(got) == 100:
        break
ch.cancel()
assert got == [f"m{i}" for i in range(100)], got
# A channel error closes only the channel.
try:
    ch.queue_declare("no-such-queue", passive=True)
    sys.exit("passive declare of a missing queue succeeded")
except pika.exceptions.ChannelClosedByBroker as e:
    assert e.reply_code == 404, e
ch = conn.channel()
ch.exchange_declare("pika-topic", "topic")
q = ch.queue_declare("", exclusive=True).method.queue
ch.queue_bind(q, "pika-topic", "a.#")
ch.basic_publish("pika-topic", "a.b.c", b"hello")
for _ in range(50):
    method, props, body = ch.basic_get(q, auto_ack=True)
    if method:
        break
    conn.sleep(0.02)
assert body == b"hello", body
ch.queue_delete("pika-q")
conn.close()
print("pika ok")
