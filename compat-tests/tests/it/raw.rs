//! Protocol-level behaviour checked with raw frames over a plain socket:
//! wrong protocol headers, framing errors, heartbeats, unknown methods.
//! (The frames are built with sluice's codec; the subject is the server.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sluice_codecs::amqp::*;

use crate::common::Server;

pub(crate) struct Raw {
    pub(crate) sock: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub(crate) fn connect(s: &Server) -> Raw {
        let sock = TcpStream::connect(s.amqp).unwrap();
        // Frames go out in separate writes: without this, Nagle and the
        // peer's delayed ACK hold a login for 40 ms.
        sock.set_nodelay(true).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { sock, buf: BytesMut::new() }
    }

    pub(crate) fn send(&mut self, f: &Frame) {
        let mut out = BytesMut::new();
        encode_frame(f, &mut out);
        self.sock.write_all(&out).unwrap();
    }

    pub(crate) fn method(&mut self, channel: u16, m: Method) {
        self.send(&Frame::Method { channel, method: m });
    }

    /// Next frame, or None on EOF.
    pub(crate) fn read(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = decode_frame(&mut self.buf, 0).unwrap() {
                return Some(f);
            }
            let mut tmp = [0u8; 65536];
            let n = self.sock.read(&mut tmp).ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    pub(crate) fn read_method(&mut self) -> Method {
        loop {
            match self.read().expect("connection closed while waiting for a method") {
                Frame::Method { method, .. } => return method,
                _ => continue,
            }
        }
    }

    /// Protocol header, connection.start, and a start-ok with `mechanism`
    /// and `response`; returns the server's next method (tune on success).
    fn start(s: &Server, mechanism: &str, response: bytes::Bytes) -> (Raw, Method) {
        Raw::start_with(s, mechanism, response, FieldTable::default())
    }

    fn start_with(s: &Server, mechanism: &str, response: bytes::Bytes, client_properties: FieldTable) -> (Raw, Method) {
        let mut r = Raw::connect(s);
        r.sock.write_all(&PROTOCOL_HEADER).unwrap();
        assert!(matches!(r.read_method(), Method::ConnectionStart(_)));
        r.method(0, Method::ConnectionStartOk(ConnectionStartOk {
            client_properties,
            mechanism: mechanism.into(),
            response,
            locale: "en_US".into(),
        }));
        let next = r.read_method();
        (r, next)
    }

    /// Handshake with PLAIN guest/guest and the given heartbeat.
    fn open(s: &Server, heartbeat: u16) -> Raw {
        Raw::open_with(s, heartbeat, FieldTable::default())
    }

    /// Handshake with PLAIN guest/guest, `heartbeat` and `client_properties`.
    pub(crate) fn open_with(s: &Server, heartbeat: u16, client_properties: FieldTable) -> Raw {
        let (mut r, next) = Raw::start_with(s, "PLAIN", bytes::Bytes::from_static(b"\0guest\0guest"), client_properties);
        let Method::ConnectionTune(t) = next else { panic!("expected tune") };
        r.method(0, Method::ConnectionTuneOk(ConnectionTuneOk { channel_max: t.channel_max, frame_max: t.frame_max, heartbeat }));
        r.method(0, Method::ConnectionOpen(ConnectionOpen { virtual_host: "/".into(), ..Default::default() }));
        assert!(matches!(r.read_method(), Method::ConnectionOpenOk(_)));
        r
    }

    /// Reads until connection.close and returns its reply code.
    pub(crate) fn expect_close(&mut self) -> u16 {
        loop {
            match self.read() {
                Some(Frame::Method { method: Method::ConnectionClose(c), .. }) => {
                    self.method(0, Method::ConnectionCloseOk(ConnectionCloseOk {}));
                    return c.reply_code;
                }
                Some(_) => continue,
                None => panic!("socket closed without connection.close"),
            }
        }
    }
}

#[test]
fn wrong_protocol_header_gets_ours_back_and_close() {
    let s = Server::start();
    for bad in [&b"AMQP\x01\x01\x00\x09"[..], b"GET / HTTP/1.1\r\n\r\n", b"AMQP\x00\x00\x08\x00"] {
        let mut r = Raw::connect(&s);
        r.sock.write_all(bad).unwrap();
        let mut got = Vec::new();
        r.sock.read_to_end(&mut got).unwrap();
        assert_eq!(got, PROTOCOL_HEADER, "reply to {bad:?}");
    }
}

#[test]
fn bad_frame_end_is_501() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    let mut out = BytesMut::new();
    encode_method_frame(1, &Method::ChannelOpen(ChannelOpen::default()), &mut out);
    let last = out.len() - 1;
    out[last] = 0x00;
    r.sock.write_all(&out).unwrap();
    assert_eq!(r.expect_close(), 501);
}

#[test]
fn frame_larger_than_frame_max_is_501() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    // type 3 (body) on channel 1, declared size 10 MiB > 128 KiB frame_max.
    let mut hdr = vec![3u8, 0, 1];
    hdr.extend_from_slice(&(10u32 * 1024 * 1024).to_be_bytes());
    r.sock.write_all(&hdr).unwrap();
    assert_eq!(r.expect_close(), 501);
}

#[test]
fn content_header_without_method_is_505() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    r.method(1, Method::ChannelOpen(ChannelOpen::default()));
    assert!(matches!(r.read_method(), Method::ChannelOpenOk(_)));
    r.send(&Frame::Header { channel: 1, class_id: 60, body_size: 3, properties: Box::default() });
    assert_eq!(r.expect_close(), 505);
}

#[test]
fn body_longer_than_declared_is_505() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    r.method(1, Method::ChannelOpen(ChannelOpen::default()));
    assert!(matches!(r.read_method(), Method::ChannelOpenOk(_)));
    r.method(1, Method::BasicPublish(BasicPublish { routing_key: "q".into(), ..Default::default() }));
    r.send(&Frame::Header { channel: 1, class_id: 60, body_size: 2, properties: Box::default() });
    r.send(&Frame::Body { channel: 1, payload: bytes::Bytes::from_static(b"abcdef") });
    assert_eq!(r.expect_close(), 505);
}

#[test]
fn method_on_unopened_channel_is_504() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    r.method(7, Method::BasicQos(BasicQos { prefetch_count: 1, ..Default::default() }));
    assert_eq!(r.expect_close(), 504);
}

#[test]
fn unknown_method_is_540() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    // class 60, method 999 with no arguments.
    let mut f = vec![1u8, 0, 1, 0, 0, 0, 4];
    f.extend_from_slice(&60u16.to_be_bytes());
    f.extend_from_slice(&999u16.to_be_bytes());
    f.push(0xCE);
    r.sock.write_all(&f).unwrap();
    assert_eq!(r.expect_close(), 540);
}

#[test]
fn prefetch_size_is_540() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    r.method(1, Method::ChannelOpen(ChannelOpen::default()));
    assert!(matches!(r.read_method(), Method::ChannelOpenOk(_)));
    r.method(1, Method::BasicQos(BasicQos { prefetch_size: 4096, prefetch_count: 1, global: false }));
    assert_eq!(r.expect_close(), 540);
}

#[test]
fn server_sends_heartbeats_and_drops_silent_clients() {
    let s = Server::start();
    let mut r = Raw::open(&s, 1);
    let start = Instant::now();
    let mut heartbeats = 0;
    loop {
        match r.read() {
            Some(Frame::Heartbeat { channel: 0 }) => heartbeats += 1,
            Some(other) => panic!("unexpected {other:?}"),
            None => break,
        }
        assert!(start.elapsed() < Duration::from_secs(8), "silent client was not dropped");
    }
    assert!(heartbeats >= 1, "the server must send heartbeats");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(1500), "dropped too early: {waited:?}");
}

#[test]
fn second_channel_open_is_504_and_channel_max_is_enforced() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    r.method(1, Method::ChannelOpen(ChannelOpen::default()));
    assert!(matches!(r.read_method(), Method::ChannelOpenOk(_)));
    r.method(1, Method::ChannelOpen(ChannelOpen::default()));
    assert_eq!(r.expect_close(), 504);
    let mut r = Raw::open(&s, 0);
    r.method(4000, Method::ChannelOpen(ChannelOpen::default()));
    assert_eq!(r.expect_close(), 504);
}

#[test]
fn amqplain_login_works() {
    let s = Server::start();
    let mut t = FieldTable::default();
    t.insert("LOGIN", FieldValue::LongString(bytes::Bytes::from_static(b"guest")));
    t.insert("PASSWORD", FieldValue::LongString(bytes::Bytes::from_static(b"guest")));
    let mut enc = BytesMut::new();
    t.encode(&mut enc);
    let response = enc.split_off(4).freeze(); // AMQPLAIN: the table without its length
    let (_r, next) = Raw::start(&s, "AMQPLAIN", response);
    assert!(matches!(next, Method::ConnectionTune(_)));
}

#[test]
fn channel_flow_pauses_deliveries() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    r.method(1, Method::ChannelOpen(ChannelOpen::default()));
    assert!(matches!(r.read_method(), Method::ChannelOpenOk(_)));
    r.method(1, Method::QueueDeclare(QueueDeclare { queue: "fq".into(), ..Default::default() }));
    assert!(matches!(r.read_method(), Method::QueueDeclareOk(_)));
    r.method(1, Method::ChannelFlow(ChannelFlow { active: false }));
    assert!(matches!(r.read_method(), Method::ChannelFlowOk(ChannelFlowOk { active: false })));
    r.method(1, Method::BasicConsume(BasicConsume { queue: "fq".into(), consumer_tag: "c".into(), no_ack: true, ..Default::default() }));
    assert!(matches!(r.read_method(), Method::BasicConsumeOk(_)));
    let mut out = BytesMut::new();
    encode_method_frame(1, &Method::BasicPublish(BasicPublish { routing_key: "fq".into(), ..Default::default() }), &mut out);
    encode_content(1, 60, &BasicProperties::default(), b"m", 131072, &mut out);
    r.sock.write_all(&out).unwrap();
    r.sock.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
    if let Some(f) = r.read() {
        panic!("no delivery may arrive while flow is off, got {f:?}");
    }
    r.sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    r.method(1, Method::ChannelFlow(ChannelFlow { active: true }));
    assert!(matches!(r.read_method(), Method::ChannelFlowOk(ChannelFlowOk { active: true })));
    assert!(matches!(r.read_method(), Method::BasicDeliver(_)));
}

#[test]
fn truncated_arguments_are_501_and_invalid_utf8_is_502() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    r.method(1, Method::ChannelOpen(ChannelOpen::default()));
    assert!(matches!(r.read_method(), Method::ChannelOpenOk(_)));
    // queue.declare whose arguments stop after one byte.
    let f = [1u8, 0, 1, 0, 0, 0, 5, 0, 50, 0, 10, 0, 0xCE];
    r.sock.write_all(&f).unwrap();
    assert_eq!(r.expect_close(), 501);

    let mut r = Raw::open(&s, 0);
    r.method(1, Method::ChannelOpen(ChannelOpen::default()));
    assert!(matches!(r.read_method(), Method::ChannelOpenOk(_)));
    // basic.cancel with a consumer tag that is not UTF-8.
    let mut payload = vec![0u8, 60, 0, 30, 2, 0xff, 0xfe, 0];
    let mut f = vec![1u8, 0, 1];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.append(&mut payload);
    f.push(0xCE);
    r.sock.write_all(&f).unwrap();
    assert_eq!(r.expect_close(), 502);
}

#[test]
fn heartbeat_on_a_channel_is_505() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    r.send(&Frame::Heartbeat { channel: 1 });
    assert_eq!(r.expect_close(), 505);
}

#[test]
fn server_only_method_from_a_client_is_503() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    r.method(1, Method::ChannelOpen(ChannelOpen::default()));
    assert!(matches!(r.read_method(), Method::ChannelOpenOk(_)));
    r.method(1, Method::QueueDeclareOk(QueueDeclareOk { queue: "q".into(), message_count: 0, consumer_count: 0 }));
    assert_eq!(r.expect_close(), 503);
}

#[test]
fn tune_ok_outside_the_offer_is_530() {
    let s = Server::start();
    for (channel_max, frame_max) in [(2047u16, 1024u32), (2047, 1 << 30), (9999, 131072)] {
        let (mut r, next) = Raw::start(&s, "PLAIN", bytes::Bytes::from_static(b"\0guest\0guest"));
        assert!(matches!(next, Method::ConnectionTune(_)));
        r.method(0, Method::ConnectionTuneOk(ConnectionTuneOk { channel_max, frame_max, heartbeat: 0 }));
        assert_eq!(r.expect_close(), 530, "channel_max {channel_max} frame_max {frame_max}");
    }
}

#[test]
fn server_properties_advertise_the_capabilities_clients_check() {
    let s = Server::start();
    let mut r = Raw::connect(&s);
    r.sock.write_all(&PROTOCOL_HEADER).unwrap();
    let Method::ConnectionStart(start) = r.read_method() else { panic!("expected connection.start") };
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    let mechanisms = String::from_utf8(start.mechanisms.to_vec()).unwrap();
    assert!(mechanisms.split(' ').any(|m| m == "PLAIN") && mechanisms.split(' ').any(|m| m == "AMQPLAIN"), "{mechanisms}");
    let caps = start.server_properties.get("capabilities").and_then(|c| c.as_table()).expect("capabilities table");
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "per_consumer_qos",
        "authentication_failure_close",
    ] {
        assert_eq!(caps.get(cap).and_then(|v| v.as_bool()), Some(true), "capability {cap}");
    }
}

#[test]
fn update_secret_is_acknowledged() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    r.method(0, Method::ConnectionUpdateSecret(ConnectionUpdateSecret { new_secret: bytes::Bytes::from_static(b"x"), reason: "rotate".into() }));
    assert!(matches!(r.read_method(), Method::ConnectionUpdateSecretOk(_)));
}

#[test]
fn sigterm_sends_connection_close_320_and_exits_0() {
    let mut s = Server::start();
    let mut r = Raw::open(&s, 0);
    let pid = s.pid() as i32;
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    assert_eq!(r.expect_close(), 320);
    let status = s.terminate().expect("exit status");
    assert!(status.success(), "{status:?}");
}

#[test]
fn no_confirm_arrives_after_the_channel_is_closed() {
    let s = Server::start();
    let mut r = Raw::open(&s, 0);
    r.method(1, Method::ChannelOpen(ChannelOpen::default()));
    assert!(matches!(r.read_method(), Method::ChannelOpenOk(_)));
    r.method(1, Method::QueueDeclare(QueueDeclare { queue: "cq".into(), durable: true, ..Default::default() }));
    assert!(matches!(r.read_method(), Method::QueueDeclareOk(_)));
    r.method(1, Method::ConfirmSelect(ConfirmSelect { nowait: false }));
    assert!(matches!(r.read_method(), Method::ConfirmSelectOk(_)));
    // 300 persistent publishes and the close in one write: most confirms
    // are still waiting for fsync when the close arrives.
    let mut out = BytesMut::new();
    let props = BasicProperties { delivery_mode: Some(2), ..Default::default() };
    for _ in 0..300 {
        encode_method_frame(1, &Method::BasicPublish(BasicPublish { routing_key: "cq".into(), ..Default::default() }), &mut out);
        encode_content(1, 60, &props, &[7u8; 512], 131072, &mut out);
    }
    encode_method_frame(1, &Method::ChannelClose(ChannelClose { reply_code: 200, ..Default::default() }), &mut out);
    r.sock.write_all(&out).unwrap();
    loop {
        match r.read().expect("connection closed") {
            Frame::Method { channel: 1, method: Method::ChannelCloseOk(_) } => break,
            Frame::Method { channel: 1, method: Method::BasicAck(_) } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    r.sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    if let Some(f) = r.read() {
        panic!("frame after channel.close-ok: {f:?}");
    }
}

#[test]
fn deliveries_in_flight_when_the_client_closes_are_requeued() {
    let s = Server::start();
    for round in 0..20 {
        let q = format!("inflight-{round}");
        let mut r = Raw::open(&s, 0);
        r.method(1, Method::ChannelOpen(ChannelOpen::default()));
        assert!(matches!(r.read_method(), Method::ChannelOpenOk(_)));
        r.method(1, Method::QueueDeclare(QueueDeclare { queue: q.clone(), ..Default::default() }));
        assert!(matches!(r.read_method(), Method::QueueDeclareOk(_)));
        let mut out = BytesMut::new();
        for _ in 0..3 {
            encode_method_frame(1, &Method::BasicPublish(BasicPublish { routing_key: q.clone(), ..Default::default() }), &mut out);
            encode_content(1, 60, &BasicProperties::default(), b"m", 131072, &mut out);
        }
        encode_method_frame(1, &Method::BasicQos(BasicQos { prefetch_count: 1, ..Default::default() }), &mut out);
        r.sock.write_all(&out).unwrap();
        assert!(matches!(r.read_method(), Method::BasicQosOk(_)));
        r.method(1, Method::BasicConsume(BasicConsume { queue: q.clone(), consumer_tag: "c".into(), ..Default::default() }));
        assert!(matches!(r.read_method(), Method::BasicConsumeOk(_)));
        let Method::BasicDeliver(d) = r.read_method() else { panic!("expected a delivery") };
        // Ack and close in one write: the ack releases credit, the queue
        // dispatches the next message, and the close races it.
        let mut out = BytesMut::new();
        encode_method_frame(1, &Method::BasicAck(BasicAck { delivery_tag: d.delivery_tag, multiple: false }), &mut out);
        encode_method_frame(0, &Method::ConnectionClose(ConnectionClose { reply_code: 200, ..Default::default() }), &mut out);
        r.sock.write_all(&out).unwrap();
        loop {
            match r.read() {
                Some(Frame::Method { method: Method::ConnectionCloseOk(_), .. }) | None => break,
                Some(_) => {}
            }
        }
        // Two messages are left and both must be ready again.
        let mut check = Raw::open(&s, 0);
        check.method(1, Method::ChannelOpen(ChannelOpen::default()));
        assert!(matches!(check.read_method(), Method::ChannelOpenOk(_)));
        let mut ready = 0;
        for _ in 0..100 {
            check.method(1, Method::QueueDeclare(QueueDeclare { queue: q.clone(), passive: true, ..Default::default() }));
            let Method::QueueDeclareOk(ok) = check.read_method() else { panic!("expected declare-ok") };
            ready = ok.message_count;
            if ready == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(ready, 2, "round {round}: a delivery in flight at close was lost");
    }
}

#[test]
fn a_client_that_never_reads_cannot_grow_broker_memory() {
    let s = Server::start();
    let pid = s.pid();
    let rss_kib = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap()
    };
    let before = rss_kib();
    let mut r = Raw::open(&s, 0);
    r.method(1, Method::ChannelOpen(ChannelOpen::default()));
    assert!(matches!(r.read_method(), Method::ChannelOpenOk(_)));
    // 64 KiB mandatory publishes with no route: each comes back as a
    // basic.return, which this client never reads. 4000 of them would be
    // 256 MiB of returns if the broker kept reading.
    let mut frame = BytesMut::new();
    encode_method_frame(1, &Method::BasicPublish(BasicPublish { exchange: "amq.direct".into(), routing_key: "nowhere".into(), mandatory: true, ..Default::default() }), &mut frame);
    encode_content(1, 60, &BasicProperties::default(), &[0u8; 64 * 1024], 131072, &mut frame);
    let frame = frame.freeze();
    let mut sock = r.sock.try_clone().unwrap();
    sock.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let writer = std::thread::spawn(move || {
        let mut sent = 0u32;
        for _ in 0..4000 {
            if sock.write_all(&frame).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let sent = writer.join().unwrap();
    assert!(sent < 4000, "the broker kept reading {sent} publishes whose returns nobody reads");
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 100, "broker RSS grew by {grown_mib} MiB");
    // Other clients are still served.
    let mut other = Raw::open(&s, 0);
    other.method(1, Method::ChannelOpen(ChannelOpen::default()));
    assert!(matches!(other.read_method(), Method::ChannelOpenOk(_)));
}
