"""py-amqp (Celery's transport) with nested headers: python smoke_pyamqp.py PORT."""
import sys
import time
import amqp

port = int(sys.argv[1])
with amqp.Connection(f"127.0.0.1:{port}") as c:
    ch = c.channel()
    ch.queue_declare("pyamqp-q", auto_delete=False)
    headers = {"a": 1, "n": {"x": [1, 2.5, True, "s"]}, "neg": -5}
    ch.basic_publish(amqp.Message("hi", content_type="text/plain", application_headers=headers), routing_key="pyamqp-q")
    m = None
    for _ in range(50):
        m = ch.basic_get("pyamqp-q", no_ack=True)
        if m:
            break
        time.sleep(0.02)
    assert m is not None and m.body == "hi", m
    assert m.properties["application_headers"] == headers, m.properties
    ch.queue_delete("pyamqp-q")
print("py-amqp ok")
