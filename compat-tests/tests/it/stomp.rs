//! STOMP against the real binary: a small client over TCP built on the
//! codec crate (protocol-level cases: negotiation, receipts, errors,
//! heart-beats, destinations, ack modes, transactions), interop with lapin,
//! and stomp.py (Python) on 1.0, 1.1 and 1.2.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use sluice_codecs::stomp::{encode_frame, Command, Decoder, Frame, Item, Limits, Version};

use crate::common::*;

/// A minimal STOMP client: frames out, frames (and heart-beats) in.
pub(crate) struct Client {
    pub(crate) sock: TcpStream,
    dec: Decoder,
    buf: BytesMut,
    version: Version,
}

pub(crate) fn frame(command: Command, headers: &[(&str, &str)]) -> Frame {
    let mut f = Frame::new(command);
    for (k, v) in headers {
        f.headers.push((k.to_string(), v.to_string()));
    }
    f
}

impl Client {
    /// A TCP connection, nothing sent yet.
    fn tcp(s: &Server) -> Client {
        Client::tcp_at(s.stomp_addr())
    }

    fn tcp_at(addr: SocketAddr) -> Client {
        let sock = TcpStream::connect(addr).expect("connect to STOMP");
        sock.set_nodelay(true).unwrap();
        Client { sock, dec: Decoder::new(Version::V1_0, Limits::default()), buf: BytesMut::new(), version: Version::V1_0 }
    }

    /// CONNECT with `headers`; returns the client and the server's answer.
    fn connect_with(s: &Server, headers: &[(&str, &str)]) -> (Client, Frame) {
        Client::connect_at(s.stomp_addr(), headers)
    }

    pub(crate) fn connect_at(addr: SocketAddr, headers: &[(&str, &str)]) -> (Client, Frame) {
        let mut c = Client::tcp_at(addr);
        c.send(&frame(Command::Connect, headers));
        let reply = c.recv();
        if reply.command == Command::Connected {
            let v: Version = reply.header("version").unwrap_or("1.0").parse().unwrap();
            c.version = v;
            c.dec.version = v;
        }
        (c, reply)
    }

    /// A logged-in session of `version`.
    fn open(s: &Server, version: &str) -> Client {
        Client::open_at(s.stomp_addr(), version)
    }

    pub(crate) fn open_at(addr: SocketAddr, version: &str) -> Client {
        let (c, reply) =
            Client::connect_at(addr, &[("accept-version", version), ("host", "/"), ("login", "guest"), ("passcode", "guest")]);
        assert_eq!(reply.command, Command::Connected, "{reply:?}");
        c
    }

    pub(crate) fn send(&mut self, f: &Frame) {
        let mut out = BytesMut::new();
        encode_frame(f, self.version, &mut out).unwrap();
        self.sock.write_all(&out).unwrap();
    }

    pub(crate) fn raw(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    /// The next item within `timeout`: `Ok(None)` when the server closed,
    /// `Err(())` on timeout.
    fn item(&mut self, timeout: Duration) -> Result<Option<Item>, ()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(item) = self.dec.decode(&mut self.buf).expect("server sent bad STOMP") {
                return Ok(Some(item));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(());
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.sock.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return Err(()),
                Err(_) => return Ok(None),
            }
        }
    }

    /// The next frame (heart-beats skipped), or None when the server closed.
    pub(crate) fn try_recv(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.item(deadline.saturating_duration_since(Instant::now())) {
                Ok(Some(Item::Frame(f))) => return Some(f),
                Ok(Some(Item::Heartbeat)) => continue,
                Ok(None) | Err(()) => return None,
            }
        }
    }

    pub(crate) fn recv(&mut self) -> Frame {
        self.try_recv(Duration::from_secs(10)).expect("a frame from the server")
    }

    fn expect(&mut self, command: Command) -> Frame {
        let f = self.recv();
        assert_eq!(f.command, command, "{f:?} (body {:?})", String::from_utf8_lossy(&f.body));
        f
    }

    /// Asserts the server sends nothing for `wait`.
    fn quiet(&mut self, wait: Duration) {
        if let Some(f) = self.try_recv(wait) {
            panic!("unexpected frame {f:?}");
        }
    }

    /// Asserts the server closes the connection soon (after any frames).
    fn assert_closed(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.item(deadline.saturating_duration_since(Instant::now())) {
                Ok(None) => return,
                Ok(Some(_)) => continue,
                Err(()) => panic!("the server did not close the connection"),
            }
        }
    }

    /// An ERROR frame with `message`, then the connection closes.
    pub(crate) fn expect_error(&mut self, message: &str) -> Frame {
        let f = self.expect(Command::Error);
        assert_eq!(f.header("message"), Some(message), "{f:?} body {:?}", String::from_utf8_lossy(&f.body));
        assert!(!f.body.is_empty(), "ERROR frames explain in their body");
        self.assert_closed();
        f
    }

    /// Sends `f` with a receipt and waits for the RECEIPT.
    fn call(&mut self, mut f: Frame, receipt: &str) {
        f.headers.push(("receipt".into(), receipt.into()));
        self.send(&f);
        let r = self.expect(Command::Receipt);
        assert_eq!(r.header("receipt-id"), Some(receipt));
    }

    /// As [`Client::call`], for a frame whose effects may reach this
    /// connection before its receipt (a SEND to a queue it subscribes
    /// to): returns the frames that came first.
    fn call_collecting(&mut self, mut f: Frame, receipt: &str) -> Vec<Frame> {
        f.headers.push(("receipt".into(), receipt.into()));
        self.send(&f);
        let mut before = Vec::new();
        loop {
            let r = self.recv();
            if r.command == Command::Receipt {
                assert_eq!(r.header("receipt-id"), Some(receipt));
                return before;
            }
            before.push(r);
        }
    }

    /// The next MESSAGE: the first of `early` if any, else from the wire.
    fn message_after(&mut self, early: &mut Vec<Frame>) -> Frame {
        if early.is_empty() {
            return self.expect(Command::Message);
        }
        let f = early.remove(0);
        assert_eq!(f.command, Command::Message, "{f:?}");
        f
    }

    fn subscribe(&mut self, dest: &str, id: &str, extra: &[(&str, &str)]) {
        let mut f = frame(Command::Subscribe, &[("destination", dest), ("id", id)]);
        for (k, v) in extra {
            f.headers.push((k.to_string(), v.to_string()));
        }
        self.call(f, &format!("sub-{id}"));
    }

    fn send_text(&mut self, dest: &str, body: &str) {
        self.send(&frame(Command::Send, &[("destination", dest)]).with_body(body.as_bytes().to_vec()));
    }

    /// The id to ACK/NACK a MESSAGE with in this version.
    fn ack_headers(&self, m: &Frame) -> Vec<(String, String)> {
        match self.version {
            Version::V1_2 => vec![("id".into(), m.header("ack").unwrap().into())],
            _ => vec![
                ("message-id".into(), m.header("message-id").unwrap().into()),
                ("subscription".into(), m.header("subscription").unwrap_or("").into()),
            ],
        }
    }

    fn ack(&mut self, command: Command, m: &Frame, extra: &[(&str, &str)]) -> Frame {
        let mut f = Frame::new(command);
        f.headers = self.ack_headers(m);
        for (k, v) in extra {
            f.headers.push((k.to_string(), v.to_string()));
        }
        f
    }

    fn disconnect(mut self) {
        self.call(Frame::new(Command::Disconnect), "bye");
        self.assert_closed();
    }
}

fn body(f: &Frame) -> String {
    String::from_utf8_lossy(&f.body).into_owned()
}

#[test]
fn connect_negotiates_the_highest_common_version() {
    let s = Server::start();
    for (accept, want) in [("1.0,1.1,1.2", "1.2"), ("1.1,1.0", "1.1"), ("1.0", "1.0"), ("1.2,2.0", "1.2")] {
        let (c, reply) = Client::connect_with(&s, &[("accept-version", accept), ("host", "/")]);
        assert_eq!(reply.command, Command::Connected);
        assert_eq!(reply.header("version"), Some(want), "{accept}");
        assert!(reply.header("session").is_some_and(|v| !v.is_empty()));
        assert!(reply.header("server").is_some_and(|v| v.starts_with("Sluice/")));
        assert_eq!(reply.header("heart-beat"), Some("0,0"));
        c.disconnect();
    }
    // No accept-version: STOMP 1.0, and guest/guest without login (RabbitMQ's default user).
    let (c, reply) = Client::connect_with(&s, &[]);
    assert_eq!(reply.header("version"), Some("1.0"));
    c.disconnect();
    // The STOMP command works like CONNECT.
    let mut c = Client::tcp(&s);
    c.send(&frame(Command::Stomp, &[("accept-version", "1.2"), ("host", "/"), ("login", "guest"), ("passcode", "guest")]));
    c.expect(Command::Connected);
    // No common version.
    let (mut c, reply) = Client::connect_with(&s, &[("accept-version", "2.0,3.1")]);
    assert_eq!(reply.command, Command::Error);
    assert_eq!(reply.header("message"), Some("Version mismatch"));
    assert!(body(&reply).contains("1.0,1.1,1.2"));
    c.assert_closed();
}

#[test]
fn login_and_vhost_are_checked() {
    let s = Server::start();
    let (mut c, reply) = Client::connect_with(&s, &[("accept-version", "1.2"), ("login", "guest"), ("passcode", "nope")]);
    assert_eq!(reply.command, Command::Error);
    assert_eq!(reply.header("message"), Some("Bad CONNECT"));
    assert!(body(&reply).contains("Access refused for user 'guest'"), "{}", body(&reply));
    c.assert_closed();
    let (mut c, reply) = Client::connect_with(&s, &[("accept-version", "1.2"), ("host", "nowhere"), ("login", "guest"), ("passcode", "guest")]);
    assert_eq!(reply.command, Command::Error);
    assert!(body(&reply).contains("'nowhere'"), "{}", body(&reply));
    c.assert_closed();
    // Anything before CONNECT is refused.
    let mut c = Client::tcp(&s);
    c.send(&frame(Command::Send, &[("destination", "/queue/q")]));
    c.expect_error("Illegal command");
}

#[test]
fn receipts_follow_frames_and_disconnect_comes_last() {
    let s = Server::start();
    let mut c = Client::open(&s, "1.2");
    // Many SENDs, persistent, then DISCONNECT with a receipt: the RECEIPT
    // arrives after all of them are stored, and the messages are all there.
    for i in 0..50 {
        c.send(&frame(Command::Send, &[("destination", "/queue/r"), ("persistent", "true")]).with_body(format!("m{i}")));
    }
    c.send(&frame(Command::Send, &[("destination", "/queue/r"), ("receipt", "s-last")]).with_body("last"));
    c.send(&frame(Command::Subscribe, &[("destination", "/queue/other"), ("id", "0"), ("receipt", "sub")]));
    let r1 = c.expect(Command::Receipt);
    let r2 = c.expect(Command::Receipt);
    assert_eq!((r1.header("receipt-id"), r2.header("receipt-id")), (Some("s-last"), Some("sub")), "receipts in frame order");
    c.disconnect();
    let mut c = Client::open(&s, "1.2");
    c.subscribe("/queue/r", "r", &[]);
    for i in 0..50 {
        assert_eq!(body(&c.expect(Command::Message)), format!("m{i}"));
    }
    assert_eq!(body(&c.expect(Command::Message)), "last");
}

#[test]
fn send_and_subscribe_in_every_version() {
    let s = Server::start();
    for version in ["1.0", "1.1", "1.2"] {
        let q = format!("/queue/v{}", version.replace('.', ""));
        let mut p = Client::open(&s, version);
        let payload = b"a\0b\nc".to_vec();
        p.send(
            &frame(Command::Send, &[("destination", &q), ("content-type", "application/octet-stream"), ("x-custom", "hello"), ("receipt", "1")])
                .with_body(payload.clone()),
        );
        p.expect(Command::Receipt);
        let mut c = Client::open(&s, version);
        c.subscribe(&q, "s1", &[("ack", "client-individual")]);
        let m = c.expect(Command::Message);
        assert_eq!(m.body.as_ref(), &payload[..], "NUL and LF survive in the body");
        assert_eq!(m.header("subscription"), Some("s1"));
        assert_eq!(m.header("destination"), Some(q.as_str()));
        assert_eq!(m.header("content-type"), Some("application/octet-stream"));
        assert_eq!(m.header("content-length"), Some("5"));
        assert_eq!(m.header("x-custom"), Some("hello"));
        assert_eq!(m.header("redelivered"), Some("false"));
        let id = m.header("message-id").unwrap();
        assert!(id.starts_with("T_s1@@"), "{id}");
        assert_eq!(m.header("ack").is_some(), version == "1.2", "ack header only in 1.2");
        let ack = c.ack(Command::Ack, &m, &[]);
        c.call(ack, "acked");
        c.disconnect();
        p.disconnect();
    }
}

#[test]
fn client_individual_ack_and_nack_with_requeue() {
    let s = Server::start();
    let mut c = Client::open(&s, "1.2");
    for i in 0..3 {
        c.send_text("/queue/n", &format!("m{i}"));
    }
    c.subscribe("/queue/n", "a", &[("ack", "client-individual")]);
    let m0 = c.expect(Command::Message);
    let m1 = c.expect(Command::Message);
    let m2 = c.expect(Command::Message);
    // NACK m0 (requeue by default): it comes back flagged redelivered.
    let f = c.ack(Command::Nack, &m0, &[]);
    c.send(&f);
    let again = c.expect(Command::Message);
    assert_eq!(body(&again), "m0");
    assert_eq!(again.header("redelivered"), Some("true"));
    // NACK m1 with requeue:false drops it; ACK m2 and the redelivery.
    let f = c.ack(Command::Nack, &m1, &[("requeue", "false")]);
    c.send(&f);
    let f = c.ack(Command::Ack, &m2, &[]);
    c.send(&f);
    let f = c.ack(Command::Ack, &again, &[]);
    c.call(f, "done");
    c.quiet(Duration::from_millis(300));
    // Acking the same message twice is an error (RabbitMQ: unknown delivery tag).
    let f = c.ack(Command::Ack, &m2, &[]);
    c.send(&f);
    c.expect_error("precondition_failed");
    let mut c = Client::open(&s, "1.2");
    c.subscribe("/queue/n", "b", &[]);
    c.quiet(Duration::from_millis(300));
}

#[test]
fn client_ack_is_cumulative_and_prefetch_count_limits() {
    let s = Server::start();
    let mut c = Client::open(&s, "1.1");
    for i in 0..6 {
        c.send_text("/queue/p", &format!("m{i}"));
    }
    c.subscribe("/queue/p", "p", &[("ack", "client"), ("prefetch-count", "2")]);
    let m0 = c.expect(Command::Message);
    let m1 = c.expect(Command::Message);
    c.quiet(Duration::from_millis(300));
    // One ACK of m1 acknowledges m0 too: two more arrive.
    let f = c.ack(Command::Ack, &m1, &[]);
    c.send(&f);
    let m2 = c.expect(Command::Message);
    let m3 = c.expect(Command::Message);
    assert_eq!((body(&m0), body(&m2), body(&m3)), ("m0".into(), "m2".into(), "m3".into()));
    c.quiet(Duration::from_millis(300));
    // Disconnecting without acking requeues m2 and m3 (redelivered).
    c.disconnect();
    let mut c = Client::open(&s, "1.1");
    c.subscribe("/queue/p", "p", &[]);
    let got: Vec<(String, String)> =
        (0..4).map(|_| c.expect(Command::Message)).map(|m| (body(&m), m.header("redelivered").unwrap().to_string())).collect();
    assert_eq!(got[0], ("m2".into(), "true".into()));
    assert_eq!(got[1], ("m3".into(), "true".into()));
    assert_eq!(got[2], ("m4".into(), "false".into()));
}

#[test]
fn transactions_cover_send_ack_and_nack() {
    let s = Server::start();
    let mut c = Client::open(&s, "1.2");
    let mut r = Client::open(&s, "1.2");
    r.subscribe("/queue/t", "t", &[("ack", "client-individual")]);
    c.call(frame(Command::Begin, &[("transaction", "tx1")]), "b");
    c.send(&frame(Command::Send, &[("destination", "/queue/t"), ("transaction", "tx1")]).with_body("in-tx"));
    c.call(frame(Command::Send, &[("destination", "/queue/t"), ("transaction", "tx1")]).with_body("in-tx-2"), "s");
    r.quiet(Duration::from_millis(300));
    c.call(frame(Command::Commit, &[("transaction", "tx1")]), "c");
    let m1 = r.expect(Command::Message);
    let m2 = r.expect(Command::Message);
    assert_eq!((body(&m1), body(&m2)), ("in-tx".into(), "in-tx-2".into()));
    // ABORT drops SENDs.
    c.call(frame(Command::Begin, &[("transaction", "tx2")]), "b2");
    c.send(&frame(Command::Send, &[("destination", "/queue/t"), ("transaction", "tx2")]).with_body("aborted"));
    c.call(frame(Command::Abort, &[("transaction", "tx2")]), "a2");
    r.quiet(Duration::from_millis(300));
    // An aborted ACK leaves the message unacknowledged; a committed NACK requeues.
    r.call(frame(Command::Begin, &[("transaction", "rx")]), "rb");
    let mut f = r.ack(Command::Ack, &m1, &[("transaction", "rx")]);
    r.send(&f);
    r.call(frame(Command::Abort, &[("transaction", "rx")]), "ra");
    r.call(frame(Command::Begin, &[("transaction", "rx2")]), "rb2");
    f = r.ack(Command::Nack, &m2, &[("transaction", "rx2")]);
    r.send(&f);
    r.quiet(Duration::from_millis(200));
    r.call(frame(Command::Commit, &[("transaction", "rx2")]), "rc2");
    let again = r.expect(Command::Message);
    assert_eq!((body(&again), again.header("redelivered")), ("in-tx-2".into(), Some("true")));
    f = r.ack(Command::Ack, &m1, &[]);
    r.call(f, "ack-m1-still-unacked");
    // Unknown transactions are errors.
    c.send(&frame(Command::Commit, &[("transaction", "nope")]));
    c.expect_error("Bad transaction");
}

#[test]
fn topics_exchanges_and_durable_subscriptions() {
    let s = Server::start();
    let mut a = Client::open(&s, "1.2");
    let mut b = Client::open(&s, "1.2");
    a.subscribe("/topic/news.*", "a", &[]);
    b.subscribe("/topic/news.sport", "b", &[]);
    let mut p = Client::open(&s, "1.2");
    p.call(frame(Command::Send, &[("destination", "/topic/news.sport")]).with_body("goal"), "1");
    p.call(frame(Command::Send, &[("destination", "/topic/news.weather")]).with_body("rain"), "2");
    let m = a.expect(Command::Message);
    assert_eq!((body(&m), m.header("destination")), ("goal".into(), Some("/topic/news.sport")));
    assert_eq!(body(&a.expect(Command::Message)), "rain");
    assert_eq!(body(&b.expect(Command::Message)), "goal");
    b.quiet(Duration::from_millis(200));
    // /exchange/NAME/KEY
    a.subscribe("/exchange/amq.direct/k1", "x", &[]);
    p.call(frame(Command::Send, &[("destination", "/exchange/amq.direct/k1")]).with_body("direct"), "3");
    let m = a.expect(Command::Message);
    assert_eq!((body(&m), m.header("destination"), m.header("subscription")), ("direct".into(), Some("/exchange/amq.direct/k1"), Some("x")));
    // A durable subscription keeps messages while its subscriber is away.
    let mut d = Client::open(&s, "1.2");
    d.subscribe("/topic/alerts", "dur", &[("durable", "true"), ("auto-delete", "false")]);
    d.disconnect();
    p.call(frame(Command::Send, &[("destination", "/topic/alerts")]).with_body("while away"), "4");
    let mut d = Client::open(&s, "1.2");
    d.subscribe("/topic/alerts", "dur", &[("durable", "true"), ("auto-delete", "false")]);
    assert_eq!(body(&d.expect(Command::Message)), "while away");
    // UNSUBSCRIBE with durable:true deletes it.
    d.call(frame(Command::Unsubscribe, &[("id", "dur"), ("durable", "true")]), "u");
    p.call(frame(Command::Send, &[("destination", "/topic/alerts")]).with_body("gone"), "5");
    d.subscribe("/topic/alerts", "dur2", &[]);
    d.quiet(Duration::from_millis(200));
    // An unsubscribed subscription gets nothing more.
    b.call(frame(Command::Unsubscribe, &[("id", "b")]), "ub");
    p.call(frame(Command::Send, &[("destination", "/topic/news.sport")]).with_body("late"), "6");
    b.quiet(Duration::from_millis(200));
    b.send(&frame(Command::Unsubscribe, &[("id", "b")]));
    b.expect_error("No subscription found");
}

#[test]
fn amq_queue_temp_queue_and_destination_errors() {
    let s = Server::start();
    // /amq/queue/ does not declare.
    let mut c = Client::open(&s, "1.2");
    c.send(&frame(Command::Subscribe, &[("destination", "/amq/queue/missing"), ("id", "1")]));
    let e = c.expect_error("not_found");
    assert!(body(&e).contains("no queue 'missing'"), "{}", body(&e));
    let mut c = Client::open(&s, "1.2");
    c.send(&frame(Command::Send, &[("destination", "/nowhere/x")]));
    let e = c.expect_error("Unknown destination");
    assert!(body(&e).contains("/amq/queue/"), "{}", body(&e));
    let mut c = Client::open(&s, "1.2");
    c.send(&frame(Command::Send, &[]));
    c.expect_error("Missing destination");
    // /temp-queue/ in reply-to: rewritten to /reply-queue/..., and the
    // reply comes back on the subscription named after the temp queue.
    let mut server = Client::open(&s, "1.2");
    server.subscribe("/queue/svc", "svc", &[]);
    let mut client = Client::open(&s, "1.2");
    client.call(
        frame(Command::Send, &[("destination", "/queue/svc"), ("reply-to", "/temp-queue/answers")]).with_body("ping"),
        "req",
    );
    let req = server.expect(Command::Message);
    let reply_to = req.header("reply-to").unwrap().to_string();
    assert!(reply_to.starts_with("/reply-queue/amq.gen-"), "{reply_to}");
    server.call(frame(Command::Send, &[("destination", &reply_to)]).with_body("pong"), "rep");
    let m = client.expect(Command::Message);
    assert_eq!((body(&m), m.header("subscription")), ("pong".into(), Some("/temp-queue/answers")));
}

#[test]
fn queue_arguments_come_from_headers() {
    let s = Server::start();
    let mut c = Client::open(&s, "1.2");
    c.call(frame(Command::Send, &[("destination", "/queue/args"), ("x-max-length", "10"), ("x-message-ttl", "60000")]), "1");
    // x-queue-name names a topic subscription's queue.
    c.subscribe("/topic/named", "n", &[("x-queue-name", "my-sub-queue")]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (_conn, ch) = open(&s).await;
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(10));
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(60000));
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        ch.queue_declare("args".into(), durable, args).await.expect("same arguments are equivalent");
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        ch.queue_declare("my-sub-queue".into(), passive, FieldTable::default()).await.expect("x-queue-name");
        let err = ch.queue_declare("args".into(), durable, FieldTable::default()).await.unwrap_err();
        assert_eq!(code(&err), 406);
    });
}

#[test]
fn heart_beats_are_sent_and_enforced() {
    let s = Server::start();
    // We want the server's every 200 ms; we send none.
    let (mut c, reply) = Client::connect_with(&s, &[("accept-version", "1.2"), ("host", "/"), ("heart-beat", "0,200")]);
    assert_eq!(reply.header("heart-beat"), Some("200,0"));
    let start = Instant::now();
    let mut beats = 0;
    while start.elapsed() < Duration::from_millis(1100) {
        if let Ok(Some(Item::Heartbeat)) = c.item(Duration::from_millis(500)) {
            beats += 1;
        }
    }
    assert!((3..=8).contains(&beats), "{beats} heart-beats in 1.1 s at 200 ms");
    // We promise one every 200 ms (the server agrees) and stay silent: closed.
    let (mut c, reply) = Client::connect_with(&s, &[("accept-version", "1.2"), ("host", "/"), ("heart-beat", "200,0")]);
    assert_eq!(reply.header("heart-beat"), Some("0,200"));
    let start = Instant::now();
    c.assert_closed();
    assert!(start.elapsed() < Duration::from_secs(2), "closed after {:?}", start.elapsed());
    // A client that does send EOLs stays connected.
    let (mut c, _) = Client::connect_with(&s, &[("accept-version", "1.2"), ("host", "/"), ("heart-beat", "200,0")]);
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(100));
        c.raw(b"\n");
    }
    c.disconnect();
}

#[test]
fn bad_input_gets_an_error_frame_then_close() {
    let s = Server::start();
    let cases: &[(&[u8], &str)] = &[
        (b"FOO\n\n\0", "Bad command"),
        (b"SEND\ndestination:/queue/a\ncontent-length:x\n\n\0", "Invalid frame"),
        (b"SEND\nno colon here\n\n\0", "Invalid frame"),
        (b"SEND\ndestination:/queue/a\ncontent-length:1\n\nab\0", "Invalid frame"),
        (b"SEND\nbad:esc\\tape\n\n\0", "Bad header escape"),
    ];
    for (bytes, message) in cases {
        let mut c = Client::open(&s, "1.2");
        c.raw(bytes);
        c.expect_error(message);
    }
    // Before CONNECT too, and an oversized frame.
    let mut c = Client::tcp(&s);
    c.raw(b"CONNECT\nbad\n\n\0");
    c.expect_error("Invalid frame");
    let mut c = Client::open(&s, "1.2");
    c.raw(format!("SEND\ndestination:/queue/a\ncontent-length:{}\n\n", 5 * 1024 * 1024).as_bytes());
    c.expect_error("Frame too large");
    // A server frame from a client, and a second CONNECT.
    let mut c = Client::open(&s, "1.2");
    c.send(&frame(Command::Message, &[]));
    c.expect_error("Bad command");
    let mut c = Client::open(&s, "1.2");
    c.send(&frame(Command::Connect, &[]));
    c.expect_error("Bad CONNECT");
    // A client that disappears mid-frame costs nothing.
    let mut c = Client::open(&s, "1.2");
    c.raw(b"SEND\ndestination:/queue/a\n");
    drop(c);
    let c = Client::open(&s, "1.2");
    c.disconnect();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stomp_and_amqp_exchange_messages_with_properties_and_headers() {
    let s = Server::start();
    // STOMP → AMQP
    let mut c = Client::open(&s, "1.2");
    c.call(
        frame(
            Command::Send,
            &[
                ("destination", "/queue/interop"),
                ("content-type", "text/plain"),
                ("content-encoding", "utf-8"),
                ("correlation-id", "c-1"),
                ("reply-to", "replies"),
                ("expiration", "60000"),
                ("priority", "4"),
                ("persistent", "true"),
                ("amqp-message-id", "m-1"),
                ("timestamp", "1700000000"),
                ("type", "greeting"),
                ("user-id", "guest"),
                ("app-id", "stomp-test"),
                ("x-trace", "abc"),
            ],
        )
        .with_body("from stomp"),
        "sent",
    );
    let (_conn, ch) = open(&s).await;
    let m = ch.basic_get("interop".into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("a message");
    let p = &m.delivery.properties;
    assert_eq!(m.delivery.data, b"from stomp");
    assert_eq!(p.content_type().as_ref().map(|v| v.as_str()), Some("text/plain"));
    assert_eq!(p.content_encoding().as_ref().map(|v| v.as_str()), Some("utf-8"));
    assert_eq!(p.correlation_id().as_ref().map(|v| v.as_str()), Some("c-1"));
    assert_eq!(p.reply_to().as_ref().map(|v| v.as_str()), Some("replies"));
    assert_eq!(p.expiration().as_ref().map(|v| v.as_str()), Some("60000"));
    assert_eq!(*p.priority(), Some(4));
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(p.message_id().as_ref().map(|v| v.as_str()), Some("m-1"));
    assert_eq!(*p.timestamp(), Some(1_700_000_000));
    assert_eq!(p.kind().as_ref().map(|v| v.as_str()), Some("greeting"));
    assert_eq!(p.user_id().as_ref().map(|v| v.as_str()), Some("guest"));
    assert_eq!(p.app_id().as_ref().map(|v| v.as_str()), Some("stomp-test"));
    let headers = p.headers().as_ref().expect("headers");
    assert_eq!(headers.inner().get("x-trace"), Some(&AMQPValue::LongString("abc".into())));
    assert!(headers.inner().get("receipt").is_none() && headers.inner().get("destination").is_none());

    // AMQP → STOMP
    c.subscribe("/queue/back", "b", &[]);
    let mut h = FieldTable::default();
    h.insert("x-str".into(), AMQPValue::LongString("v".into()));
    h.insert("x-int".into(), AMQPValue::LongInt(-7));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_correlation_id("c-2".into())
        .with_reply_to("amq.gen-abc".into())
        .with_message_id("m-2".into())
        .with_priority(2)
        .with_delivery_mode(2)
        .with_timestamp(1_700_000_001)
        .with_type("t".into())
        .with_app_id("amqp-test".into())
        .with_headers(h);
    ch.basic_publish("".into(), "back".into(), BasicPublishOptions::default(), b"{\"from\":\"amqp\"}", props).await.unwrap();
    let m = tokio::task::spawn_blocking(move || c.expect(Command::Message)).await.unwrap();
    assert_eq!(body(&m), "{\"from\":\"amqp\"}");
    for (k, v) in [
        ("destination", "/queue/back"),
        ("content-type", "application/json"),
        ("correlation-id", "c-2"),
        ("reply-to", "/reply-queue/amq.gen-abc"),
        ("amqp-message-id", "m-2"),
        ("priority", "2"),
        ("persistent", "true"),
        ("timestamp", "1700000001"),
        ("type", "t"),
        ("app-id", "amqp-test"),
        ("x-str", "v"),
        ("x-int", "-7"),
    ] {
        assert_eq!(m.header(k), Some(v), "{k} in {m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_consumer_receives_stomp_sends_and_user_id_is_checked() {
    let s = Server::start();
    let (_conn, ch) = open(&s).await;
    declare_durable(&ch, "work").await;
    let got = tokio::spawn({
        let ch = ch.clone();
        async move { consume_n(&ch, "work", 20).await }
    });
    let stomp = s.stomp_addr();
    tokio::task::spawn_blocking(move || {
        let mut c = Client::open_at(stomp, "1.1");
        for i in 0..20 {
            c.send_text("/queue/work", &format!("w{i}"));
        }
        // user-id must name the logged-in user, as over AMQP.
        c.send(&frame(Command::Send, &[("destination", "/queue/work"), ("user-id", "mallory")]));
        let e = c.expect_error("precondition_failed");
        assert!(body(&e).contains("user_id property set to 'mallory'"), "{}", body(&e));
    })
    .await
    .unwrap();
    let bodies = got.await.unwrap();
    let want: Vec<Vec<u8>> = (0..20).map(|i| format!("w{i}").into_bytes()).collect();
    assert_eq!(bodies, want);
}

#[test]
fn dead_letter_and_deduplication_arguments_from_subscribe_headers() {
    let s = Server::start();
    let mut c = Client::open(&s, "1.2");
    // The dead-letter queue first (a SUBSCRIBE declares it), then the
    // source with its dead-letter arguments as headers.
    c.subscribe("/queue/x.dlq", "dl", &[("ack", "auto")]);
    c.subscribe(
        "/queue/x",
        "src",
        &[("ack", "client-individual"), ("x-dead-letter-exchange", ""), ("x-dead-letter-routing-key", "x.dlq")],
    );
    // /amq/queue/ does not declare (a /queue/ SEND without the same
    // arguments would be a different definition).
    let mut early =
        c.call_collecting(frame(Command::Send, &[("destination", "/amq/queue/x"), ("persistent", "true")]).with_body(b"poison".to_vec()), "sent");
    let m = c.message_after(&mut early);
    assert_eq!(m.header("subscription"), Some("src"));
    assert_eq!(body(&m), "poison");
    // NACK requeue:false dead-letters it (a plain NACK requeues, as in RabbitMQ).
    let f = c.ack(Command::Nack, &m, &[("requeue", "false")]);
    c.send(&f);
    let dl = c.expect(Command::Message);
    assert_eq!(dl.header("subscription"), Some("dl"), "{dl:?}");
    assert_eq!(body(&dl), "poison");
    assert_eq!(dl.header("destination"), Some("/queue/x.dlq"), "{dl:?}");
    // x-death is an array of tables: not a STOMP header (RabbitMQ leaves
    // such headers out too); the x-first-death-* strings are.
    assert_eq!(dl.header("x-first-death-reason"), Some("rejected"), "{dl:?}");
    assert_eq!(dl.header("x-first-death-queue"), Some("x"), "{dl:?}");
    assert_eq!(dl.header("x-first-death-exchange"), Some(""), "{dl:?}");
    assert_eq!(dl.header("x-death"), None, "{dl:?}");
    c.quiet(Duration::from_millis(300));
    // And the source is empty: a new subscriber gets nothing.
    let mut other = Client::open(&s, "1.2");
    other.subscribe("/amq/queue/x", "again", &[]);
    other.quiet(Duration::from_millis(300));

    // x-message-deduplication as a SUBSCRIBE header.
    c.subscribe("/queue/d", "dd", &[("x-message-deduplication", "true")]);
    let mut early = Vec::new();
    for (i, text) in ["first", "second"].iter().enumerate() {
        let f = frame(Command::Send, &[("destination", "/amq/queue/d"), ("amqp-message-id", "same-id")]).with_body(text.as_bytes().to_vec());
        early.extend(c.call_collecting(f, &format!("d{i}")));
    }
    let m = c.message_after(&mut early);
    assert!(early.is_empty(), "one message only: {early:?}");
    assert_eq!(body(&m), "first");
    assert_eq!(m.header("amqp-message-id"), Some("same-id"));
    c.quiet(Duration::from_millis(500));
    // The queue really has the argument (an AMQP declare without it is refused).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (_conn, ch) = open(&s).await;
        let mut args = FieldTable::default();
        args.insert("x-message-deduplication".into(), AMQPValue::Boolean(true));
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        ch.queue_declare("d".into(), durable, args).await.expect("same arguments are equivalent");
        let err = ch.queue_declare("d".into(), durable, FieldTable::default()).await.unwrap_err();
        assert_eq!(code(&err), 406);
    });
    c.disconnect();
}

#[test]
fn consumer_timeout_ends_the_session_with_an_error_and_requeues() {
    let s = Server::start_with(&["--consumer-timeout", "400"]);
    let mut c = Client::open(&s, "1.2");
    c.send_text("/queue/slow", "job");
    c.subscribe("/queue/slow", "lazy", &[("ack", "client")]);
    let m = c.expect(Command::Message);
    assert_eq!(body(&m), "job");
    // Never acked: ERROR within the timeout plus the once-a-second check.
    let start = Instant::now();
    let err = c.expect_error("consumer timeout");
    assert!(body(&err).contains("delivery acknowledgement timed out"), "{}", body(&err));
    assert!(start.elapsed() < Duration::from_secs(5));
    // The message is back, redelivered.
    let mut again = Client::open(&s, "1.2");
    again.subscribe("/queue/slow", "b", &[("ack", "client")]);
    let m = again.expect(Command::Message);
    assert_eq!(body(&m), "job");
    assert_eq!(m.header("redelivered"), Some("true"));
    let f = again.ack(Command::Ack, &m, &[]);
    again.call(f, "acked");
    // Auto-ack subscriptions hold nothing: no timeout.
    again.send_text("/queue/auto", "x");
    let mut auto = Client::open(&s, "1.2");
    auto.subscribe("/queue/auto", "a", &[]);
    auto.expect(Command::Message);
    auto.quiet(Duration::from_millis(1500));
    auto.disconnect();
}
