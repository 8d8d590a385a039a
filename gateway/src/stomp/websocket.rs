//! STOMP over WebSocket, as RabbitMQ's Web-STOMP plugin: an HTTP/1.1
//! upgrade at `/ws`, then the STOMP session of [`super::connection`] with
//! WebSocket messages as its transport.
//!
//! * Incoming text and binary messages are concatenated into the byte
//!   stream the STOMP decoder reads (through an in-memory pipe), so a
//!   message may hold one frame, several, or part of one (RabbitMQ feeds
//!   its parser the same way). Pings are answered, a close is echoed.
//! * Each outgoing STOMP frame (and each heart-beat EOL) is one message:
//!   a text message when the frame is UTF-8, binary otherwise (RabbitMQ
//!   sends everything as text unless `web_stomp.ws_frame = binary`).
//! * The subprotocol answered is the highest of `v12.stomp`, `v11.stomp`,
//!   `v10.stomp` offered, else `stomp`; a client offering none of them is
//!   still accepted, without the header (RabbitMQ). The STOMP version is
//!   negotiated by CONNECT, as over TCP.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use sluice_codecs::ws::{self, close_code, Message, MessageDecoder, Opcode, Role};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::connection::{serve_with, FrameSink};
use crate::server::Broker;

/// The only path served.
pub const PATH: &str = "/ws";
/// Largest request head.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client has to send its upgrade request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest incoming message: a STOMP frame at its 4 MiB limit plus some
/// heart-beat EOLs. Larger messages close the connection with 1009.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024 + 1024;
/// Bytes buffered between the WebSocket reader and the STOMP decoder.
const PIPE: usize = 64 * 1024;
/// How long a close frame and the client's answer get.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// The write half, shared by the STOMP writer and the reader (pongs, close).
struct Out<W> {
    wr: W,
    /// A close frame was sent: nothing more may follow.
    closed: bool,
}

impl<W: AsyncWrite + Unpin> Out<W> {
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.closed {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        self.wr.write_all(bytes).await?;
        // A no-op on TCP; over TLS it pushes out what the TLS layer holds.
        self.wr.flush().await
    }

    /// Sends a close frame (once) and shuts the write side down.
    async fn close(&mut self, code: u16, reason: &str) {
        if self.closed {
            return;
        }
        self.closed = true;
        let mut buf = BytesMut::new();
        ws::encode_close(code, reason, None, &mut buf);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            let _ = self.wr.write_all(&buf).await;
            let _ = self.wr.shutdown().await;
        })
        .await;
    }
}

/// STOMP frames out as WebSocket messages.
struct WsSink<W> {
    out: Arc<Mutex<Out<W>>>,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin + Send + 'static> FrameSink for WsSink<W> {
    async fn send(&mut self, frames: &[Bytes]) -> std::io::Result<()> {
        self.buf.clear();
        for f in frames {
            let opcode = if std::str::from_utf8(f).is_ok() { Opcode::Text } else { Opcode::Binary };
            ws::encode_frame(true, opcode, f, None, &mut self.buf);
        }
        self.out.lock().await.write(&self.buf).await
    }

    async fn close(&mut self) {
        self.out.lock().await.close(close_code::NORMAL, "").await;
    }
}

/// Serves one accepted socket (its two halves, over TCP or TLS): the
/// upgrade, then the STOMP session. The caller runs it inside the
/// connection's tracing span. `cert_user`: the subject CN of the client's
/// verified TLS certificate.
pub async fn serve<R, W>(mut rd: R, mut wr: W, conn_id: u64, broker: Arc<Broker>, shutdown: CancellationToken, peer: crate::auth::Peer)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let upgraded = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut rd, &mut wr)) => r,
        _ = shutdown.cancelled() => return,
    };
    let leftover = match upgraded {
        Ok(Some(l)) => l,
        Ok(None) => {
            drain(&mut rd).await;
            return;
        }
        Err(_) => return,
    };
    let out = Arc::new(Mutex::new(Out { wr, closed: false }));
    let (session_end, reader_end) = tokio::io::duplex(PIPE);
    let done = CancellationToken::new();
    let sink = WsSink { out: out.clone(), buf: BytesMut::new() };
    let session = {
        let done = done.clone();
        async move {
            serve_with(session_end, sink, conn_id, broker, shutdown, peer).await;
            done.cancel();
        }
    };
    tokio::join!(session, read_loop(rd, leftover, reader_end, out, done));
}

/// Reads the upgrade request and answers it: the bytes that followed the
/// request head once upgraded, `None` after an error answer.
async fn handshake<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(rd: &mut R, wr: &mut W) -> Option<BytesMut> {
    let mut buf = BytesMut::with_capacity(2048);
    let (req, len) = loop {
        match ws::parse_request(&buf, MAX_HEAD) {
            Ok(Some(r)) => break r,
            Ok(None) => match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            },
            Err(e) => return reject(wr, e.status(), &e.to_string()).await,
        }
    };
    buf.advance(len);
    if req.path != PATH {
        return reject(wr, 404, &format!("Nothing is served at {}; STOMP over WebSocket is at {PATH}", req.path)).await;
    }
    let upgrade = match ws::check_upgrade(&req) {
        Ok(u) => u,
        Err(e) => return reject(wr, e.status(), &format!("Not a WebSocket upgrade: {e}")).await,
    };
    let protocol = choose_protocol(&upgrade.protocols);
    tracing::debug!(?protocol, offered = ?upgrade.protocols, "Web-STOMP upgrade");
    let answer = ws::response_101(&upgrade.key, protocol);
    let sent = async {
        wr.write_all(answer.as_bytes()).await?;
        wr.flush().await
    };
    match tokio::time::timeout(CLOSE_TIMEOUT, sent).await {
        Ok(Ok(())) => Some(buf),
        _ => None,
    }
}

async fn reject<W: AsyncWrite + Unpin>(wr: &mut W, status: u16, body: &str) -> Option<BytesMut> {
    tracing::debug!(status, body, "Web-STOMP handshake refused");
    let answer = ws::response_error(status, &format!("{body}\n"));
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = wr.write_all(answer.as_bytes()).await;
        let _ = wr.shutdown().await;
    })
    .await;
    None
}

/// The subprotocol to answer: the highest STOMP version offered
/// (`v12.stomp` > `v11.stomp` > `v10.stomp`), else plain `stomp`.
pub fn choose_protocol(offered: &[String]) -> Option<&'static str> {
    ["v12.stomp", "v11.stomp", "v10.stomp", "stomp"]
        .into_iter()
        .find(|p| offered.iter().any(|o| o.eq_ignore_ascii_case(p)))
}

/// Decodes client messages into the STOMP pipe, answers pings, echoes a
/// close. Once the session is `done` (it has sent its close), keeps
/// reading until the client closes too, for a while, so that unread
/// input does not turn our close into a reset that could lose the last
/// frames.
async fn read_loop<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut rd: R,
    mut buf: BytesMut,
    pipe: DuplexStream,
    out: Arc<Mutex<Out<W>>>,
    done: CancellationToken,
) {
    let mut pipe = Some(pipe);
    let mut decoder = MessageDecoder::new(Role::Server, MAX_MESSAGE);
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Message::Text(data) | Message::Binary(data))) => {
                    if let Some(p) = pipe.as_mut() {
                        if p.write_all(&data).await.is_err() {
                            pipe = None;
                        }
                    }
                }
                Ok(Some(Message::Ping(payload))) => {
                    let mut pong = BytesMut::new();
                    ws::encode_frame(true, Opcode::Pong, &payload, None, &mut pong);
                    let _ = out.lock().await.write(&pong).await;
                }
                Ok(Some(Message::Pong(_))) => {}
                Ok(Some(Message::Close(c))) => {
                    drop(pipe);
                    let code = c.map_or(close_code::NORMAL, |(code, _)| code);
                    out.lock().await.close(code, "").await;
                    drain(&mut rd).await;
                    return;
                }
                Ok(None) => break,
                Err(e) => {
                    drop(pipe);
                    tracing::debug!(error = %e, "Web-STOMP framing error");
                    out.lock().await.close(e.close_code(), &e.to_string()).await;
                    drain(&mut rd).await;
                    return;
                }
            }
        }
        let read = rd.read_buf(&mut buf);
        let n = if done.is_cancelled() {
            match tokio::time::timeout(CLOSE_TIMEOUT, read).await {
                Ok(r) => r,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                r = read => r,
                _ = done.cancelled() => continue,
            }
        };
        if !matches!(n, Ok(n) if n > 0) {
            return;
        }
    }
}

/// After our close (or an HTTP error answer): reads and discards what
/// the client still sends, until it closes, for a bounded time and size,
/// so that closing with unread input does not reset the connection
/// before the client has read our last bytes.
async fn drain<R: AsyncRead + Unpin>(rd: &mut R) {
    let mut left: usize = 1 << 20;
    let mut chunk = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while left > 0 {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_stomp_subprotocol_wins() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(choose_protocol(&o(&["v10.stomp", "v12.stomp", "v11.stomp"])), Some("v12.stomp"));
        assert_eq!(choose_protocol(&o(&["stomp", "v10.stomp"])), Some("v10.stomp"));
        assert_eq!(choose_protocol(&o(&["stomp", "mqtt"])), Some("stomp"));
        assert_eq!(choose_protocol(&o(&["mqtt"])), None);
        assert_eq!(choose_protocol(&[]), None);
    }
}
