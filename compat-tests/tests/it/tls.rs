//! TLS against the real binary (docs/tls.md): certificates made at test
//! time with rcgen (a CA; a server certificate for localhost/127.0.0.1 and
//! client certificates signed by it), real TLS handshakes with
//! tokio-rustls on the client side.
//!
//! lapin's own TLS support would bring in aws-lc-rs, so lapin speaks AMQP
//! through a TLS-originating relay in the test process: lapin → plain TCP
//! to the relay → TLS (with or without a client certificate) → sluice's
//! amqps listener. The broker sees an ordinary TLS client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sluice_codecs::stomp::{encode_frame, Command, Decoder, Frame, Item, Limits, Version};
use sluice_codecs::ws::{self, Message, MessageDecoder, Opcode, Role};
use sluice_compat_tests::{run_sluice, Server};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::common::{code, text};

/// A test PKI in a temporary directory.
pub(crate) struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    ca_der: CertificateDer<'static>,
    /// name → (certificate PEM, key PEM) of client certificates by CN.
    clients: Vec<(String, String, String)>,
}

fn leaf(names: &[&str], cn: &str, issuer: &Issuer<'_, KeyPair>) -> (String, String) {
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::OrganizationName, "sluice tests");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    /// A CA, a server certificate for localhost and 127.0.0.1, and client
    /// certificates with the given CNs.
    pub(crate) fn new(client_cns: &[&str]) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "sluice test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        let (cert, key) = leaf(&["localhost", "127.0.0.1"], "localhost", &issuer);
        let server_cert = dir.path().join("server.pem");
        let server_key = dir.path().join("server.key");
        std::fs::write(&server_cert, cert).unwrap();
        std::fs::write(&server_key, key).unwrap();
        let clients = client_cns
            .iter()
            .map(|cn| {
                let (cert, key) = leaf(&[], cn, &issuer);
                (cn.to_string(), cert, key)
            })
            .collect();
        Pki { dir, ca, server_cert, server_key, ca_der: ca_cert.der().clone(), clients }
    }

    /// Writes a certificate and key next to the others: `name.pem`,
    /// `name.key`.
    pub(crate) fn issue_files(&self, name: &str, cert_pem: &str, key_pem: &str) -> (PathBuf, PathBuf) {
        let cert = self.dir.path().join(format!("{name}.pem"));
        let key = self.dir.path().join(format!("{name}.key"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        (cert, key)
    }

    /// Writes the client certificate of `cn` as files.
    pub(crate) fn client_files(&self, cn: &str) -> (PathBuf, PathBuf) {
        let (_, cert, key) = self.clients.iter().find(|(n, _, _)| n == cn).expect("client cert");
        self.issue_files(&format!("client-{cn}"), cert, key)
    }

    /// A TLS client trusting the CA, presenting the certificate of `cn`
    /// if given.
    pub(crate) fn client(&self, cn: Option<&str>) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match cn {
            None => builder.with_no_client_auth(),
            Some(cn) => {
                let (_, cert, key) = self.clients.iter().find(|(n, _, _)| n == cn).expect("client cert");
                let cert: CertificateDer<'static> = rustls::pki_types::pem::PemObject::from_pem_slice(cert.as_bytes()).unwrap();
                let key: PrivateKeyDer<'static> = rustls::pki_types::pem::PemObject::from_pem_slice(key.as_bytes()).unwrap();
                builder.with_client_auth_cert(vec![cert], key).unwrap()
            }
        };
        TlsConnector::from(Arc::new(config))
    }

    /// A config file with users guest/guest and alice/alice-pw.
    fn users_file(&self) -> PathBuf {
        let path = self.dir.path().join("sluice.toml");
        std::fs::write(&path, "[users]\nguest = \"guest\"\nalice = \"alice-pw\"\n").unwrap();
        path
    }

    /// `serve` flags for all three TLS listeners on free ports, plus `extra`.
    fn serve_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "--amqps", "127.0.0.1:0", "--stomps", "127.0.0.1:0", "--web-stomps", "127.0.0.1:0",
            "--tls-cert", path(&self.server_cert), "--tls-key", path(&self.server_key), "--tls-ca", path(&self.ca),
            "--config", path(&self.users_file()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub(crate) fn start(&self, extra: &[&str]) -> Server {
        let args = self.serve_args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start_with(&args)
    }
}

pub(crate) fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A TLS connection to `addr` as `localhost`.
async fn tls_connect(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tokio::time::timeout(Duration::from_secs(10), connector.connect(ServerName::try_from("localhost").unwrap(), tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// A relay on 127.0.0.1: each plain TCP connection to it is carried over
/// a new TLS connection to `target` made with `connector`. Runs until
/// the test's runtime ends.
async fn tls_relay(connector: TlsConnector, target: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut plain, _)) = listener.accept().await {
            let connector = connector.clone();
            tokio::spawn(async move {
                let _ = plain.set_nodelay(true);
                if let Ok(mut tls) = tls_connect(&connector, target).await {
                    let _ = tokio::io::copy_bidirectional(&mut plain, &mut tls).await;
                }
            });
        }
    });
    addr
}

/// lapin through a relay: publish with confirms and consume one message.
async fn amqp_round_trip(conn: &Connection, queue: &str, user_id: Option<&str>) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default()).await?;
    let mut props = BasicProperties::default();
    if let Some(u) = user_id {
        props = props.with_user_id(u.into());
    }
    let confirm = ch
        .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), b"over tls", props)
        .await?
        .await?;
    assert!(confirm.is_ack(), "{confirm:?}");
    let mut consumer =
        ch.basic_consume(queue.into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("a delivery").expect("stream")?;
    assert_eq!(delivery.data, b"over tls");
    delivery.ack(BasicAckOptions::default()).await?;
    Ok(())
}

#[tokio::test]
async fn lapin_publishes_and_consumes_over_amqps() {
    let pki = Pki::new(&[]);
    let server = pki.start(&[]);
    let relay = tls_relay(pki.client(None), server.amqps.unwrap()).await;
    let conn = Connection::connect(&format!("amqp://guest:guest@{relay}/%2f"), ConnectionProperties::default())
        .await
        .unwrap();
    amqp_round_trip(&conn, "tls-q", None).await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
    // Plain AMQP is still served next to it.
    let plain = Connection::connect(&server.url(), ConnectionProperties::default()).await.unwrap();
    amqp_round_trip(&plain, "plain-q", None).await.unwrap();
}

/// Reads the connection.start the server sends after the protocol header
/// and returns its mechanisms.
async fn offered_mechanisms<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> String {
    use sluice_codecs::amqp::{Frame as AmqpFrame, FrameCodec, Method};
    use tokio_util::codec::Decoder as _;
    stream.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut codec = FrameCodec::new(131_072);
    let mut buf = BytesMut::new();
    loop {
        if let Some(frame) = codec.decode(&mut buf).unwrap() {
            match frame {
                AmqpFrame::Method { method: Method::ConnectionStart(start), .. } => {
                    return String::from_utf8(start.mechanisms.to_vec()).unwrap();
                }
                other => panic!("expected connection.start, got {other:?}"),
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read_buf(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before connection.start");
    }
}

#[tokio::test]
async fn external_logs_in_as_the_certificate_cn() {
    let pki = Pki::new(&["alice", "mallory"]);
    let server = pki.start(&["--tls-verify-peer", "true"]);
    let amqps = server.amqps.unwrap();

    // EXTERNAL is offered only to a client with a verified certificate.
    let mut with_cert = tls_connect(&pki.client(Some("alice")), amqps).await.unwrap();
    assert_eq!(offered_mechanisms(&mut with_cert).await, "PLAIN AMQPLAIN EXTERNAL");
    let mut without = tls_connect(&pki.client(None), amqps).await.unwrap();
    assert_eq!(offered_mechanisms(&mut without).await, "PLAIN AMQPLAIN");
    let mut plain = TcpStream::connect(server.amqp).await.unwrap();
    assert_eq!(offered_mechanisms(&mut plain).await, "PLAIN AMQPLAIN");

    // With alice's certificate, EXTERNAL logs in as alice: the user_id
    // check accepts "alice" and refuses "guest".
    let relay = tls_relay(pki.client(Some("alice")), amqps).await;
    let url = format!("amqp://{relay}/%2f?auth_mechanism=external");
    let conn = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
    amqp_round_trip(&conn, "ext-q", Some("alice")).await.unwrap();
    let err = amqp_round_trip(&conn, "ext-q2", Some("guest")).await.unwrap_err();
    assert_eq!(code(&err), 406, "{err}");
    assert!(text(&err).contains("authenticated user was 'alice'"), "{err}");
    // PLAIN still works on the same kind of connection.
    let conn = Connection::connect(&format!("amqp://alice:alice-pw@{relay}/%2f"), ConnectionProperties::default())
        .await
        .unwrap();
    amqp_round_trip(&conn, "plain-over-tls", Some("alice")).await.unwrap();

    // A verified certificate whose CN is no user: 403.
    let relay = tls_relay(pki.client(Some("mallory")), amqps).await;
    let err = Connection::connect(&format!("amqp://{relay}/%2f?auth_mechanism=external"), ConnectionProperties::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 403, "{err}");
    assert!(text(&err).contains("ACCESS_REFUSED"), "{err}");

    // Without a certificate EXTERNAL is an unknown mechanism (503).
    let relay = tls_relay(pki.client(None), amqps).await;
    let err = Connection::connect(&format!("amqp://{relay}/%2f?auth_mechanism=external"), ConnectionProperties::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 503, "{err}");
}

/// A minimal async STOMP client over any stream, optionally inside
/// WebSocket messages.
struct Stomp<S> {
    s: S,
    ws: Option<(MessageDecoder, BytesMut)>,
    dec: Decoder,
    buf: BytesMut,
    version: Version,
}

fn frame(command: Command, headers: &[(&str, &str)]) -> Frame {
    let mut f = Frame::new(command);
    for (k, v) in headers {
        f.headers.push((k.to_string(), v.to_string()));
    }
    f
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stomp<S> {
    fn new(s: S) -> Self {
        Stomp { s, ws: None, dec: Decoder::new(Version::V1_0, Limits::default()), buf: BytesMut::new(), version: Version::V1_0 }
    }

    /// The WebSocket upgrade at /ws, then STOMP inside messages.
    async fn websocket(mut s: S) -> Self {
        let request = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: v12.stomp\r\n\r\n";
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = BytesMut::new();
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed before the upgrade answer");
        };
        let head = String::from_utf8(buf.split_to(end + 4).to_vec()).unwrap();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(head.contains("v12.stomp"), "{head}");
        let mut c = Stomp::new(s);
        c.ws = Some((MessageDecoder::new(Role::Client, 16 << 20), buf));
        c
    }

    async fn send(&mut self, f: &Frame) {
        let mut out = BytesMut::new();
        encode_frame(f, self.version, &mut out).unwrap();
        if self.ws.is_some() {
            let mut msg = BytesMut::new();
            ws::encode_frame(true, Opcode::Text, &out, Some([1, 2, 3, 4]), &mut msg);
            out = msg;
        }
        self.s.write_all(&out).await.unwrap();
    }

    /// The next frame, or None once the server closed.
    async fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some((dec, wsbuf)) = &mut self.ws {
                while let Some(m) = dec.decode(wsbuf).unwrap() {
                    if let Message::Text(b) | Message::Binary(b) = m {
                        self.buf.extend_from_slice(&b);
                    }
                }
            }
            match self.dec.decode(&mut self.buf).unwrap() {
                Some(Item::Frame(f)) => return Some(f),
                Some(Item::Heartbeat) => continue,
                None => {}
            }
            let target = match &mut self.ws {
                Some((_, wsbuf)) => wsbuf,
                None => &mut self.buf,
            };
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read_buf(target)).await.expect("a frame in time");
            if !matches!(n, Ok(n) if n > 0) {
                return None;
            }
        }
    }

    async fn expect(&mut self, command: Command) -> Frame {
        let f = self.recv().await.expect("a frame");
        assert_eq!(f.command, command, "{f:?} (body {:?})", String::from_utf8_lossy(&f.body));
        f
    }

    /// CONNECT (1.2) with `headers`; the answer.
    async fn connect(&mut self, headers: &[(&str, &str)]) -> Frame {
        let mut all = vec![("accept-version", "1.2"), ("host", "/")];
        all.extend_from_slice(headers);
        self.send(&frame(Command::Connect, &all)).await;
        let reply = self.recv().await.expect("an answer to CONNECT");
        if reply.command == Command::Connected {
            self.version = Version::V1_2;
            self.dec.version = Version::V1_2;
        }
        reply
    }

    /// SUBSCRIBE, SEND with a receipt, and the MESSAGE back.
    async fn round_trip(&mut self, queue: &str, body: &str) -> Frame {
        let dest = format!("/queue/{queue}");
        self.send(&frame(Command::Subscribe, &[("id", "s1"), ("destination", &dest), ("receipt", "sub")])).await;
        assert_eq!(self.expect(Command::Receipt).await.header("receipt-id"), Some("sub"));
        let mut send = frame(Command::Send, &[("destination", &dest), ("receipt", "sent")]);
        send.body = body.as_bytes().to_vec().into();
        self.send(&send).await;
        let mut got = Vec::new();
        while got.len() < 2 {
            got.push(self.recv().await.expect("RECEIPT and MESSAGE"));
        }
        let msg = got.iter().find(|f| f.command == Command::Message).cloned().expect("a MESSAGE");
        assert!(got.iter().any(|f| f.command == Command::Receipt), "{got:?}");
        assert_eq!(&msg.body[..], body.as_bytes());
        msg
    }
}

#[tokio::test]
async fn stomp_over_tls_sends_and_receives() {
    let pki = Pki::new(&["alice", "mallory"]);
    let server = pki.start(&["--tls-verify-peer", "true"]);
    let stomps = server.stomps.unwrap();

    let tls = tls_connect(&pki.client(None), stomps).await.unwrap();
    let mut c = Stomp::new(tls);
    assert_eq!(c.connect(&[("login", "guest"), ("passcode", "guest")]).await.command, Command::Connected);
    c.round_trip("stomps-q", "hello over tls").await;

    // ssl_cert_login: no login header, a verified certificate: its CN.
    let tls = tls_connect(&pki.client(Some("alice")), stomps).await.unwrap();
    let mut c = Stomp::new(tls);
    assert_eq!(c.connect(&[]).await.command, Command::Connected);
    let msg = c.round_trip("stomps-alice", "from alice").await;
    assert!(msg.header("user-id").is_none(), "{msg:?}");
    // Alice may stamp her name as user-id; guest's is refused.
    let mut send = frame(Command::Send, &[("destination", "/queue/stomps-alice"), ("user-id", "alice"), ("receipt", "r2")]);
    send.body = b"stamped".to_vec().into();
    c.send(&send).await;
    let mut got = vec![c.recv().await.unwrap(), c.recv().await.unwrap()];
    got.sort_by_key(|f| f.command == Command::Message);
    assert_eq!(got[0].command, Command::Receipt, "{got:?}");
    assert_eq!(got[1].header("user-id"), Some("alice"), "{got:?}");
    let mut send = frame(Command::Send, &[("destination", "/queue/stomps-alice"), ("user-id", "guest")]);
    send.body = b"forged".to_vec().into();
    c.send(&send).await;
    let err = c.expect(Command::Error).await;
    assert!(String::from_utf8_lossy(&err.body).contains("authenticated user was 'alice'"), "{err:?}");

    // A certificate whose CN is no user, without login: refused.
    let tls = tls_connect(&pki.client(Some("mallory")), stomps).await.unwrap();
    let mut c = Stomp::new(tls);
    let reply = c.connect(&[]).await;
    assert_eq!(reply.command, Command::Error, "{reply:?}");
    assert!(String::from_utf8_lossy(&reply.body).contains("mallory"), "{reply:?}");
}

#[tokio::test]
async fn web_stomp_over_tls() {
    let pki = Pki::new(&[]);
    let server = pki.start(&[]);
    let tls = tls_connect(&pki.client(None), server.web_stomps.unwrap()).await.unwrap();
    let mut c = Stomp::websocket(tls).await;
    assert_eq!(c.connect(&[("login", "guest"), ("passcode", "guest")]).await.command, Command::Connected);
    c.round_trip("wss-q", "hello over wss").await;
    // And a plain STOMP client sees the same queues.
    let tcp = TcpStream::connect(server.stomp).await.unwrap();
    let mut plain = Stomp::new(tcp);
    assert_eq!(plain.connect(&[]).await.command, Command::Connected);
    c.send(&frame(Command::Send, &[("destination", "/queue/shared")])).await;
    plain.send(&frame(Command::Subscribe, &[("id", "1"), ("destination", "/queue/shared")])).await;
    plain.expect(Command::Message).await;
}

#[tokio::test]
async fn fail_if_no_peer_cert_refuses_clients_without_one() {
    let pki = Pki::new(&["alice"]);
    let server = pki.start(&["--tls-fail-if-no-peer-cert", "true"]);
    let amqps = server.amqps.unwrap();
    // TLS 1.3: the client finishes its side before the server checks the
    // client's (absent) certificate, so the refusal shows on first read.
    let refused = async {
        let mut s = tls_connect(&pki.client(None), amqps).await?;
        s.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut buf = [0u8; 64];
        s.read(&mut buf).await
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), refused).await.expect("refused in time");
    assert!(matches!(outcome, Err(_) | Ok(0)), "{outcome:?}");
    // A client with a certificate is served meanwhile.
    let mut ok = tls_connect(&pki.client(Some("alice")), amqps).await.unwrap();
    assert_eq!(offered_mechanisms(&mut ok).await, "PLAIN AMQPLAIN EXTERNAL");
    let relay = tls_relay(pki.client(Some("alice")), amqps).await;
    let conn = Connection::connect(&format!("amqp://{relay}/%2f?auth_mechanism=external"), ConnectionProperties::default())
        .await
        .unwrap();
    amqp_round_trip(&conn, "required-q", None).await.unwrap();
}

#[tokio::test]
async fn plaintext_and_silent_clients_on_tls_ports_do_not_hurt_others() {
    let pki = Pki::new(&[]);
    let server = pki.start(&[]);
    let amqps = server.amqps.unwrap();
    // A client that never starts its handshake: it holds only its own task.
    let mut silent = TcpStream::connect(amqps).await.unwrap();
    let silent_since = std::time::Instant::now();
    // Plain AMQP on the TLS port: not a TLS record, the connection is dropped.
    let mut plain = TcpStream::connect(amqps).await.unwrap();
    plain.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut buf)).await.expect("closed in time");
    assert!(!buf.starts_with(b"AMQP") && !buf.windows(5).any(|w| w == b"PLAIN"), "{buf:?} {read:?}");
    // Plain STOMP on the STOMPS port, likewise.
    let mut plain = TcpStream::connect(server.stomps.unwrap()).await.unwrap();
    plain.write_all(b"CONNECT\naccept-version:1.2\n\n\0").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut buf)).await.expect("closed in time");
    assert!(!buf.windows(9).any(|w| w == b"CONNECTED"), "{buf:?}");
    // Everyone else is served.
    let relay = tls_relay(pki.client(None), amqps).await;
    let conn = Connection::connect(&format!("amqp://guest:guest@{relay}/%2f"), ConnectionProperties::default())
        .await
        .unwrap();
    amqp_round_trip(&conn, "still-up", None).await.unwrap();
    // The silent client is dropped once the 10 s handshake deadline passes.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut byte)).await.expect("dropped in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = silent_since.elapsed();
    assert!(waited >= Duration::from_secs(9), "dropped after {waited:?}, before the deadline");
}

#[test]
fn tls_configuration_errors_name_the_setting_or_file() {
    let pki = Pki::new(&["alice"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let base = ["serve", "--amqp", "127.0.0.1:0", "--web-stomp", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--data-dir", path(&data)];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        run_sluice(&args)
    };
    // A TLS listener without a certificate.
    let (code, _, err) = run(&["--amqps", "127.0.0.1:0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("amqps") && err.contains("tls_cert") && err.contains("--tls-cert"), "{err}");
    // ... or without a key.
    let (code, _, err) = run(&["--stomps", "127.0.0.1:0", "--tls-cert", path(&pki.server_cert)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tls_key"), "{err}");
    // A missing certificate file is named.
    let missing = dir.path().join("nope.pem");
    let (code, _, err) = run(&["--amqps", "127.0.0.1:0", "--tls-cert", path(&missing), "--tls-key", path(&pki.server_key)]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(path(&missing)) && err.contains("tls_cert"), "{err}");
    // A file that is no PEM certificate.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let (code, _, err) = run(&["--amqps", "127.0.0.1:0", "--tls-cert", path(&junk), "--tls-key", path(&pki.server_key)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(path(&junk)), "{err}");
    // A key file without a key.
    let (code, _, err) = run(&["--amqps", "127.0.0.1:0", "--tls-cert", path(&pki.server_cert), "--tls-key", path(&pki.ca)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(path(&pki.ca)) && err.contains("tls_key"), "{err}");
    // A key that is not the certificate's.
    let (_, alice_key) = pki.client_files("alice");
    let (code, _, err) = run(&["--amqps", "127.0.0.1:0", "--tls-cert", path(&pki.server_cert), "--tls-key", path(&alice_key)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("invalid TLS setup") && err.contains(path(&pki.server_cert)), "{err}");
    // verify_peer without a CA.
    let (code, _, err) = run(&[
        "--amqps", "127.0.0.1:0", "--tls-cert", path(&pki.server_cert), "--tls-key", path(&pki.server_key),
        "--tls-verify-peer", "true",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tls_ca"), "{err}");
    // Node protocol TLS: all three settings or none; files are named.
    let (code, _, err) = run_sluice(&["node", "--id", "n1", "--data-dir", path(&data), "--cluster-tls-cert", path(&pki.server_cert)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cluster_tls_key, cluster_tls_ca"), "{err}");
    let (code, _, err) = run_sluice(&[
        "gateway", "--nodes", "127.0.0.1:1", "--cluster-tls-cert", path(&missing), "--cluster-tls-key", path(&pki.server_key),
        "--cluster-tls-ca", path(&pki.ca),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(path(&missing)) && err.contains("cluster_tls_cert"), "{err}");
    // The same keys in the config file.
    let cfg = dir.path().join("tls.toml");
    std::fs::write(&cfg, format!("amqps = \"127.0.0.1:0\"\ntls_key = {:?}\n", path(&pki.server_key))).unwrap();
    let (code, _, err) = run(&["--config", path(&cfg)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tls_cert"), "{err}");
}

/// `sluice ctl --node addr status` with `flags`; stdout if it succeeded.
fn ctl_status_with(home: &Path, addr: &str, flags: &[&str]) -> Option<String> {
    let out = std::process::Command::new(sluice_compat_tests::sluice_bin())
        .args(["ctl", "--node", addr])
        .args(flags)
        .arg("status")
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("SLUICE_LOG", "error")
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `--cluster-tls-*` flags for the certificate of `cn`.
fn cluster_flags(pki: &Pki, cn: &str) -> Vec<String> {
    let (cert, key) = pki.client_files(cn);
    ["--cluster-tls-cert", path(&cert), "--cluster-tls-key", path(&key), "--cluster-tls-ca", path(&pki.ca)]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_with_node_protocol_tls() {
    use sluice_compat_tests::{start_gateway, start_node};
    let pki = Pki::new(&["n1", "n2", "n3", "gw", "ctl"]);
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let flags: Vec<Vec<String>> = ["n1", "n2", "n3", "gw", "ctl"].iter().map(|cn| cluster_flags(&pki, cn)).collect();
    let n1 = start_node(home, "n1", "n1", "127.0.0.1:0", &refs(&flags[0]));
    let seed = n1.addr.clone();
    let mut f2 = refs(&flags[1]);
    f2.extend(["--seeds", &seed]);
    let n2 = start_node(home, "n2", "n2", "127.0.0.1:0", &f2);
    let mut f3 = refs(&flags[2]);
    f3.extend(["--seeds", &seed]);
    let n3 = start_node(home, "n3", "n3", "127.0.0.1:0", &f3);
    let nodes = [n1, n2, n3];
    let ctl = refs(&flags[4]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let formed = nodes.iter().all(|n| {
            ctl_status_with(home, &n.addr, &ctl).is_some_and(|s| {
                s.lines().any(|l| l.strip_prefix("cluster members: ").is_some_and(|m| m.split(", ").count() == 3))
            })
        });
        if formed {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the three nodes did not form a cluster over TLS");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Without TLS, or with a certificate from another CA, ctl is refused
    // (it knows the cluster secret: the TLS layer refuses it).
    assert!(ctl_status_with(home, &nodes[0].addr, &[]).is_none());
    let other = Pki::new(&["ctl"]);
    assert!(ctl_status_with(home, &nodes[0].addr, &refs(&cluster_flags(&other, "ctl"))).is_none());

    // The gateway also serves AMQP over TLS, with the client listeners'
    // own certificate settings.
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let mut gw_flags = refs(&flags[3]);
    gw_flags.extend(["--amqps", "127.0.0.1:0", "--tls-cert", path(&pki.server_cert), "--tls-key", path(&pki.server_key)]);
    let gw = start_gateway(home, &addrs, &gw_flags);
    let relay = tls_relay(pki.client(None), gw.amqps.as_deref().unwrap().parse().unwrap()).await;
    let conn = Connection::connect(&format!("amqp://guest:guest@{relay}/%2f"), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    ch.queue_declare("tls-cluster".into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    for i in 0..20 {
        let confirm = ch
            .basic_publish(
                "".into(),
                "tls-cluster".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    let mut consumer = ch
        .basic_consume("tls-cluster".into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for i in 0..20 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("a delivery").unwrap().unwrap();
        assert_eq!(d.data, format!("m{i}").as_bytes());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
}

/// Deliveries far larger than the socket buffers, to consumers that let
/// their sockets fill up before reading, arrive whole over TLS (AMQP and
/// STOMP). (The writers flush after each write, as TLS may hold records
/// back when the socket is full; this test exercises that path but cannot
/// force the exact timing in which a missing flush would lose the tail.)
#[tokio::test]
async fn large_deliveries_to_a_slow_reader_arrive_whole() {
    // Well beyond what loopback socket buffers hold (a few MB).
    const N: usize = 24;
    const SIZE: usize = 1_000_000;
    let pki = Pki::new(&[]);
    let server = pki.start(&[]);
    let publisher = Connection::connect(&server.url(), ConnectionProperties::default()).await.unwrap();
    let pch = publisher.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for q in ["slow-amqp", "slow-stomp"] {
        // Durable, as STOMP's /queue/ declares it.
        pch.queue_declare(q.into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
        for i in 0..N {
            let body = vec![i as u8; SIZE];
            pch.basic_publish("".into(), q.into(), BasicPublishOptions::default(), &body, BasicProperties::default())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }

    // STOMP: subscribe, then read nothing for a while.
    let tls = tls_connect(&pki.client(None), server.stomps.unwrap()).await.unwrap();
    let mut c = Stomp::new(tls);
    assert_eq!(c.connect(&[]).await.command, Command::Connected);
    c.send(&frame(Command::Subscribe, &[("id", "s"), ("destination", "/queue/slow-stomp")])).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..N {
        let m = c.expect(Command::Message).await;
        assert_eq!(m.body.len(), SIZE);
        assert_eq!(m.body[0], i as u8);
    }

    // AMQP through the relay, whose reads from the TLS side stall while
    // lapin is not yet consuming.
    let relay = tls_relay(pki.client(None), server.amqps.unwrap()).await;
    let conn = Connection::connect(&format!("amqp://guest:guest@{relay}/%2f"), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut consumer =
        ch.basic_consume("slow-amqp".into(), "c".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..N {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("a delivery").unwrap().unwrap();
        assert_eq!(d.data.len(), SIZE);
        assert_eq!(d.data[0], i as u8);
    }
}
