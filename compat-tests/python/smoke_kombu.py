"""kombu producer/consumer with retries: python smoke_kombu.py PORT."""
import sys
from kombu import Connection, Exchange, Queue

port = int(sys.argv[1])
ex = Exchange("kombu-x", "direct", durable=True)
q = Queue("kombu-q", ex, routing_key="k")
with Connection(f"amqp://guest:guest@127.0.0.1:{port}//") as conn:
    producer = conn.Producer(serializer="json")
    for i in range(20):
        producer.publish({"i": i}, exchange=ex, routing_key="k", declare=[q], retry=True,
                         retry_policy={"max_retries": 3})
    got = []

    def on_message(body, message):
        got.append(body["i"])
        message.ack()

    with conn.Consumer(q, callbacks=[on_message]):
        while len(got) < 20:
            conn.drain_events(timeout=5)
    assert got == list(range(20)), got
    q(conn.default_channel).delete()
print("kombu ok")
