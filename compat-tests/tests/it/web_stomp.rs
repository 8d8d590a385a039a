//! STOMP over WebSocket (Web-STOMP) against the real binary, with a raw
//! WebSocket client built on the codec crate: the upgrade (path,
//! subprotocols, refusals), framing (several or partial frames per
//! message, fragments, ping/pong, close, masking, size limit), and
//! sessions over WebSocket interoperating with STOMP over TCP and AMQP.
//! @stomp/stompjs in Node is in `clients.rs`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use lapin::options::*;
use lapin::BasicProperties;
use sluice_codecs::stomp::{encode_frame, Command, Decoder, Frame, Item, Limits, Version};
use sluice_codecs::ws::{self, Message, MessageDecoder, Opcode, Role};

use crate::common::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

fn frame(command: Command, headers: &[(&str, &str)]) -> Frame {
    let mut f = Frame::new(command);
    for (k, v) in headers {
        f.headers.push((k.to_string(), v.to_string()));
    }
    f
}

fn upgrade_request(path: &str, protocols: Option<&str>) -> String {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(p) = protocols {
        r.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    r.push_str("\r\n");
    r
}

/// Sends `request` and reads the response head (and whatever followed it).
fn http(addr: SocketAddr, request: &str) -> (TcpStream, String, BytesMut) {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_nodelay(true).unwrap();
    sock.write_all(request.as_bytes()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end + 4].to_vec()).unwrap();
            return (sock, head, BytesMut::from(&buf[end + 4..]));
        }
        let n = sock.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before a response head: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A STOMP client over TCP or over WebSocket.
struct Client {
    sock: TcpStream,
    /// WebSocket decoder; `None` for plain TCP.
    ws: Option<MessageDecoder>,
    wsbuf: BytesMut,
    dec: Decoder,
    buf: BytesMut,
    version: Version,
    /// Control frames and the kinds of data messages received, in order.
    seen: Vec<Message>,
    closed: Option<Option<(u16, String)>>,
}

impl Client {
    fn ws(addr: SocketAddr, protocols: Option<&str>) -> (Client, String) {
        let (sock, head, rest) = http(addr, &upgrade_request("/ws", protocols));
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        let c = Client {
            sock,
            ws: Some(MessageDecoder::new(Role::Client, 16 << 20)),
            wsbuf: rest,
            dec: Decoder::new(Version::V1_0, Limits::default()),
            buf: BytesMut::new(),
            version: Version::V1_0,
            seen: Vec::new(),
            closed: None,
        };
        (c, head)
    }

    fn tcp(addr: SocketAddr) -> Client {
        let sock = TcpStream::connect(addr).unwrap();
        Client {
            sock,
            ws: None,
            wsbuf: BytesMut::new(),
            dec: Decoder::new(Version::V1_0, Limits::default()),
            buf: BytesMut::new(),
            version: Version::V1_0,
            seen: Vec::new(),
            closed: None,
        }
    }

    fn login(mut self, version: &str) -> Client {
        self.send(&frame(Command::Connect, &[("accept-version", version), ("host", "/"), ("login", "guest"), ("passcode", "guest")]));
        let reply = self.expect(Command::Connected);
        let v: Version = reply.header("version").unwrap().parse().unwrap();
        self.version = v;
        self.dec.version = v;
        self
    }

    fn encode(&self, f: &Frame) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_frame(f, self.version, &mut out).unwrap();
        out.to_vec()
    }

    /// Writes raw bytes on the socket.
    fn raw(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    /// One WebSocket frame, masked.
    fn ws_frame(&mut self, fin: bool, opcode: Opcode, payload: &[u8]) {
        let mut out = BytesMut::new();
        ws::encode_frame(fin, opcode, payload, Some(MASK), &mut out);
        self.raw(&out);
    }

    /// A STOMP frame: one text message over WebSocket (binary if not UTF-8).
    fn send(&mut self, f: &Frame) {
        let bytes = self.encode(f);
        if self.ws.is_some() {
            let opcode = if std::str::from_utf8(&bytes).is_ok() { Opcode::Text } else { Opcode::Binary };
            self.ws_frame(true, opcode, &bytes);
        } else {
            self.raw(&bytes);
        }
    }

    /// Reads more from the socket; false once it is closed or on timeout.
    fn fill(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        self.sock.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 65536];
        let n = self.sock.read(&mut chunk).unwrap_or_default();
        if n == 0 {
            return false;
        }
        match &mut self.ws {
            None => self.buf.extend_from_slice(&chunk[..n]),
            Some(d) => {
                self.wsbuf.extend_from_slice(&chunk[..n]);
                while let Some(m) = d.decode(&mut self.wsbuf).expect("server sent bad WebSocket framing") {
                    match &m {
                        Message::Text(b) | Message::Binary(b) => self.buf.extend_from_slice(b),
                        Message::Close(c) => self.closed = Some(c.clone()),
                        _ => {}
                    }
                    self.seen.push(m);
                }
            }
        }
        true
    }

    /// Next frame (heart-beats skipped), None when closed or on timeout.
    fn try_recv(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.dec.decode(&mut self.buf).expect("server sent bad STOMP") {
                Some(Item::Frame(f)) => return Some(f),
                Some(Item::Heartbeat) => continue,
                None => {}
            }
            if !self.fill(deadline) {
                return None;
            }
        }
    }

    fn expect(&mut self, command: Command) -> Frame {
        let f = self.try_recv(Duration::from_secs(10)).expect("a frame from the server");
        assert_eq!(f.command, command, "{f:?} (body {:?})", String::from_utf8_lossy(&f.body));
        f
    }

    fn call(&mut self, mut f: Frame, receipt: &str) {
        f.headers.push(("receipt".into(), receipt.into()));
        self.send(&f);
        let r = self.expect(Command::Receipt);
        assert_eq!(r.header("receipt-id"), Some(receipt));
    }

    /// Waits for a close frame (WebSocket) and the end of the stream.
    fn assert_closed(&mut self) -> Option<(u16, String)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.fill(deadline) {}
        assert!(Instant::now() < deadline, "the server did not close the connection");
        if self.ws.is_some() {
            self.closed.clone().expect("a close frame before the end of the stream")
        } else {
            None
        }
    }

    /// The kinds (opcodes) of data messages seen so far.
    fn data_kinds(&self) -> Vec<Opcode> {
        self.seen
            .iter()
            .filter_map(|m| match m {
                Message::Text(_) => Some(Opcode::Text),
                Message::Binary(_) => Some(Opcode::Binary),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn upgrade_negotiates_subprotocols_and_refuses_bad_requests() {
    let s = Server::start();
    let addr = s.web_stomp_addr();
    for (offered, chosen) in [
        (Some("v10.stomp, v11.stomp, v12.stomp"), Some("v12.stomp")),
        (Some("v11.stomp,v10.stomp"), Some("v11.stomp")),
        (Some("v10.stomp"), Some("v10.stomp")),
        (Some("stomp"), Some("stomp")),
        (Some("mqtt"), None),
        (None, None),
    ] {
        let (c, head) = Client::ws(addr, offered);
        assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{head}");
        let got = head.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Protocol: ")).map(str::trim);
        assert_eq!(got, chosen, "offered {offered:?}: {head}");
        // The subprotocol does not fix the version: CONNECT negotiates it.
        let c = c.login("1.0,1.1,1.2");
        assert_eq!(c.version, Version::V1_2);
    }
    let status = |req: String| {
        let (_, head, _) = http(addr, &req);
        head.split(' ').nth(1).unwrap().to_string()
    };
    assert_eq!(status(upgrade_request("/", None)), "404");
    assert_eq!(status(upgrade_request("/stomp", Some("v12.stomp"))), "404");
    assert_eq!(status("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n".into()), "400");
    assert_eq!(status(upgrade_request("/ws", None).replace(KEY, "c2hvcnQ=")), "400");
    assert_eq!(status(upgrade_request("/ws", None).replace("Connection: Upgrade", "Connection: close")), "400");
    assert_eq!(status(upgrade_request("/ws", None).replace("Version: 13", "Version: 8")), "426");
    assert_eq!(status(upgrade_request("/ws", None).replace("GET", "POST")), "405");
    assert_eq!(status("garbage\r\n\r\n".into()), "400");
    assert_eq!(status(format!("GET /ws HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000))), "431");
}

#[test]
fn messages_may_carry_several_frames_partial_frames_and_fragments() {
    let s = Server::start();
    let (mut c, _) = Client::ws(s.web_stomp_addr(), Some("v12.stomp"));
    // CONNECT cut across two messages, the second cut into fragments with
    // a ping in between.
    c.version = Version::V1_2;
    let connect = c.encode(&frame(Command::Connect, &[("accept-version", "1.2"), ("host", "/"), ("heart-beat", "0,0")]));
    let (a, b) = connect.split_at(10);
    c.ws_frame(true, Opcode::Binary, a);
    c.ws_frame(false, Opcode::Text, &b[..5]);
    c.ws_frame(true, Opcode::Ping, b"are you there");
    c.ws_frame(true, Opcode::Continuation, &b[5..]);
    c.dec.version = Version::V1_2;
    c.expect(Command::Connected);
    assert!(c.seen.contains(&Message::Pong(Bytes::from_static(b"are you there"))), "{:?}", c.seen);
    // Two frames (and heart-beat EOLs) in one message.
    let sub = c.encode(&frame(Command::Subscribe, &[("destination", "/queue/ws-multi"), ("id", "0"), ("receipt", "r1")]));
    let send = c.encode(&frame(Command::Send, &[("destination", "/queue/ws-multi"), ("receipt", "r2")]).with_body("héllo"));
    let mut both = sub.clone();
    both.extend_from_slice(b"\n\r\n");
    both.extend_from_slice(&send);
    c.ws_frame(true, Opcode::Text, &both);
    assert_eq!(c.expect(Command::Receipt).header("receipt-id"), Some("r1"));
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(c.try_recv(Duration::from_secs(10)).unwrap());
    }
    let m = got.iter().find(|f| f.command == Command::Message).expect("MESSAGE");
    assert_eq!(&m.body[..], "héllo".as_bytes());
    assert!(got.iter().any(|f| f.header("receipt-id") == Some("r2")));
    // A body that is not UTF-8 comes as a binary message; the others as text.
    let bin = frame(Command::Send, &[("destination", "/queue/ws-multi"), ("content-length", "3")]).with_body(vec![0xff, 0, 0xfe]);
    c.send(&bin);
    let m = c.expect(Command::Message);
    assert_eq!(&m.body[..], &[0xff, 0, 0xfe]);
    assert_eq!(c.data_kinds(), [Opcode::Text, Opcode::Text, Opcode::Text, Opcode::Text, Opcode::Binary]);
    // DISCONNECT: the receipt, then a normal close.
    c.call(Frame::new(Command::Disconnect), "bye");
    assert_eq!(c.assert_closed().map(|(code, _)| code), Some(1000));
}

#[test]
fn framing_errors_close_with_the_right_code() {
    let s = Server::start();
    let addr = s.web_stomp_addr();
    // Unmasked client frame: protocol error.
    let (mut c, _) = Client::ws(addr, None);
    let mut out = BytesMut::new();
    ws::encode_frame(true, Opcode::Text, b"CONNECT\n\n\0", None, &mut out);
    c.raw(&out);
    assert_eq!(c.assert_closed().map(|(code, _)| code), Some(1002));
    // A message over the limit (announced in the header): too big.
    let (mut c, _) = Client::ws(addr, None);
    c.raw(&[0x82, 0xFF, 0, 0, 0, 0, 0x10, 0, 0, 0, 1, 2, 3, 4]);
    assert_eq!(c.assert_closed().map(|(code, _)| code), Some(1009));
    // Invalid UTF-8 in a text message.
    let (mut c, _) = Client::ws(addr, None);
    c.ws_frame(true, Opcode::Text, &[0xc3, 0x28]);
    assert_eq!(c.assert_closed().map(|(code, _)| code), Some(1007));
    // The client closes: its code is echoed.
    let c = Client::ws(addr, None).0.login("1.2");
    let mut c = c;
    let mut out = BytesMut::new();
    ws::encode_close(4000, "done", Some(MASK), &mut out);
    c.raw(&out);
    assert_eq!(c.assert_closed().map(|(code, _)| code), Some(4000));
    // Bad STOMP over WebSocket: an ERROR frame, then a close.
    let (mut c, _) = Client::ws(addr, None);
    c.send(&frame(Command::Send, &[("destination", "/queue/x")]));
    let e = c.expect(Command::Error);
    assert!(!e.body.is_empty());
    assert_eq!(c.assert_closed().map(|(code, _)| code), Some(1000));
}

#[test]
fn heart_beats_go_out_as_messages() {
    let s = Server::start();
    let (mut c, _) = Client::ws(s.web_stomp_addr(), Some("v12.stomp"));
    c.version = Version::V1_2;
    c.send(&frame(Command::Connect, &[("accept-version", "1.2"), ("host", "/"), ("heart-beat", "0,200")]));
    c.dec.version = Version::V1_2;
    let reply = c.expect(Command::Connected);
    assert_eq!(reply.header("heart-beat"), Some("200,0"));
    // Nothing is sent for a while: only EOLs come, each its own text message.
    assert!(c.try_recv(Duration::from_millis(1000)).is_none());
    let beats = c.seen.iter().filter(|m| **m == Message::Text(Bytes::from_static(b"\n"))).count();
    assert!(beats >= 3, "{:?}", c.seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_stomp_tcp_stomp_and_amqp_exchange_messages() {
    let s = Server::start();
    let (ws_addr, tcp_addr) = (s.web_stomp_addr(), s.stomp_addr());
    let mut w = tokio::task::spawn_blocking(move || {
        let mut w = Client::ws(ws_addr, Some("v10.stomp, v11.stomp, v12.stomp")).0.login("1.2");
        w.call(
            frame(Command::Subscribe, &[("destination", "/queue/ws-in"), ("id", "s1"), ("ack", "client-individual")]),
            "sub",
        );
        // TCP STOMP → WebSocket.
        let mut t = Client::tcp(tcp_addr).login("1.1");
        t.call(frame(Command::Send, &[("destination", "/queue/ws-in"), ("x-from", "tcp")]).with_body("over tcp"), "t1");
        let m = w.expect(Command::Message);
        assert_eq!(&m.body[..], b"over tcp");
        assert_eq!(m.header("x-from"), Some("tcp"));
        let ack = m.header("ack").unwrap().to_string();
        w.call(frame(Command::Ack, &[("id", &ack)]), "a1");
        // WebSocket → AMQP, with properties.
        w.call(
            frame(Command::Send, &[("destination", "/queue/ws-out"), ("content-type", "text/plain"), ("correlation-id", "c-9")])
                .with_body("over ws"),
            "w1",
        );
        w
    })
    .await
    .unwrap();
    let (_conn, ch) = open(&s).await;
    let m = ch.basic_get("ws-out".into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("a message");
    assert_eq!(m.delivery.data, b"over ws");
    assert_eq!(m.delivery.properties.content_type().as_ref().map(|s| s.as_str()), Some("text/plain"));
    assert_eq!(m.delivery.properties.correlation_id().as_ref().map(|s| s.as_str()), Some("c-9"));
    // AMQP → WebSocket.
    ch.basic_publish(
        "".into(),
        "ws-in".into(),
        BasicPublishOptions::default(),
        b"over amqp",
        BasicProperties::default().with_message_id("m-7".into()),
    )
    .await
    .unwrap();
    tokio::task::spawn_blocking(move || {
        let m = w.expect(Command::Message);
        assert_eq!(&m.body[..], b"over amqp");
        assert_eq!(m.header("amqp-message-id"), Some("m-7"));
        let ack = m.header("ack").unwrap().to_string();
        w.call(frame(Command::Ack, &[("id", &ack)]), "a2");
        w.call(Frame::new(Command::Disconnect), "bye");
        w.assert_closed();
    })
    .await
    .unwrap();
}
