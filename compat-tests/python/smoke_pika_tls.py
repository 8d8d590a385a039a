"""pika over TLS with a client certificate and SASL EXTERNAL, against a
running broker: python smoke_pika_tls.py PORT CA CERT KEY USER.
The broker must log the client in as USER (the certificate's CN)."""
import ssl
import sys

import pika

port, ca, cert, key, user = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
context = ssl.create_default_context(cafile=ca)
context.load_cert_chain(cert, key)
params = pika.ConnectionParameters(
    "127.0.0.1",
    port,
    ssl_options=pika.SSLOptions(context, "localhost"),
    credentials=pika.credentials.ExternalCredentials(),
)
conn = pika.BlockingConnection(params)
ch = conn.channel()
ch.queue_declare("pika-tls-q")
ch.confirm_delivery()
for i in range(50):
    ch.basic_publish("", "pika-tls-q", f"m{i}".encode(), pika.BasicProperties(user_id=user))
got = []
for method, props, body in ch.consume("pika-tls-q", inactivity_timeout=5):
    if method is None:
        break
    assert props.user_id == user, props
    got.append(body.decode())
    ch.basic_ack(method.delivery_tag)
    if len(got) == 50:
        break
ch.cancel()
assert got == [f"m{i}" for i in range(50)], got
# The user_id check proves who we are: another name closes the channel.
try:
    ch.basic_publish("", "pika-tls-q", b"x", pika.BasicProperties(user_id="guest"))
    sys.exit("a foreign user_id was accepted")
except pika.exceptions.ChannelClosedByBroker as e:
    assert e.reply_code == 406, e
conn.close()
print("pika tls ok")
