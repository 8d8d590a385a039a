//! [`serve`]: accept connections, authenticate them, hand requests to a
//! [`Handler`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::conn::{self, Inbound, Incoming};
use super::frame::{self, HANDSHAKE_MAX_FRAME};
use super::handshake::handshake;
use super::{Client, Error, Options, PeerInfo, Secret, Versioned};

/// What a server does with what its peers send. `conn` is the connection
/// the message came on: [`Client::peer`] says who sent it, and a clone of
/// it may be kept to push messages (or calls) to that peer later.
pub trait Handler<Req, Resp>: Send + Sync + 'static {
    /// Answers a request. Each runs in its own task, so responses may be
    /// sent in any order. If it panics the caller gets `Error::Remote`.
    fn handle(&self, conn: &Client<Req, Resp>, req: Req) -> impl Future<Output = Resp> + Send;

    /// Takes a one-way message. Messages of one connection are handled one
    /// at a time, in order, and a request is started only after the
    /// messages sent before it were handled (so a slow `message` delays the
    /// requests behind it, never the responses to our own calls). The
    /// default drops them.
    fn message(&self, conn: &Client<Req, Resp>, msg: Req) -> impl Future<Output = ()> + Send {
        let _ = (conn, msg);
        async {}
    }

    /// A peer has connected and passed the handshake. The default does
    /// nothing.
    fn connected(&self, conn: &Client<Req, Resp>) {
        let _ = conn;
    }
}

/// Serves the node protocol on `listener` with default [`Options`].
pub async fn serve<Req, Resp, H>(listener: TcpListener, secret: Secret, me: PeerInfo, handler: H)
where
    Req: Versioned + Send + 'static,
    Resp: Versioned + Send + 'static,
    H: Handler<Req, Resp>,
{
    serve_with(listener, secret, me, handler, Options::default()).await;
}

/// Serves the node protocol on `listener`: each accepted connection gets
/// the handshake (peers without the secret are refused, silent ones are
/// dropped after `options.handshake_timeout`), then its own tasks. Runs
/// until the future is dropped, which closes every connection it accepted.
pub async fn serve_with<Req, Resp, H>(
    listener: TcpListener,
    secret: Secret,
    me: PeerInfo,
    handler: H,
    options: Options,
) where
    Req: Versioned + Send + 'static,
    Resp: Versioned + Send + 'static,
    H: Handler<Req, Resp>,
{
    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let ctx = Arc::new(Ctx { secret, me, options, handler, stop });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(accept(ctx.clone(), stream));
            }
            Err(e) => {
                // Out of descriptors and the like: pass, and try again.
                tracing::warn!(error = %e, "node protocol: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

struct Ctx<H> {
    secret: Secret,
    me: PeerInfo,
    options: Options,
    handler: H,
    /// Cancelled when `serve` is dropped.
    stop: CancellationToken,
}

async fn accept<Req, Resp, H>(ctx: Arc<Ctx<H>>, stream: TcpStream)
where
    Req: Versioned + Send + 'static,
    Resp: Versioned + Send + 'static,
    H: Handler<Req, Resp>,
{
    let addr = match stream.peer_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::debug!(error = %e, "node protocol: peer gone before the handshake");
            return;
        }
    };
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, %addr, "node protocol: cannot set TCP_NODELAY");
    }
    match ctx.secret.tls().map(|t| t.server.clone()) {
        None => {
            let (r, w) = stream.into_split();
            establish(ctx, r, w, addr, Instant::now()).await;
        }
        Some(config) => {
            // The TLS handshake counts against the same deadline.
            let started = Instant::now();
            let accepted = tokio::select! {
                biased;
                _ = ctx.stop.cancelled() => return,
                r = tokio::time::timeout(ctx.options.handshake_timeout, TlsAcceptor::from(config).accept(stream)) => r,
            };
            match accepted {
                Ok(Ok(tls)) => {
                    let (r, w) = tokio::io::split(tls);
                    establish(ctx, r, w, addr, started).await;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, %addr, "node protocol: TLS handshake failed; dropped"),
                Err(_) => tracing::warn!(%addr, "node protocol: TLS handshake timed out; dropped"),
            }
        }
    }
}

/// The node protocol's handshake on an accepted stream (plain or TLS),
/// then the connection until it closes.
async fn establish<R, W, Req, Resp, H>(ctx: Arc<Ctx<H>>, r: R, w: W, addr: SocketAddr, started: Instant)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    Req: Versioned + Send + 'static,
    Resp: Versioned + Send + 'static,
    H: Handler<Req, Resp>,
{
    let mut read = FramedRead::new(r, frame::codec(HANDSHAKE_MAX_FRAME));
    let mut write = FramedWrite::new(w, frame::codec(HANDSHAKE_MAX_FRAME));
    let left = ctx.options.handshake_timeout.saturating_sub(started.elapsed());
    let shaken = tokio::select! {
        biased;
        _ = ctx.stop.cancelled() => return,
        r = tokio::time::timeout(
            left,
            handshake(&mut read, &mut write, &ctx.secret, &ctx.me, &ctx.options),
        ) => r.map_err(|_| Error::Timeout).and_then(|r| r),
    };
    let est = match shaken {
        Ok(est) => est,
        Err(e) => {
            tracing::warn!(error = %e, %addr, "node protocol: handshake failed; dropped");
            return;
        }
    };
    tracing::debug!(peer = %est.peer.node_id, %addr, version = est.version,
        "node connection accepted");
    let (conn, incoming) = conn::start::<_, _, Req, Resp>(
        read,
        write,
        est,
        addr,
        ctx.options.max_frame_len,
        Some(&ctx.stop),
    );
    ctx.handler.connected(&conn);
    tokio::select! {
        biased;
        _ = ctx.stop.cancelled() => {}
        _ = dispatch(&ctx, &conn, incoming) => {}
    }
}

/// Hands what the peer sends to the handler until the connection closes.
async fn dispatch<Req, Resp, H>(
    ctx: &Arc<Ctx<H>>,
    conn: &Client<Req, Resp>,
    mut incoming: Incoming<Req, Resp>,
) where
    Req: Versioned + Send + 'static,
    Resp: Versioned + Send + 'static,
    H: Handler<Req, Resp>,
{
    while let Some(inbound) = incoming.recv().await {
        match inbound {
            Inbound::Message(msg) => ctx.handler.message(conn, msg).await,
            Inbound::Request { body, responder } => {
                let ctx = ctx.clone();
                let conn = conn.clone();
                tokio::spawn(async move {
                    let closed = conn.closed();
                    tokio::select! {
                        biased;
                        _ = closed => {}
                        resp = ctx.handler.handle(&conn, body) => {
                            if let Err(e) = responder.respond(resp).await {
                                tracing::debug!(error = %e, peer = %conn.peer().node_id,
                                    "node protocol: response not sent");
                            }
                        }
                    }
                });
            }
        }
    }
}
