//! One AMQP 0-9-1 connection: protocol header, start/tune/open handshake,
//! then the frame loop that feeds channels, until connection.close, an
//! error, a missed heartbeat or broker shutdown.
//!
//! Errors close the right scope (spec §4.2, RabbitMQ's behaviour): a soft
//! error sends channel.close and drops that channel's frames until
//! channel.close-ok; a hard error sends connection.close and waits briefly
//! for close-ok.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use sluice_codecs::amqp::map::{inbound, nowait, Inbound};
use sluice_codecs::amqp::reply_code as code;
use sluice_codecs::amqp::frame::FRAME_MIN_SIZE;
use sluice_codecs::amqp::*;
use sluice_codecs::command::Reply;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::writer::{self, AmqpOutbox, WriterHandle, WriterMsg};
use crate::channel::{drop_delivery, Channel, ConnEvent, SessionCtx};
use crate::error::BrokerError;
use crate::server::Broker;

/// How long a client has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long we wait for connection.close-ok after sending connection.close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Above this many bytes of writes queued for storage, connections stop
/// reading from their sockets until storage catches up; TCP then slows the
/// publishers down (RabbitMQ's credit flow has the same effect).
const STORAGE_BACKLOG_LIMIT: u64 = 32 * 1024 * 1024;
/// Above this many bytes queued for our own socket (returns, replies), the
/// connection stops reading: a client that never reads cannot grow it.
const WRITER_BACKLOG_LIMIT: u64 = 16 * 1024 * 1024;

/// Most frames (or deliveries) handled per turn of the connection's
/// select once the first is in: the rest were read already.
const BATCH: usize = 64;
/// After a resource alarm stopped reading a connection, its acks get this
/// long to be read before consumer timeouts are checked again.
pub(crate) const ACK_GRACE_AFTER_BLOCK: Duration = Duration::from_secs(5);

type Reader<R> = FramedRead<R, FrameCodec>;

/// Why the frame loop ended.
enum End {
    /// The peer closed or the socket failed: nothing more to send.
    Gone,
    /// We must send connection.close with this error and wait for close-ok.
    Close(BrokerError, u16, u16),
    /// The client sent connection.close and we answered.
    ClientClosed,
}

struct Slot {
    assembler: Assembler,
    channel: Channel,
    /// We sent channel.close and wait for close-ok.
    closing: bool,
}

/// Serves one accepted socket until it closes.
/// The caller runs it inside the connection's tracing span.
/// The socket comes as two halves: for TCP, `into_split` gives halves
/// without the lock that `tokio::io::split` puts between them (TLS streams
/// over TLS, `tokio::io::split`). `cert_user`: the subject CN of the
/// client's verified TLS certificate, which enables EXTERNAL.
pub async fn serve<R, W>(
    mut rd: R,
    mut wr: W,
    conn_id: u64,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    peer: crate::auth::Peer,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{

    // Protocol header.
    let mut header = [0u8; 8];
    let got = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_header(&mut rd, &mut header)).await;
    match got {
        Ok(Ok(())) => {}
        _ => return,
    }
    if parse_protocol_header(&header) != Some(ProtocolHeader::Amqp091) {
        // Spec §4.2.2: answer with the version we speak, then close.
        let _ = wr.write_all(&PROTOCOL_HEADER).await;
        let _ = wr.shutdown().await;
        tracing::debug!(?header, "refused protocol header");
        return;
    }

    let frame_max = Arc::new(AtomicU32::new(FRAME_MIN_SIZE));
    let heartbeat = Arc::new(AtomicU32::new(0));
    let dead = CancellationToken::new();
    let (wtx, mut writer) = writer::spawn(wr, frame_max.clone(), heartbeat.clone(), dead.clone());
    let mut reader = FramedRead::new(rd, FrameCodec::new(broker.limits.frame_max));

    let mut conn = Conn {
        broker: broker.clone(),
        wtx,
        dead,
        conn_id,
        channels: HashMap::default(),
        frame_max: FRAME_MIN_SIZE,
        channel_max: 0,
        heartbeat: 0,
        cert_user: peer.cert_user,
        loopback: peer.loopback,
        peer_addr: peer.addr,
        blocked_notify: false,
        published: false,
        blocked: None,
        _slot: None,
    };

    let ctx = match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.handshake(&mut reader)).await {
        Ok(Ok(Some(ctx))) => ctx,
        Ok(Ok(None)) | Err(_) => {
            drop(conn);
            finish_writer(&mut writer).await;
            return;
        }
        Ok(Err((e, class_id, method_id))) => {
            conn.send_close(&e, class_id, method_id);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, wait_close_ok(&mut reader)).await;
            drop(conn);
            finish_writer(&mut writer).await;
            return;
        }
    };
    frame_max.store(conn.frame_max, Ordering::Release);
    heartbeat.store(u32::from(conn.heartbeat), Ordering::Release);
    reader.decoder_mut().frame_max = conn.frame_max;
    // The connection's span (server.rs accept_loop) gets the login.
    let span = tracing::Span::current();
    span.record("user", ctx.1.user.as_str());
    span.record("vhost", ctx.1.vhost.name.as_str());
    tracing::debug!("connection open");

    let (mut events, session) = ctx;
    let end = conn.run(&mut reader, &mut events, session.clone(), &shutdown).await;
    // Deliveries still queued for us have no delivery tag yet, so closing
    // the channels would not requeue them: hand them back first. Closing
    // the receiver makes queues requeue anything they try to send later.
    events.close();
    while let Ok(ev) = events.try_recv() {
        if let ConnEvent::Deliver { consumer, delivery, .. } = ev {
            let _ = drop_delivery(&consumer, delivery);
        }
    }
    match end {
        End::Close(e, class_id, method_id) => {
            tracing::debug!(error = %e, "closing connection");
            conn.send_close(&e, class_id, method_id);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, wait_close_ok(&mut reader)).await;
        }
        End::ClientClosed | End::Gone => {}
    }
    for (_, mut slot) in conn.channels.drain() {
        slot.channel.close().await;
    }
    let user = session.user.clone();
    crate::audit::as_user(user.clone(), broker.router.connection_closed(conn_id)).await;
    crate::audit::emit(&broker.router, crate::audit::Event {
        name: "connection.closed",
        vhost: Some(&session.vhost.name),
        user: Some(&user),
        object: Some(&conn.peer_addr),
        protocol: Some("amqp"),
        ..Default::default()
    });
    drop(session);
    drop(conn);
    finish_writer(&mut writer).await;
}

/// Lets the writer flush what is queued, but never waits for a stuck
/// socket longer than the close timeout.
async fn finish_writer(writer: &mut tokio::task::JoinHandle<()>) {
    if tokio::time::timeout(CLOSE_TIMEOUT, &mut *writer).await.is_err() {
        writer.abort();
    }
}

async fn read_header<R: AsyncRead + Unpin>(rd: &mut R, header: &mut [u8; 8]) -> std::io::Result<()> {
    // Read what arrives; a peer that sends fewer than 8 bytes and closes
    // still gets our header back.
    let mut n = 0;
    while n < 8 {
        let Some(rest) = header.get_mut(n..) else { break };
        let r = rd.read(rest).await?;
        if r == 0 {
            break;
        }
        n += r;
    }
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn wait_close_ok<R: AsyncRead + Unpin>(reader: &mut Reader<R>) {
    while let Some(Ok(frame)) = reader.next().await {
        if let Frame::Method { channel: 0, method: Method::ConnectionCloseOk(_) | Method::ConnectionClose(_) } = frame {
            return;
        }
    }
}

struct Conn {
    broker: Arc<Broker>,
    wtx: WriterHandle,
    /// Cancelled by the writer when the socket fails or stalls.
    dead: CancellationToken,
    conn_id: u64,
    channels: HashMap<u16, Slot, BuildHasherDefault<ChannelHasher>>,
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    /// The verified client certificate's subject CN (EXTERNAL).
    cert_user: Option<String>,
    /// The peer's address is a loopback one (`loopback_users`).
    loopback: bool,
    /// The peer's address (audit events).
    peer_addr: String,
    /// The client announced the `connection.blocked` capability.
    blocked_notify: bool,
    /// A content header was read: from now on a resource alarm stops
    /// reading this connection (RabbitMQ blocks connections that publish).
    published: bool,
    /// Set while a resource alarm keeps us from reading; counts the
    /// connection in `sluice_blocked_connections`.
    blocked: Option<crate::metrics::Tracked>,
    /// This session's place under `max_connections`.
    _slot: Option<crate::server::SessionSlot>,
}

type HandshakeError = (BrokerError, u16, u16);

fn method_ids(m: &Method) -> (u16, u16) {
    (m.class_id(), m.method_id())
}

impl Conn {
    fn send_method(&self, channel: u16, method: Method) {
        let mut buf = BytesMut::new();
        encode_method_frame(channel, &method, &mut buf);
        self.wtx.send(WriterMsg::Raw(buf.freeze()));
    }

    fn send_close(&self, e: &BrokerError, class_id: u16, method_id: u16) {
        self.send_method(
            0,
            Method::ConnectionClose(ConnectionClose { reply_code: e.code, reply_text: e.text.clone(), class_id, method_id }),
        );
    }

    /// start → start-ok → tune → tune-ok → open → open-ok. `Ok(None)`: the
    /// peer went away or was refused without a close.
    async fn handshake<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut Reader<R>,
    ) -> Result<Option<(mpsc::UnboundedReceiver<ConnEvent>, Arc<SessionCtx>)>, HandshakeError> {
        self.send_method(0, Method::ConnectionStart(ConnectionStart {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            mechanisms: Bytes::from_static(crate::auth::mechanisms(self.cert_user.as_deref())),
            locales: Bytes::from_static(b"en_US"),
        }));
        let Some(start_ok) = next_method(reader).await? else { return Ok(None) };
        let Method::ConnectionStartOk(start_ok) = start_ok else {
            let ids = method_ids(&start_ok);
            return Err((BrokerError::connection(code::COMMAND_INVALID, "expected connection.start-ok"), ids.0, ids.1));
        };
        let failure_close = start_ok
            .client_properties
            .get("capabilities")
            .and_then(|c| c.as_table())
            .and_then(|c| c.get("authentication_failure_close"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        self.blocked_notify = start_ok
            .client_properties
            .get("capabilities")
            .and_then(|c| c.as_table())
            .and_then(|c| c.get("connection.blocked"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let cancel_notify = start_ok
            .client_properties
            .get("capabilities")
            .and_then(|c| c.as_table())
            .and_then(|c| c.get("consumer_cancel_notify"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let peer = crate::auth::Peer { cert_user: self.cert_user.clone(), loopback: self.loopback, addr: self.peer_addr.clone() };
        let login = crate::auth::authenticate(&self.broker.router, &start_ok.mechanism, &start_ok.response, self.cert_user.as_deref())
            .and_then(|user| crate::auth::check_loopback(user, &self.broker.loopback_users, &peer));
        let user = match login {
            Ok(user) => user,
            Err(crate::auth::AuthError::UnknownMechanism(m)) => {
                return Err((
                    BrokerError::connection(code::COMMAND_INVALID, format!("unknown authentication mechanism '{m}'")),
                    10,
                    11,
                ));
            }
            Err(e) => {
                tracing::info!(error = %e, "login refused");
                crate::metrics::auth_failed("amqp");
                let reason = e.to_string();
                crate::audit::emit(&self.broker.router, crate::audit::Event {
                    name: "user.authentication.failure",
                    user: e.user(),
                    object: Some(&self.peer_addr),
                    reason: Some(&reason),
                    protocol: Some("amqp"),
                    ..Default::default()
                });
                let refused = BrokerError::connection(
                    code::ACCESS_REFUSED,
                    format!("Login was refused using authentication mechanism {}. For details see the broker logfile.", start_ok.mechanism),
                );
                if failure_close {
                    return Err((refused, 10, 11));
                }
                // Without the capability the spec says: just close the socket.
                return Ok(None);
            }
        };
        crate::audit::emit(&self.broker.router, crate::audit::Event {
            name: "user.authentication.success",
            user: Some(&user),
            object: Some(&self.peer_addr),
            protocol: Some("amqp"),
            ..Default::default()
        });
        let limits = &self.broker.limits;
        self.send_method(0, Method::ConnectionTune(ConnectionTune {
            channel_max: limits.channel_max,
            frame_max: limits.frame_max,
            heartbeat: limits.heartbeat,
        }));
        let Some(tune_ok) = next_method(reader).await? else { return Ok(None) };
        let Method::ConnectionTuneOk(tune_ok) = tune_ok else {
            let ids = method_ids(&tune_ok);
            return Err((BrokerError::connection(code::COMMAND_INVALID, "expected connection.tune-ok"), ids.0, ids.1));
        };
        let not_allowed = |t: String| Err((BrokerError::connection(code::NOT_ALLOWED, t), 10, 31));
        if tune_ok.frame_max != 0 && tune_ok.frame_max < FRAME_MIN_SIZE {
            return not_allowed(format!("frame_max={} < {} min size", tune_ok.frame_max, FRAME_MIN_SIZE));
        }
        if tune_ok.frame_max > limits.frame_max {
            return not_allowed(format!("frame_max={} > {} max size", tune_ok.frame_max, limits.frame_max));
        }
        if tune_ok.channel_max > limits.channel_max {
            return not_allowed(format!("channel_max={} > {} max", tune_ok.channel_max, limits.channel_max));
        }
        self.frame_max = if tune_ok.frame_max == 0 { limits.frame_max } else { tune_ok.frame_max };
        self.channel_max = if tune_ok.channel_max == 0 { limits.channel_max } else { tune_ok.channel_max };
        self.heartbeat = tune_ok.heartbeat;

        let Some(open) = next_method(reader).await? else { return Ok(None) };
        let Method::ConnectionOpen(open) = open else {
            let ids = method_ids(&open);
            return Err((BrokerError::connection(code::COMMAND_INVALID, "expected connection.open"), ids.0, ids.1));
        };
        let Some(vhost) = self.broker.router.vhost(&open.virtual_host) else {
            return Err((
                BrokerError::connection(code::NOT_ALLOWED, format!("vhost {} not found", open.virtual_host)),
                10,
                40,
            ));
        };
        if self.broker.router.permissions(&vhost.name, &user).is_none() {
            tracing::info!(user = %user, vhost = %vhost.name, "vhost access refused");
            return Err((
                BrokerError::connection(
                    code::NOT_ALLOWED,
                    format!("access to vhost '{}' refused for user '{user}'", vhost.name),
                ),
                10,
                40,
            ));
        }
        match self.broker.admit() {
            Ok(slot) => self._slot = Some(slot),
            Err(text) => {
                tracing::info!(limit = ?self.broker.limits.max_connections, "connection refused: max_connections reached");
                return Err((BrokerError::connection(code::NOT_ALLOWED, text), 10, 40));
            }
        }
        self.send_method(0, Method::ConnectionOpenOk(ConnectionOpenOk { known_hosts: String::new() }));
        crate::audit::emit(&self.broker.router, crate::audit::Event {
            name: "connection.created",
            vhost: Some(&vhost.name),
            user: Some(&user),
            object: Some(&self.peer_addr),
            protocol: Some("amqp"),
            ..Default::default()
        });
        let (etx, erx) = mpsc::unbounded_channel();
        let usage = crate::metrics::Usage::new(&user, &vhost.name);
        let ctx = Arc::new(SessionCtx {
            router: self.broker.router.clone(),
            vhost,
            conn_id: self.conn_id,
            user,
            outbox: Arc::new(AmqpOutbox(self.wtx.clone())),
            events: etx,
            cancel_notify,
            consumer_timeout_ms: self.broker.limits.consumer_timeout_ms,
            usage,
            consumer_max_per_channel: self.broker.limits.consumer_max_per_channel,
            flow: Default::default(),
        });
        Ok(Some((erx, ctx)))
    }

    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut Reader<R>,
        events: &mut mpsc::UnboundedReceiver<ConnEvent>,
        ctx: Arc<SessionCtx>,
        shutdown: &CancellationToken,
    ) -> End {
        let hb = Duration::from_secs(u64::from(self.heartbeat));
        let mut last_read = Instant::now();
        let mut check = tokio::time::interval(if self.heartbeat == 0 { Duration::from_secs(3600) } else { hb });
        let backend = self.broker.router.backend().clone();
        // Consumer timeouts are checked once a second (RabbitMQ: once a
        // minute by default).
        let mut ack_check = tokio::time::interval(Duration::from_secs(1));
        let mut alarms = self.broker.alarms.subscribe();
        // Acks cannot be read while blocked: no consumer timeout until a
        // while after the block ends.
        let mut no_ack_timeouts_until = Instant::now();
        loop {
            let alarm = *alarms.borrow_and_update();
            self.update_blocked(alarm);
            let alarm_blocked = self.blocked.is_some();
            if alarm_blocked {
                no_ack_timeouts_until = Instant::now() + ACK_GRACE_AFTER_BLOCK;
            }
            // Storage or our writer behind, or flow control: a queue we
            // published to is behind its consumers.
            let backlog = backend.backlog_bytes() > STORAGE_BACKLOG_LIMIT
                || self.wtx.queued_bytes() > WRITER_BACKLOG_LIMIT
                || ctx.flow.holding();
            let throttled = alarm_blocked || backlog;
            if throttled {
                // Our silence is not the client's: don't count it as missed heartbeats.
                last_read = Instant::now();
            }
            tokio::select! {
                // Backlogs are polled; alarms wake us when they change.
                _ = tokio::time::sleep(Duration::from_millis(1)), if backlog && !alarm_blocked => {}
                Ok(()) = alarms.changed() => {}
                frame = reader.next(), if !throttled => {
                    last_read = Instant::now();
                    if let Some(end) = self.on_read(frame, &ctx).await {
                        return end;
                    }
                    // Frames already read are handled without another turn
                    // of the select (which costs more than a small frame),
                    // a bounded batch so deliveries and timers get theirs.
                    for _ in 1..BATCH {
                        // What stops reading at the top of the loop stops
                        // the batch: a resource alarm once this connection
                        // published (its next frames are not read), flow
                        // control, backlogs.
                        if (self.published && alarms.borrow().any())
                            || ctx.flow.holding()
                            || self.wtx.queued_bytes() > WRITER_BACKLOG_LIMIT
                            || backend.backlog_bytes() > STORAGE_BACKLOG_LIMIT
                        {
                            break;
                        }
                        let Some(frame) = futures_util::FutureExt::now_or_never(reader.next()) else { break };
                        if let Some(end) = self.on_read(frame, &ctx).await {
                            return end;
                        }
                    }
                }
                ev = events.recv() => {
                    if let Some(ev) = ev {
                        self.on_event(ev);
                        // Likewise for deliveries already queued.
                        for _ in 1..BATCH {
                            let Ok(ev) = events.try_recv() else { break };
                            self.on_event(ev);
                        }
                    }
                }
                _ = ack_check.tick(), if Instant::now() >= no_ack_timeouts_until => {
                    let now = Instant::now();
                    let late: Vec<(u16, u64)> = self
                        .channels
                        .iter()
                        .filter(|(_, slot)| !slot.closing)
                        .filter_map(|(id, slot)| slot.channel.ack_timed_out(now).map(|ms| (*id, ms)))
                        .collect();
                    for (channel, ms) in late {
                        let text = format!(
                            "delivery acknowledgement on channel {channel} timed out. Timeout value used: {ms} ms. \
                             This timeout value can be configured, see consumers doc guide to learn more"
                        );
                        tracing::info!(channel, timeout_ms = ms, "consumer timeout");
                        self.channel_error(channel, BrokerError::precondition(text), 0, 0).await;
                    }
                }
                _ = check.tick() => {
                    // Spec §4.2.7: after two missed heartbeats the peer is dead.
                    if self.heartbeat != 0 && last_read.elapsed() > hb * 2 {
                        tracing::info!(timeout = self.heartbeat, "missed heartbeats from client");
                        return End::Gone;
                    }
                }
                _ = self.dead.cancelled() => return End::Gone,
                _ = shutdown.cancelled() => {
                    return End::Close(
                        BrokerError::connection(code::CONNECTION_FORCED, "broker forced connection closure with reason 'shutdown'"),
                        0,
                        0,
                    );
                }
            }
        }
    }

    /// One read from the socket: a frame handled, or why the connection
    /// ends.
    async fn on_read(&mut self, frame: Option<Result<Frame, DecodeError>>, ctx: &Arc<SessionCtx>) -> Option<End> {
        match frame {
            None => Some(End::Gone),
            Some(Err(DecodeError::Io(_))) => Some(End::Gone),
            Some(Err(e)) => Some(End::Close(BrokerError::connection(e.reply_code(), e.to_string()), 0, 0)),
            Some(Ok(frame)) => self.on_frame(frame, ctx).await,
        }
    }

    /// Blocks or unblocks the connection for the alarm state `alarm`:
    /// a connection that has published is not read while an alarm is on,
    /// and is told so with connection.blocked / connection.unblocked if it
    /// announced the capability. Others are blocked when they publish.
    fn update_blocked(&mut self, alarm: crate::alarm::AlarmState) {
        let block = alarm.any() && self.published;
        if block == self.blocked.is_some() {
            return;
        }
        if block {
            tracing::debug!(reason = alarm.reason(), "connection blocked by a resource alarm");
            self.blocked = Some(crate::metrics::Tracked::new(&crate::metrics::BLOCKED_CONNECTIONS));
            if self.blocked_notify {
                self.send_method(0, Method::ConnectionBlocked(ConnectionBlocked { reason: alarm.reason().to_string() }));
            }
        } else {
            tracing::debug!("connection unblocked");
            self.blocked = None;
            if self.blocked_notify {
                self.send_method(0, Method::ConnectionUnblocked(ConnectionUnblocked {}));
            }
        }
    }

    fn on_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Deliver { channel, consumer, delivery } => {
                let reply = match self.channels.get_mut(&channel) {
                    Some(slot) if !slot.closing => slot.channel.on_delivery(consumer.clone(), delivery),
                    _ => {
                        // The channel is gone with all its consumers: no
                        // other queue waits for its credit.
                        let _ = drop_delivery(&consumer, delivery);
                        None
                    }
                };
                if let Some(reply) = reply {
                    self.wtx.send(WriterMsg::Reply { channel, reply, consumer: Some(consumer) });
                }
            }
            ConnEvent::Confirm { channel, instance, reply } => {
                let live = self.channels.get(&channel).is_some_and(|s| !s.closing && s.channel.instance == instance);
                if live {
                    self.wtx.send(WriterMsg::Reply { channel, reply, consumer: None });
                }
            }
            ConnEvent::Cancelled { channel, consumer } => {
                if let Some(slot) = self.channels.get_mut(&channel) {
                    if let Some(reply) = slot.channel.on_cancelled(&consumer) {
                        self.wtx.send(WriterMsg::Reply { channel, reply, consumer: None });
                    }
                }
            }
        }
    }

    fn reply(&self, channel: u16, reply: Reply) {
        self.wtx.send(WriterMsg::Reply { channel, reply, consumer: None });
    }

    /// Handles one frame; `Some` ends the connection.
    async fn on_frame(&mut self, frame: Frame, ctx: &Arc<SessionCtx>) -> Option<End> {
        let channel = frame.channel();
        if let Frame::Heartbeat { .. } = frame {
            if channel != 0 {
                return Some(End::Close(BrokerError::connection(code::UNEXPECTED_FRAME, "heartbeat on non-zero channel"), 0, 0));
            }
            return None;
        }
        if channel == 0 {
            return self.on_channel_zero(frame);
        }
        if let Frame::Header { .. } = frame {
            self.published = true;
        }
        if channel > self.channel_max {
            return Some(End::Close(
                BrokerError::connection(code::CHANNEL_ERROR, format!("channel number {channel} > channel_max {}", self.channel_max)),
                0,
                0,
            ));
        }
        let Some(slot) = self.channels.get_mut(&channel) else {
            return match frame {
                Frame::Method { method: Method::ChannelOpen(_), .. } => {
                    self.channels.insert(
                        channel,
                        Slot {
                            assembler: Assembler::with_max_body(self.broker.limits.max_message_size),
                            channel: Channel::new(channel, ctx.clone()),
                            closing: false,
                        },
                    );
                    self.send_method(channel, Method::ChannelOpenOk(ChannelOpenOk { reserved_1: Bytes::new() }));
                    None
                }
                Frame::Method { method, .. } => {
                    let (c, m) = method_ids(&method);
                    Some(End::Close(
                        BrokerError::connection(code::CHANNEL_ERROR, format!("expected 'channel.open' on channel {channel}")),
                        c,
                        m,
                    ))
                }
                _ => Some(End::Close(
                    BrokerError::connection(code::CHANNEL_ERROR, format!("content frame on unopened channel {channel}")),
                    0,
                    0,
                )),
            };
        };
        if slot.closing {
            // Spec: after channel.close, discard everything but close-ok.
            match frame {
                Frame::Method { method: Method::ChannelCloseOk(_), .. } => {
                    self.channels.remove(&channel);
                }
                Frame::Method { method: Method::ChannelClose(_), .. } => {
                    self.send_method(channel, Method::ChannelCloseOk(ChannelCloseOk {}));
                    self.channels.remove(&channel);
                }
                _ => {}
            }
            return None;
        }
        let assembled = match slot.assembler.push(frame) {
            Ok(Some(a)) => a,
            Ok(None) => return None,
            Err(e) if e.is_channel_error() => {
                self.channel_error(channel, BrokerError::channel(e.reply_code(), e.to_string()), 60, 40).await;
                return None;
            }
            Err(e) => return Some(End::Close(BrokerError::connection(e.reply_code(), e.to_string()), 0, 0)),
        };
        let (method_ref_ids, no_wait) = match &assembled {
            Assembled::Method(m) | Assembled::Content { method: m, .. } => (method_ids(m), nowait(m)),
        };
        match inbound(assembled) {
            Inbound::Command(cmd) => {
                let result = match self.channels.get_mut(&channel) {
                    Some(slot) => slot.channel.execute(cmd).await,
                    None => return None,
                };
                match result {
                    Ok(Some(reply)) => {
                        if !no_wait {
                            self.reply(channel, reply);
                        }
                    }
                    Ok(None) => {}
                    Err(e) if e.connection => return Some(End::Close(e, method_ref_ids.0, method_ref_ids.1)),
                    Err(e) => self.channel_error(channel, e, method_ref_ids.0, method_ref_ids.1).await,
                }
                None
            }
            Inbound::Session(Method::ChannelClose(_)) => {
                if let Some(mut slot) = self.channels.remove(&channel) {
                    slot.channel.close().await;
                }
                self.send_method(channel, Method::ChannelCloseOk(ChannelCloseOk {}));
                None
            }
            Inbound::Session(Method::ChannelCloseOk(_)) | Inbound::Session(Method::ChannelFlowOk(_)) => None,
            Inbound::Session(Method::ChannelFlow(f)) => {
                if let Some(slot) = self.channels.get_mut(&channel) {
                    slot.channel.set_flow(f.active);
                }
                self.send_method(channel, Method::ChannelFlowOk(ChannelFlowOk { active: f.active }));
                None
            }
            Inbound::Session(Method::ChannelOpen(_)) => Some(End::Close(
                BrokerError::connection(code::CHANNEL_ERROR, format!("second 'channel.open' seen on channel {channel}")),
                20,
                10,
            )),
            Inbound::Session(m) | Inbound::Unexpected(m) => {
                let (c, mid) = method_ids(&m);
                Some(End::Close(
                    BrokerError::connection(code::COMMAND_INVALID, format!("method {} not allowed here", m.name())),
                    c,
                    mid,
                ))
            }
        }
    }

    fn on_channel_zero(&mut self, frame: Frame) -> Option<End> {
        match frame {
            Frame::Method { method: Method::ConnectionClose(_), .. } => {
                self.send_method(0, Method::ConnectionCloseOk(ConnectionCloseOk {}));
                Some(End::ClientClosed)
            }
            Frame::Method { method: Method::ConnectionCloseOk(_), .. } => Some(End::Gone),
            Frame::Method { method: Method::ConnectionUpdateSecret(_), .. } => {
                // No expiring credentials yet: accept and acknowledge, as
                // RabbitMQ does for backends without secret checks.
                self.send_method(0, Method::ConnectionUpdateSecretOk(ConnectionUpdateSecretOk {}));
                None
            }
            Frame::Method { method: Method::ConnectionBlocked(_) | Method::ConnectionUnblocked(_), .. } => None,
            Frame::Method { method, .. } => {
                let (c, m) = method_ids(&method);
                Some(End::Close(
                    BrokerError::connection(code::COMMAND_INVALID, format!("method {} not allowed on channel 0", method.name())),
                    c,
                    m,
                ))
            }
            _ => Some(End::Close(BrokerError::connection(code::UNEXPECTED_FRAME, "content frame on channel 0"), 0, 0)),
        }
    }

    /// Soft error: close the channel, keep the connection.
    async fn channel_error(&mut self, channel: u16, e: BrokerError, class_id: u16, method_id: u16) {
        tracing::debug!(channel, error = %e, "channel error");
        if let Some(slot) = self.channels.get_mut(&channel) {
            slot.channel.close().await;
            slot.closing = true;
            slot.assembler = Assembler::new();
        }
        self.send_method(
            channel,
            Method::ChannelClose(ChannelClose { reply_code: e.code, reply_text: e.text, class_id, method_id }),
        );
    }
}

/// Reads frames until a method on channel 0 arrives (handshake only).
async fn next_method<R: AsyncRead + Unpin>(reader: &mut Reader<R>) -> Result<Option<Method>, HandshakeError> {
    loop {
        match reader.next().await {
            None => return Ok(None),
            Some(Err(DecodeError::Io(_))) => return Ok(None),
            Some(Err(e)) => return Err((BrokerError::connection(e.reply_code(), e.to_string()), 0, 0)),
            Some(Ok(Frame::Heartbeat { .. })) => continue,
            Some(Ok(Frame::Method { channel: 0, method })) => return Ok(Some(method)),
            Some(Ok(_)) => {
                return Err((BrokerError::connection(code::UNEXPECTED_FRAME, "unexpected frame during handshake"), 0, 0))
            }
        }
    }
}

fn server_properties() -> FieldTable {
    let s = |v: &str| FieldValue::LongString(Bytes::copy_from_slice(v.as_bytes()));
    let caps: FieldTable = [
        ("publisher_confirms", FieldValue::Bool(true)),
        ("exchange_exchange_bindings", FieldValue::Bool(true)),
        ("basic.nack", FieldValue::Bool(true)),
        ("consumer_cancel_notify", FieldValue::Bool(true)),
        ("connection.blocked", FieldValue::Bool(true)),
        ("authentication_failure_close", FieldValue::Bool(true)),
        ("per_consumer_qos", FieldValue::Bool(true)),
        ("direct_reply_to", FieldValue::Bool(false)),
        ("consumer_priorities", FieldValue::Bool(false)),
    ]
    .into_iter()
    .collect();
    [
        ("product", s("Sluice")),
        ("version", s(env!("CARGO_PKG_VERSION"))),
        ("platform", s("Rust")),
        ("cluster_name", s("sluice")),
        ("copyright", s("Sluice contributors")),
        ("information", s("Licensed under the Apache License 2.0")),
        ("capabilities", FieldValue::Table(caps)),
    ]
    .into_iter()
    .collect()
}

/// Hashes the connection's channel numbers: a multiply instead of SipHash,
/// which cost about 2% of the broker's instructions per message (three
/// lookups, one per frame of a publish). Keys are at most `channel_max`
/// small integers, so there is nothing to flood.
#[derive(Default)]
struct ChannelHasher(u64);

impl Hasher for ChannelHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u16(u16::from(*b) ^ (self.0 as u16));
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}
