//! One STOMP connection: CONNECT/STOMP negotiation, then the frame loop
//! that drives one protocol-neutral [`Channel`] (as RabbitMQ's STOMP plugin
//! uses one AMQP channel per connection), heart-beats both ways, until
//! DISCONNECT, an ERROR, a silent client or broker shutdown.
//!
//! * Subscriptions are consumers tagged `T_<id>` (RabbitMQ's tags; `Q_<destination>`
//!   for a 1.0 SUBSCRIBE without `id`).
//! * The channel runs in publisher-confirm mode: a RECEIPT waits until
//!   every SEND before it is as durable as a confirmed AMQP publish, so
//!   RECEIPTs go out in frame order and DISCONNECT's receipt comes after
//!   everything earlier was processed.
//! * Transactions are kept here: SEND/ACK/NACK frames with `transaction`
//!   are buffered and replayed on COMMIT, dropped on ABORT (RabbitMQ).
//! * Every error sends ERROR (`message` + explanatory body, `receipt-id`
//!   when the frame asked for a receipt) and closes the connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use sluice_cluster::Consumer;
use sluice_codecs::command::{Arguments, Command, Reply};
use sluice_codecs::stomp::{
    encode_frame, header, AckMode, Command as Cmd, DecodeError, Frame, HeartBeat, Item, Limits, StompCodec, Version,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::destination::{DestError, Destination};
use super::map;
use crate::channel::{drop_delivery, Channel, ConnEvent, Outbox, SessionCtx};
use crate::error::BrokerError;
use crate::server::Broker;

/// How long a client has to send CONNECT.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A write that makes no progress for this long kills the connection.
const SEND_TIMEOUT: Duration = Duration::from_secs(15);
/// How long buffered frames (the ERROR, a last RECEIPT) get to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Smallest heart-beat interval the server agrees to, in ms.
const MIN_HEARTBEAT_MS: u32 = 100;
/// A client silent for this many of its heart-beat intervals is dead.
const HEARTBEAT_GRACE: u32 = 2;
/// Same backpressure as the AMQP session (see amqp/connection.rs).
const STORAGE_BACKLOG_LIMIT: u64 = 32 * 1024 * 1024;
const WRITER_BACKLOG_LIMIT: u64 = 16 * 1024 * 1024;
/// The only channel number of a STOMP connection.
const CHANNEL: u16 = 1;
/// Separates consumer tag, session and delivery tag in `message-id`.
const ID_SEPARATOR: &str = "@@";

/// How often unacknowledged deliveries are checked against the consumer
/// timeout.
const ACK_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Versions this server speaks, as listed in a version mismatch ERROR.
const SUPPORTED: &str = "1.0,1.1,1.2";

/// An ERROR to send before closing.
#[derive(Debug)]
struct Fail {
    message: String,
    body: String,
}

fn fail(message: &str, body: impl Into<String>) -> Fail {
    Fail { message: message.to_string(), body: body.into() }
}

impl From<BrokerError> for Fail {
    /// RabbitMQ's STOMP reports a channel or connection error with the
    /// error's name in lower case and the AMQP text in the body.
    fn from(e: BrokerError) -> Self {
        Fail { message: crate::error::name(e.code).to_lowercase(), body: e.text }
    }
}

/// Why the frame loop ended.
enum End {
    /// The peer went away (or stopped heart-beating): nothing more to send.
    Gone,
    /// Send this ERROR (answering `receipt` if any), then close.
    Error(Fail, Option<String>),
    /// DISCONNECT was processed (its RECEIPT sent if asked for).
    Disconnect,
}

/// Frames queued for the writer task.
struct Out {
    bytes: Bytes,
    /// Set on deliveries: its pending credit is given back once written.
    consumer: Option<Arc<Consumer>>,
}

#[derive(Clone)]
struct Writer {
    tx: mpsc::UnboundedSender<Out>,
    queued: Arc<AtomicU64>,
}

impl Writer {
    fn send(&self, bytes: Bytes, consumer: Option<Arc<Consumer>>) {
        let cost = bytes.len() as u64;
        self.queued.fetch_add(cost, Ordering::AcqRel);
        if let Err(mpsc::error::SendError(out)) = self.tx.send(Out { bytes, consumer }) {
            self.queued.fetch_sub(cost, Ordering::AcqRel);
            if let Some(c) = out.consumer {
                c.release_pending();
            }
        }
    }
}

/// Replies the channel sends outside of `execute`: only basic.return, which
/// STOMP never asks for (its publishes are not mandatory).
struct NoOutbox;

impl Outbox for NoOutbox {
    fn send(&self, _channel: u16, _reply: Reply, consumer: Option<Arc<Consumer>>) {
        if let Some(c) = consumer {
            c.release_pending();
        }
    }
}

/// Where the session's encoded frames go: a byte stream (TCP) or one
/// WebSocket message per frame (`super::websocket`).
pub trait FrameSink: Send + 'static {
    /// Writes `frames` (each one encoded frame or a heart-beat EOL) in order.
    fn send(&mut self, frames: &[Bytes]) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
    /// Flushes and closes the sending side.
    fn close(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

/// A [`FrameSink`] over a byte stream: frames are written back to back.
pub struct StreamSink<W> {
    wr: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin + Send + 'static> StreamSink<W> {
    pub fn new(wr: W) -> Self {
        // Small at first (an idle connection keeps only this); it grows
        // with the frames written.
        StreamSink { wr, buf: BytesMut::with_capacity(4 * 1024) }
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> FrameSink for StreamSink<W> {
    async fn send(&mut self, frames: &[Bytes]) -> std::io::Result<()> {
        if let [one] = frames {
            self.wr.write_all(one).await?;
        } else {
            for f in frames {
                self.buf.extend_from_slice(f);
            }
            let r = self.wr.write_all(&self.buf).await;
            self.buf.clear();
            r?;
        }
        // A no-op on TCP; over TLS it pushes out records the TLS layer
        // still holds when the socket was full during the write.
        self.wr.flush().await
    }

    async fn close(&mut self) {
        let _ = self.wr.flush().await;
        let _ = self.wr.shutdown().await;
    }
}

/// Writes to the sink: frames in order, an EOL after `heartbeat` of
/// silence, and nothing more once a write failed or stalled for
/// [`SEND_TIMEOUT`] (then `dead` is cancelled).
async fn writer_task<W: FrameSink>(
    mut socket: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    queued: Arc<AtomicU64>,
    heartbeat: Option<Duration>,
    dead: CancellationToken,
) {
    let mut buf: Vec<Bytes> = Vec::new();
    let mut size = 0;
    let mut written: Vec<Arc<Consumer>> = Vec::new();
    let mut failed = false;
    loop {
        let msg = match heartbeat {
            None => rx.recv().await,
            Some(hb) => match tokio::time::timeout(hb, rx.recv()).await {
                Ok(m) => m,
                Err(_) => {
                    write(&mut socket, &[Bytes::from_static(b"\n")], &mut failed, &dead).await;
                    continue;
                }
            },
        };
        let Some(first) = msg else { break };
        let mut cost = first.bytes.len() as u64;
        size += first.bytes.len();
        buf.push(first.bytes);
        written.extend(first.consumer);
        while size < 256 * 1024 {
            let Ok(next) = rx.try_recv() else { break };
            cost += next.bytes.len() as u64;
            size += next.bytes.len();
            buf.push(next.bytes);
            written.extend(next.consumer);
        }
        write(&mut socket, &buf, &mut failed, &dead).await;
        queued.fetch_sub(cost, Ordering::AcqRel);
        buf.clear();
        size = 0;
        for c in written.drain(..) {
            c.release_pending();
        }
    }
    if !failed {
        let _ = tokio::time::timeout(SEND_TIMEOUT, socket.close()).await;
    }
}

async fn write<W: FrameSink>(socket: &mut W, frames: &[Bytes], failed: &mut bool, dead: &CancellationToken) {
    if *failed {
        return;
    }
    let ok = matches!(tokio::time::timeout(SEND_TIMEOUT, socket.send(frames)).await, Ok(Ok(())));
    if !ok {
        *failed = true;
        dead.cancel();
    }
}

/// Encodes `frame` for `version`; a frame that cannot be encoded (a header
/// this version cannot carry) becomes a bare ERROR.
fn encode(frame: &Frame, version: Version) -> Bytes {
    let mut buf = BytesMut::new();
    if let Err(e) = encode_frame(frame, version, &mut buf) {
        tracing::warn!(error = %e, "cannot encode a STOMP frame");
        buf.clear();
        let _ = encode_frame(&Frame::error("Internal error", ""), version, &mut buf);
    }
    buf.freeze()
}

fn error_frame(f: Fail, receipt: Option<String>) -> Frame {
    let mut frame = Frame::error(f.message, f.body);
    if let Some(r) = receipt {
        frame.headers.push((header::RECEIPT_ID.to_string(), r));
    }
    frame
}

/// Writes one frame straight to the sink (before the writer task runs).
async fn write_now<W: FrameSink>(wr: &mut W, frame: &Frame, version: Version) {
    let bytes = encode(frame, version);
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = wr.send(&[bytes]).await;
        wr.close().await;
    })
    .await;
}

type Reader<R> = FramedRead<R, StompCodec>;

/// What CONNECT negotiated.
struct Connected {
    version: Version,
    user: String,
    vhost: Arc<crate::router::VHost>,
    /// How often we send EOLs, and how long the client may stay silent.
    send_every: Option<Duration>,
    expect_every: Option<Duration>,
    reply: Frame,
}

/// Serves one accepted socket until it closes. The caller runs it inside
/// the connection's tracing span.
/// `cert_user`: the subject CN of the client's verified TLS certificate.
pub async fn serve<R, W>(rd: R, wr: W, conn_id: u64, broker: Arc<Broker>, shutdown: CancellationToken, peer: crate::auth::Peer)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    serve_with(rd, StreamSink::new(wr), conn_id, broker, shutdown, peer).await
}

/// [`serve`] with frames read from the byte stream `rd` and written to
/// `wr` (over TCP, or WebSocket messages turned into/made from frames).
pub async fn serve_with<R, W>(
    rd: R,
    mut wr: W,
    conn_id: u64,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    peer: crate::auth::Peer,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: FrameSink,
{
    let mut reader = FramedRead::new(rd, StompCodec::new(Version::V1_0, Limits::default()));
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match reader.next().await {
                Some(Ok(Item::Heartbeat)) => continue,
                other => return other,
            }
        }
    })
    .await;
    let frame = match first {
        Err(_) | Ok(None) | Ok(Some(Err(DecodeError::Io(_)))) => return,
        Ok(Some(Err(e))) => {
            write_now(&mut wr, &error_frame(fail(e.summary(), e.to_string()), None), Version::V1_0).await;
            return;
        }
        Ok(Some(Ok(Item::Frame(f)))) => f,
        Ok(Some(Ok(Item::Heartbeat))) => return,
    };
    let session_id = format!("session-{:016x}", rand::random::<u64>());
    let connected = match negotiate(&frame, &broker, &session_id, &peer) {
        Ok(c) => c,
        Err((f, version)) => {
            tracing::debug!(message = %f.message, "STOMP CONNECT refused");
            write_now(&mut wr, &error_frame(f, None), version).await;
            return;
        }
    };
    let version = connected.version;
    let slot = match broker.admit() {
        Ok(slot) => slot,
        Err(text) => {
            tracing::info!(limit = ?broker.limits.max_connections, "STOMP connection refused: max_connections reached");
            write_now(&mut wr, &error_frame(fail("not_allowed", format!("{text}\n")), None), version).await;
            return;
        }
    };
    reader.decoder_mut().set_version(version);

    let dead = CancellationToken::new();
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicU64::new(0));
    let mut writer = tokio::spawn(writer_task(wr, rx, queued.clone(), connected.send_every, dead.clone()));
    let wtx = Writer { tx, queued };
    wtx.send(encode(&connected.reply, version), None);

    let (etx, mut events) = mpsc::unbounded_channel();
    let ctx = Arc::new(SessionCtx {
        router: broker.router.clone(),
        vhost: connected.vhost.clone(),
        conn_id,
        user: connected.user.clone(),
        outbox: Arc::new(NoOutbox),
        events: etx,
        cancel_notify: true,
        // Client-ack subscriptions: as AMQP consumers (queue argument
        // `x-consumer-timeout`, else the server's `consumer_timeout`).
        consumer_timeout_ms: broker.limits.consumer_timeout_ms,
        usage: crate::metrics::Usage::new(&connected.user, &connected.vhost.name),
        consumer_max_per_channel: broker.limits.consumer_max_per_channel,
        flow: Default::default(),
    });
    let mut session = Session {
        broker: broker.clone(),
        version,
        session_id,
        channel: Channel::new(CHANNEL, ctx.clone()),
        wtx: wtx.clone(),
        subs: HashMap::new(),
        txs: HashMap::new(),
        declared: HashSet::new(),
        temp: HashMap::new(),
        published: 0,
        confirmed: 0,
        receipts: VecDeque::new(),
        disconnecting: false,
        sent: false,
        held: None,
        blocked: None,
        _slot: slot,
    };
    // The connection's span (server.rs accept_loop) gets the login.
    let span = tracing::Span::current();
    span.record("user", connected.user.as_str());
    span.record("vhost", connected.vhost.name.as_str());
    tracing::debug!(%version, "STOMP session open");
    crate::audit::emit(&broker.router, crate::audit::Event {
        name: "connection.created",
        vhost: Some(&connected.vhost.name),
        user: Some(&connected.user),
        object: Some(&peer.addr),
        protocol: Some("stomp"),
        ..Default::default()
    });
    let end = match session.channel.execute(Command::ConfirmSelect).await {
        Ok(_) => session.run(&mut reader, &mut events, &shutdown, &dead, connected.expect_every).await,
        Err(e) => End::Error(e.into(), None),
    };
    events.close();
    while let Ok(ev) = events.try_recv() {
        if let ConnEvent::Deliver { consumer, delivery, .. } = ev {
            let _ = drop_delivery(&consumer, delivery);
        }
    }
    match end {
        End::Error(f, receipt) => {
            tracing::debug!(message = %f.message, body = %f.body, "STOMP ERROR");
            wtx.send(encode(&error_frame(f, receipt), version), None);
        }
        End::Gone | End::Disconnect => {}
    }
    crate::audit::as_user(connected.user.clone(), async {
        session.channel.close().await;
        broker.router.connection_closed(conn_id).await;
    })
    .await;
    crate::audit::emit(&broker.router, crate::audit::Event {
        name: "connection.closed",
        vhost: Some(&connected.vhost.name),
        user: Some(&connected.user),
        object: Some(&peer.addr),
        protocol: Some("stomp"),
        ..Default::default()
    });
    drop(session);
    drop(ctx);
    drop(wtx);
    if tokio::time::timeout(CLOSE_TIMEOUT, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// CONNECT/STOMP → CONNECTED, or the ERROR to send (in the version to
/// encode it with). Without a `login` header, a client with a verified
/// TLS certificate (`cert_user`, its subject CN) logs in as that user, as
/// RabbitMQ's `ssl_cert_login`; others as guest/guest.
fn negotiate(frame: &Frame, broker: &Broker, session_id: &str, peer: &crate::auth::Peer) -> Result<Connected, (Fail, Version)> {
    let cert_user = peer.cert_user.as_deref();
    if !matches!(frame.command, Cmd::Connect | Cmd::Stomp) {
        return Err((fail("Illegal command", "You must log in using CONNECT first\n"), Version::V1_0));
    }
    let version = match frame.accept_version() {
        None => Version::V1_0,
        Some(list) => match list.into_iter().max() {
            Some(v) => v,
            None => {
                let mut f = fail("Version mismatch", format!("Supported versions are {SUPPORTED}\n"));
                f.body.push_str(&format!("Client asked for {}\n", frame.header(header::ACCEPT_VERSION).unwrap_or("")));
                return Err((f, Version::V1_0));
            }
        },
    };
    let bad = |body: String| (fail("Bad CONNECT", body), version);
    let hb = frame.heart_beat().map_err(|e| bad(e.to_string()))?.unwrap_or_default();
    let host = frame.host().unwrap_or("/");
    let vhost = broker.router.vhost(host).ok_or_else(|| bad(format!("Virtual host '{host}' access denied")))?;
    let (login, allowed) = match (frame.login(), cert_user) {
        (Some(login), _) => (login, broker.router.check_password(login, frame.passcode().unwrap_or(""))),
        // ssl_cert_login: the certificate is the credential.
        (None, Some(cn)) => (cn, broker.router.user_exists(cn)),
        // RabbitMQ's default_user: a CONNECT without login is guest/guest.
        (None, None) => ("guest", broker.router.check_password("guest", frame.passcode().unwrap_or("guest"))),
    };
    let allowed = allowed && crate::auth::check_loopback(login.to_owned(), &broker.loopback_users, peer).is_ok();
    if !allowed {
        tracing::info!(user = login, "STOMP login refused");
        crate::metrics::auth_failed("stomp");
        crate::audit::emit(&broker.router, crate::audit::Event {
            name: "user.authentication.failure",
            user: Some(login),
            object: Some(&peer.addr),
            reason: Some("invalid credentials"),
            protocol: Some("stomp"),
            ..Default::default()
        });
        return Err(bad(format!("Access refused for user '{login}'\n")));
    }
    crate::audit::emit(&broker.router, crate::audit::Event {
        name: "user.authentication.success",
        user: Some(login),
        object: Some(&peer.addr),
        protocol: Some("stomp"),
        ..Default::default()
    });
    if broker.router.permissions(&vhost.name, login).is_none() {
        tracing::info!(user = login, vhost = %vhost.name, "STOMP vhost access refused");
        return Err(bad(format!("Virtual host '{host}' access denied\n")));
    }
    // heart-beat: the client can send every cx ms and wants ours every cy ms.
    let agree = |ms: u32| (ms > 0).then(|| ms.max(MIN_HEARTBEAT_MS));
    let send_every = agree(hb.incoming);
    let expect_every = agree(hb.outgoing);
    let ours = HeartBeat { outgoing: send_every.unwrap_or(0), incoming: expect_every.unwrap_or(0) };
    let reply = Frame::new(Cmd::Connected)
        .with_header(header::VERSION, version.as_str())
        .with_header(header::SESSION, session_id)
        .with_header(header::HEART_BEAT, ours.to_string())
        .with_header(header::SERVER, format!("Sluice/{}", env!("CARGO_PKG_VERSION")));
    Ok(Connected {
        version,
        user: login.to_string(),
        vhost,
        send_every: send_every.map(|ms| Duration::from_millis(u64::from(ms))),
        expect_every: expect_every.map(|ms| Duration::from_millis(u64::from(ms))),
        reply,
    })
}

/// One subscription.
struct Sub {
    /// `subscription` header of its MESSAGE frames (absent for a 1.0
    /// SUBSCRIBE without `id`).
    id: Option<String>,
    ack: AckMode,
    queue: String,
    /// A durable topic/exchange subscription (UNSUBSCRIBE with
    /// `durable:true` deletes its queue).
    durable: bool,
    /// Destination shown in MESSAGE instead of the rebuilt one.
    destination: Option<String>,
}

struct Session {
    broker: Arc<Broker>,
    version: Version,
    session_id: String,
    channel: Channel,
    wtx: Writer,
    /// By consumer tag.
    subs: HashMap<String, Sub>,
    /// Open transactions and their buffered frames.
    txs: HashMap<String, Vec<Frame>>,
    /// `/queue/N` names this session has declared already.
    declared: HashSet<String>,
    /// `/temp-queue/N` → the generated queue.
    temp: HashMap<String, String>,
    /// Publishes made (the channel's confirm sequence).
    published: u64,
    /// Publishes confirmed durable.
    confirmed: u64,
    /// RECEIPTs waiting for `confirmed` to reach their publish count.
    receipts: VecDeque<(u64, String)>,
    /// DISCONNECT seen: no more frames, close once `receipts` is empty.
    disconnecting: bool,
    /// A SEND was read: from now on a resource alarm stops reading this
    /// session (as RabbitMQ blocks connections that publish).
    sent: bool,
    /// The SEND read while an alarm was on, processed once it clears.
    held: Option<Frame>,
    /// Set while a resource alarm keeps us from reading; counts the
    /// session in `sluice_blocked_connections`.
    blocked: Option<crate::metrics::Tracked>,
    /// This session's place under `max_connections`.
    _slot: crate::server::SessionSlot,
}

impl Session {
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut Reader<R>,
        events: &mut mpsc::UnboundedReceiver<ConnEvent>,
        shutdown: &CancellationToken,
        dead: &CancellationToken,
        expect_every: Option<Duration>,
    ) -> End {
        let mut last_read = Instant::now();
        let limit = expect_every.map(|d| d * HEARTBEAT_GRACE);
        let mut check = tokio::time::interval(expect_every.map(|d| d / 2).unwrap_or(Duration::from_secs(3600)));
        let backend = self.broker.router.backend().clone();
        let mut ack_check = tokio::time::interval(ACK_CHECK_EVERY);
        let mut alarms = self.broker.alarms.subscribe();
        // Acks cannot be read while blocked: no consumer timeout until a
        // while after the block ends.
        let mut no_ack_timeouts_until = Instant::now();
        loop {
            if self.disconnecting && self.receipts.is_empty() {
                return End::Disconnect;
            }
            let alarm = *alarms.borrow_and_update();
            let alarm_blocked = alarm.any() && self.sent;
            if alarm_blocked {
                no_ack_timeouts_until = Instant::now() + crate::amqp::connection::ACK_GRACE_AFTER_BLOCK;
            }
            if alarm_blocked != self.blocked.is_some() {
                tracing::debug!(blocked = alarm_blocked, reason = alarm.reason(), "STOMP session blocked state");
                self.blocked = alarm_blocked.then(|| crate::metrics::Tracked::new(&crate::metrics::BLOCKED_CONNECTIONS));
            }
            if !alarm_blocked {
                if let Some(frame) = self.held.take() {
                    if let Err(end) = self.handle(frame).await {
                        return end;
                    }
                    continue;
                }
            }
            let backlog = backend.backlog_bytes() > STORAGE_BACKLOG_LIMIT
                || self.wtx.queued.load(Ordering::Acquire) > WRITER_BACKLOG_LIMIT
                || self.channel.flow_holding();
            let throttled = backlog || alarm_blocked;
            if throttled {
                last_read = Instant::now();
            }
            let reading = !throttled && !self.disconnecting;
            tokio::select! {
                // Backlogs are polled; alarms wake us when they change.
                _ = tokio::time::sleep(Duration::from_millis(1)), if backlog && !alarm_blocked => {}
                Ok(()) = alarms.changed() => {}
                item = reader.next(), if reading => {
                    last_read = Instant::now();
                    match item {
                        None | Some(Err(DecodeError::Io(_))) => return End::Gone,
                        Some(Err(e)) => return End::Error(fail(e.summary(), e.to_string()), None),
                        Some(Ok(Item::Heartbeat)) => {}
                        Some(Ok(Item::Frame(frame))) => {
                            if frame.command == Cmd::Send {
                                self.sent = true;
                                if self.broker.alarms.state().any() {
                                    // Not processed (no receipt) until the alarm clears.
                                    self.held = Some(frame);
                                    continue;
                                }
                            }
                            if let Err(end) = self.handle(frame).await {
                                return end;
                            }
                        }
                    }
                }
                ev = events.recv() => {
                    if let Some(ev) = ev {
                        if let Err(f) = self.on_event(ev) {
                            return End::Error(f, None);
                        }
                    }
                }
                _ = ack_check.tick(), if Instant::now() >= no_ack_timeouts_until => {
                    // Consumer timeout: RabbitMQ closes the channel, which
                    // ends a STOMP connection; its unacknowledged messages
                    // are requeued as the session closes.
                    if let Some(ms) = self.channel.ack_timed_out(Instant::now()) {
                        tracing::info!(timeout_ms = ms, "STOMP consumer timeout");
                        let body = format!(
                            "delivery acknowledgement timed out. Timeout value used: {ms} ms. \
                             This timeout value can be configured, see consumers doc guide to learn more"
                        );
                        return End::Error(fail("consumer timeout", body), None);
                    }
                }
                _ = check.tick() => {
                    if limit.is_some_and(|l| last_read.elapsed() > l) {
                        tracing::info!("STOMP client missed its heart-beats; closing");
                        return End::Gone;
                    }
                }
                _ = dead.cancelled() => return End::Gone,
                _ = shutdown.cancelled() => {
                    return End::Error(fail("connection_forced", "broker forced connection closure with reason 'shutdown'"), None);
                }
            }
        }
    }

    /// Processes one frame; `Err` ends the session.
    async fn handle(&mut self, frame: Frame) -> Result<(), End> {
        let receipt = frame.receipt_request().map(str::to_string);
        self.on_frame(frame).await.map_err(|f| End::Error(f, receipt))
    }

    fn send_frame(&self, frame: &Frame) {
        self.wtx.send(encode(frame, self.version), None);
    }

    /// Sends the RECEIPTs whose SENDs are all confirmed, in order.
    fn flush_receipts(&mut self) {
        while let Some((seq, _)) = self.receipts.front() {
            if *seq > self.confirmed {
                break;
            }
            if let Some((_, id)) = self.receipts.pop_front() {
                self.send_frame(&Frame::receipt(id));
            }
        }
    }

    fn on_event(&mut self, ev: ConnEvent) -> Result<(), Fail> {
        match ev {
            ConnEvent::Deliver { consumer, delivery, .. } => {
                if let Some(Reply::Deliver { consumer_tag, delivery_tag, redelivered, message }) =
                    self.channel.on_delivery(consumer.clone(), delivery)
                {
                    let sub = self.subs.get(&consumer_tag);
                    let d = map::Delivery {
                        subscription: sub.and_then(|s| s.id.as_deref()),
                        ack_id: format!("{consumer_tag}{ID_SEPARATOR}{}{ID_SEPARATOR}{delivery_tag}", self.session_id),
                        client_ack: sub.is_some_and(|s| s.ack != AckMode::Auto),
                        redelivered,
                        destination: sub.and_then(|s| s.destination.clone()),
                    };
                    let frame = map::message_frame(d, message, self.version);
                    self.wtx.send(encode(&frame, self.version), Some(consumer));
                }
            }
            ConnEvent::Confirm { instance, reply, .. } => {
                if instance != self.channel.instance {
                    return Ok(());
                }
                if let Reply::Confirm { delivery_tag, ack, .. } = reply {
                    if !ack {
                        return Err(fail("resource_error", "a message could not be stored durably"));
                    }
                    self.confirmed = self.confirmed.max(delivery_tag);
                    self.flush_receipts();
                }
            }
            ConnEvent::Cancelled { consumer, .. } => {
                if let Some(Reply::ConsumerCancelled { consumer_tag }) = self.channel.on_cancelled(&consumer) {
                    let sub = self.subs.remove(&consumer_tag);
                    let id = sub.and_then(|s| s.id).unwrap_or(consumer_tag);
                    return Err(fail(
                        "Server cancelled subscription",
                        format!("The server has cancelled a subscription.\nNo more messages will be delivered for '{id}'.\n"),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), Fail> {
        let receipt = frame.receipt_request().map(str::to_string);
        match frame.command {
            Cmd::Send | Cmd::Ack | Cmd::Nack if frame.transaction().is_some() => {
                let tx = frame.transaction().unwrap_or_default().to_string();
                let Some(buffered) = self.txs.get_mut(&tx) else {
                    return Err(bad_transaction(&tx));
                };
                buffered.push(frame);
            }
            Cmd::Send => self.on_send(&frame).await?,
            Cmd::Subscribe => self.on_subscribe(&frame).await?,
            Cmd::Unsubscribe => self.on_unsubscribe(&frame).await?,
            Cmd::Ack | Cmd::Nack => self.on_ack(&frame).await?,
            Cmd::Begin => {
                let tx = required(&frame, header::TRANSACTION)?;
                if self.txs.contains_key(tx) {
                    return Err(fail("Bad transaction", format!("Transaction '{tx}' is already open\n")));
                }
                self.txs.insert(tx.to_string(), Vec::new());
            }
            Cmd::Commit => {
                let tx = required(&frame, header::TRANSACTION)?;
                let Some(frames) = self.txs.remove(tx) else {
                    return Err(bad_transaction(tx));
                };
                for f in frames {
                    match f.command {
                        Cmd::Send => self.on_send(&f).await?,
                        _ => self.on_ack(&f).await?,
                    }
                }
            }
            Cmd::Abort => {
                let tx = required(&frame, header::TRANSACTION)?;
                if self.txs.remove(tx).is_none() {
                    return Err(bad_transaction(tx));
                }
            }
            Cmd::Disconnect => {
                self.disconnecting = true;
            }
            Cmd::Connect | Cmd::Stomp => {
                return Err(fail("Bad CONNECT", "Already connected\n"));
            }
            Cmd::Connected | Cmd::Message | Cmd::Receipt | Cmd::Error => {
                return Err(fail("Bad command", format!("Could not interpret command {}\n", frame.command)));
            }
        }
        if let Some(r) = receipt {
            self.receipts.push_back((self.published, r));
            self.flush_receipts();
        }
        Ok(())
    }

    async fn exec(&mut self, cmd: Command) -> Result<Option<Reply>, Fail> {
        Ok(self.channel.execute(cmd).await?)
    }

    /// Declares `/queue/N` (durable unless the headers say otherwise) with
    /// the frame's queue arguments.
    async fn declare(&mut self, name: &str, frame: &Frame, defaults: Params) -> Result<String, Fail> {
        let p = defaults.with_headers(frame)?;
        let arguments = map::queue_arguments(frame).map_err(invalid_header)?;
        let reply = self
            .exec(Command::QueueDeclare {
                name: name.to_string(),
                passive: false,
                durable: p.durable,
                exclusive: p.exclusive,
                auto_delete: p.auto_delete,
                arguments,
                // The name is all STOMP needs back: no counts.
                nowait: !name.is_empty(),
            })
            .await?;
        match reply {
            Some(Reply::QueueDeclareOk { queue, .. }) => Ok(queue),
            _ => Ok(name.to_string()),
        }
    }

    /// The queue behind `/temp-queue/NAME`: created (exclusive,
    /// auto-delete) and subscribed to on first use.
    async fn temp_queue(&mut self, name: &str) -> Result<String, Fail> {
        if let Some(q) = self.temp.get(name) {
            return Ok(q.clone());
        }
        let queue = self
            .declare("", &Frame::new(Cmd::Subscribe), Params { durable: false, auto_delete: true, exclusive: true })
            .await?;
        let tag = format!("T_/temp-queue/{name}");
        self.consume(&queue, &tag, true, Arguments::default()).await?;
        self.subs.insert(
            tag,
            Sub {
                id: Some(format!("/temp-queue/{name}")),
                ack: AckMode::Auto,
                queue: queue.clone(),
                durable: false,
                destination: Some(format!("/temp-queue/{name}")),
            },
        );
        self.temp.insert(name.to_string(), queue.clone());
        Ok(queue)
    }

    async fn consume(&mut self, queue: &str, tag: &str, no_ack: bool, arguments: Arguments) -> Result<(), Fail> {
        self.exec(Command::Consume {
            queue: queue.to_string(),
            consumer_tag: tag.to_string(),
            no_local: false,
            no_ack,
            exclusive: false,
            arguments,
        })
        .await?;
        Ok(())
    }

    async fn on_send(&mut self, frame: &Frame) -> Result<(), Fail> {
        let dest_text = frame
            .destination()
            .ok_or_else(|| fail("Missing destination", "SEND must include a 'destination', and optional 'receipt' headers.\n"))?;
        let dest = Destination::parse(dest_text).map_err(dest_error)?;
        let (exchange, routing_key) = match &dest {
            Destination::Queue(n) => {
                if !self.declared.contains(n) {
                    self.declare(n, frame, Params::QUEUE).await?;
                    self.declared.insert(n.clone());
                }
                dest.routing()
            }
            Destination::TempQueue(n) => (String::new(), self.temp_queue(n).await?),
            _ => dest.routing(),
        };
        let reply_to = match frame.header(header::REPLY_TO).and_then(|r| r.strip_prefix("/temp-queue/")) {
            Some(name) if !name.is_empty() => Some(format!("/reply-queue/{}", self.temp_queue(name).await?)),
            _ => None,
        };
        let message = map::message(frame, exchange, routing_key, reply_to).map_err(invalid_header)?;
        self.exec(Command::Publish { mandatory: false, immediate: false, message }).await?;
        self.published += 1;
        Ok(())
    }

    async fn on_subscribe(&mut self, frame: &Frame) -> Result<(), Fail> {
        let dest_text = frame
            .destination()
            .ok_or_else(|| fail("Missing destination", "SUBSCRIBE must include a 'destination' header.\n"))?;
        let dest = Destination::parse(dest_text).map_err(dest_error)?;
        let id = frame.id().map(str::to_string);
        let tag = match &id {
            Some(id) if id.starts_with("/temp-queue/") => {
                return Err(fail("Invalid id", format!("Subscription ids may not start with /temp-queue/: '{id}'\n")));
            }
            Some(id) => format!("T_{id}"),
            None => format!("Q_{dest_text}"),
        };
        if self.subs.contains_key(&tag) {
            let what = id.as_deref().unwrap_or(dest_text);
            return Err(fail("Duplicated subscription identifier", format!("A subscription identified by '{what}' already exists.\n")));
        }
        let ack = frame.ack_mode().map_err(|e| invalid_header(e.to_string()))?;
        let durable = map::flag(frame, header::DURABLE).map_err(invalid_header)?.unwrap_or(false)
            || map::flag(frame, header::PERSISTENT).map_err(invalid_header)?.unwrap_or(false);
        let mut durable_sub = false;
        let queue = match &dest {
            Destination::Queue(n) => {
                let q = self.declare(n, frame, Params::QUEUE).await?;
                self.declared.insert(n.clone());
                q
            }
            Destination::AmqQueue(n) => n.clone(),
            Destination::Topic(_) | Destination::Exchange(..) => {
                let (exchange, key) = dest.routing();
                let named = frame.header("x-queue-name").map(str::to_string);
                let (name, defaults) = if durable {
                    let Some(id) = &id else {
                        return Err(fail("Missing Header", "Header 'id' is required for durable subscriptions\n"));
                    };
                    durable_sub = true;
                    let name = named.unwrap_or_else(|| subscription_queue_name(dest_text, id));
                    (name, Params { durable: true, auto_delete: false, exclusive: false })
                } else if matches!(dest, Destination::Topic(_)) {
                    (named.unwrap_or_default(), Params { durable: false, auto_delete: true, exclusive: false })
                } else {
                    (named.unwrap_or_default(), Params { durable: false, auto_delete: true, exclusive: true })
                };
                let queue = self.declare(&name, frame, defaults).await?;
                self.exec(Command::QueueBind { queue: queue.clone(), exchange, routing_key: key, arguments: Arguments::default() })
                    .await?;
                queue
            }
            Destination::TempQueue(_) | Destination::ReplyQueue(_) => {
                return Err(fail("Invalid destination", format!("'{dest_text}' cannot be subscribed to.\n")));
            }
        };
        let prefetch = frame.u64_header(header::PREFETCH_COUNT).map_err(|e| invalid_header(e.to_string()))?.unwrap_or(0);
        self.exec(Command::Qos {
            prefetch_size: 0,
            prefetch_count: u16::try_from(prefetch).unwrap_or(u16::MAX),
            global: false,
        })
        .await?;
        self.consume(&queue, &tag, ack == AckMode::Auto, Arguments::default()).await?;
        self.subs.insert(tag, Sub { id, ack, queue, durable: durable_sub, destination: None });
        Ok(())
    }

    async fn on_unsubscribe(&mut self, frame: &Frame) -> Result<(), Fail> {
        let tag = match (frame.id(), frame.destination()) {
            (Some(id), _) => format!("T_{id}"),
            (None, Some(d)) => format!("Q_{d}"),
            (None, None) => return Err(fail("Missing destination or id", "UNSUBSCRIBE must include a 'destination' or 'id' header\n")),
        };
        let Some(sub) = self.subs.remove(&tag) else {
            let what = frame.id().or(frame.destination()).unwrap_or_default();
            return Err(fail("No subscription found", format!("Subscription to '{what}' not found.\n")));
        };
        self.exec(Command::Cancel { consumer_tag: tag }).await?;
        let delete = map::flag(frame, header::DURABLE).map_err(invalid_header)?.unwrap_or(false)
            || map::flag(frame, header::PERSISTENT).map_err(invalid_header)?.unwrap_or(false);
        if delete && sub.durable {
            self.exec(Command::QueueDelete { queue: sub.queue, if_unused: false, if_empty: false }).await?;
        }
        Ok(())
    }

    async fn on_ack(&mut self, frame: &Frame) -> Result<(), Fail> {
        let name = if self.version == Version::V1_2 { header::ID } else { header::MESSAGE_ID };
        let Some(id) = frame.ack_id(self.version) else {
            return Err(fail("Missing header", format!("{} must include a '{name}' header\n", frame.command)));
        };
        let parsed = id.rsplit_once(ID_SEPARATOR).and_then(|(rest, tag)| {
            let (consumer_tag, _session) = rest.rsplit_once(ID_SEPARATOR)?;
            Some((consumer_tag.to_string(), tag.parse::<u64>().ok()?))
        });
        let Some((consumer_tag, delivery_tag)) = parsed else {
            return Err(fail("Invalid header", format!("{} must include a valid '{name}' header\n", frame.command)));
        };
        let multiple = self.subs.get(&consumer_tag).is_some_and(|s| s.ack == AckMode::Client);
        let cmd = if frame.command == Cmd::Ack {
            Command::Ack { delivery_tag, multiple }
        } else {
            let requeue = map::flag(frame, header::REQUEUE).map_err(invalid_header)?.unwrap_or(true);
            Command::Nack { delivery_tag, multiple, requeue }
        };
        self.exec(cmd).await?;
        Ok(())
    }
}

/// Declare flags: defaults per destination kind, overridden by the
/// `durable`/`persistent`, `auto-delete` and `exclusive` headers
/// (RabbitMQ's `build_params`).
#[derive(Clone, Copy)]
struct Params {
    durable: bool,
    auto_delete: bool,
    exclusive: bool,
}

impl Params {
    const QUEUE: Params = Params { durable: true, auto_delete: false, exclusive: false };

    fn with_headers(mut self, frame: &Frame) -> Result<Params, Fail> {
        let get = |name: &'static str| map::flag(frame, name).map_err(invalid_header);
        if let Some(d) = get(header::PERSISTENT)? {
            // On SEND `persistent` is the message's delivery mode, not the queue's.
            if frame.command == Cmd::Subscribe {
                self.durable = d;
            }
        }
        if let Some(d) = get(header::DURABLE)? {
            self.durable = d;
        }
        if let Some(a) = get(header::AUTO_DELETE)? {
            self.auto_delete = a;
        }
        if let Some(e) = get("exclusive")? {
            self.exclusive = e;
        }
        Ok(self)
    }
}

fn required<'a>(frame: &'a Frame, name: &str) -> Result<&'a str, Fail> {
    frame.header(name).ok_or_else(|| fail("Missing header", format!("{} must include a '{name}' header\n", frame.command)))
}

fn bad_transaction(tx: &str) -> Fail {
    fail("Bad transaction", format!("Invalid transaction identifier: '{tx}'\n"))
}

fn invalid_header(detail: String) -> Fail {
    fail("Invalid header", format!("{detail}\n"))
}

fn dest_error(e: DestError) -> Fail {
    let message = match e {
        DestError::Unknown(_) => "Unknown destination",
        DestError::Invalid(_) => "Invalid destination",
    };
    fail(message, format!("{e}\n"))
}

/// The queue of a durable subscription: derived from destination and id
/// (RabbitMQ hashes them with MD5; any stable hash does), so a client that
/// subscribes again with the same id finds its messages.
fn subscription_queue_name(destination: &str, id: &str) -> String {
    let fnv = |seed: u64| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
        for b in destination.bytes().chain([0u8]).chain(id.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    };
    format!("stomp-subscription-{:016x}{:016x}", fnv(0), fnv(0x9e37_79b9_7f4a_7c15))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_subscription_names_are_stable_and_distinct() {
        let a = subscription_queue_name("/topic/a", "1");
        assert_eq!(a, subscription_queue_name("/topic/a", "1"));
        assert_ne!(a, subscription_queue_name("/topic/a", "2"));
        assert_ne!(a, subscription_queue_name("/topic/a1", ""));
        assert!(a.starts_with("stomp-subscription-"));
    }
}
