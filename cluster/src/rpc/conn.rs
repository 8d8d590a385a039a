//! One authenticated connection: a reader task, a writer task, the map of
//! pending calls, and what the peer sends on its own ([`Incoming`]).
//!
//! - The writer task owns the socket's write half and writes the frames
//!   that callers, senders and responders queue (bounded queue, so a slow
//!   peer slows the senders). It batches whatever is queued into one flush.
//! - The reader task owns the read half: a `Response`/`Failed` completes
//!   the pending call with that id; a `Request`/`Message` goes to
//!   [`Incoming`] in arrival order.
//! - The connection closes when the reader sees EOF or an error, when the
//!   writer fails, when [`Client::close`] is called or the server stops,
//!   or when the last [`Client`] handle is dropped (then queued frames
//!   are written first). Closing fails every pending call with `Closed`.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::client::Client;
use super::frame::{self, Header};
use super::handshake::Established;
use super::{Error, PeerInfo, Versioned};

/// Frames queued towards the writer before `call`/`send` wait.
const WRITE_QUEUE: usize = 1024;
/// Frames written per flush at most.
const WRITE_BATCH: usize = 256;

type Waiter<Resp> = oneshot::Sender<Result<Resp, Error>>;

/// State shared by the handles of one connection and its reader.
pub(crate) struct Shared<Resp> {
    pending: Mutex<Pending<Resp>>,
    pub(crate) next_id: AtomicU64,
    pub(crate) token: CancellationToken,
    pub(crate) peer: PeerInfo,
    pub(crate) peer_addr: SocketAddr,
    pub(crate) version: u16,
    /// The largest payload the peer accepts.
    pub(crate) max_send: usize,
}

struct Pending<Resp> {
    calls: HashMap<u64, Waiter<Resp>>,
    closed: bool,
}

impl<Resp> Shared<Resp> {
    /// Registers a call; `Closed` once the connection is closed.
    pub(crate) fn register(&self, id: u64, waiter: Waiter<Resp>) -> Result<(), Error> {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if p.closed {
            return Err(Error::Closed);
        }
        p.calls.insert(id, waiter);
        Ok(())
    }

    /// Forgets a call (answered, or its caller gave up).
    pub(crate) fn forget(&self, id: u64) {
        self.take(id);
    }

    fn take(&self, id: u64) -> Option<Waiter<Resp>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).calls.remove(&id)
    }

    /// Closes the connection and fails every pending call.
    fn close(&self) {
        self.token.cancel();
        let calls = {
            let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            p.closed = true;
            std::mem::take(&mut p.calls)
        };
        for (_, waiter) in calls {
            let _ = waiter.send(Err(Error::Closed));
        }
    }
}

/// Something the peer sent on its own.
#[derive(Debug)]
pub enum Inbound<Req, Resp> {
    /// A one-way message.
    Message(Req),
    /// A request; answer it with the responder (dropping it answers
    /// `Failed`, which the caller sees as [`Error::Remote`]).
    Request { body: Req, responder: Responder<Resp> },
}

/// The stream of what the peer sends on its own, in arrival order. It ends
/// when the connection closes. It is unbounded: flow control of pushed
/// messages is the business of the protocol above (consumer credit).
pub struct Incoming<Req, Resp> {
    rx: mpsc::UnboundedReceiver<Inbound<Req, Resp>>,
}

impl<Req, Resp> Incoming<Req, Resp> {
    /// The next message or request; `None` once the connection is closed.
    pub async fn recv(&mut self) -> Option<Inbound<Req, Resp>> {
        self.rx.recv().await
    }
}

impl<Req, Resp> std::fmt::Debug for Incoming<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").field("queued", &self.rx.len()).finish()
    }
}

impl<Req, Resp> Stream for Incoming<Req, Resp> {
    type Item = Inbound<Req, Resp>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

/// Answers one request of the peer.
pub struct Responder<Resp> {
    id: u64,
    tx: Option<mpsc::Sender<Bytes>>,
    version: u16,
    max_send: usize,
    _resp: PhantomData<fn(Resp)>,
}

impl<Resp> std::fmt::Debug for Responder<Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder").field("id", &self.id).finish()
    }
}

impl<Resp: Versioned> Responder<Resp> {
    /// Sends the response. A response too large for the peer is answered
    /// with `Failed` instead (and `FrameTooLarge` returned).
    pub async fn respond(mut self, resp: Resp) -> Result<(), Error> {
        let Some(tx) = self.tx.take() else { return Err(Error::Closed) };
        let header = Header::Response { id: self.id };
        let encoded = frame::encode(&header, Some(&resp), self.version, self.max_send);
        drop(resp);
        let (frame, result) = match encoded {
            Ok(frame) => (frame, Ok(())),
            Err(e) => (failed_frame(self.id, &format!("response not sent: {e}"))?, Err(e)),
        };
        tx.send(frame).await.map_err(|_| Error::Closed)?;
        result
    }
}

impl<Resp> Drop for Responder<Resp> {
    fn drop(&mut self) {
        self.send_failed("the request was dropped without a response");
    }
}

fn failed_frame(id: u64, reason: &str) -> Result<Bytes, Error> {
    frame::encode::<()>(&Header::Failed { id, reason: reason.to_string() }, None, 0, usize::MAX)
}

/// Starts the reader and writer tasks of an authenticated connection.
/// `parent` is cancelled to close it from outside (server shutdown).
pub(crate) fn start<R, W, Req, Resp>(
    mut read: FramedRead<R, LengthDelimitedCodec>,
    mut write: FramedWrite<W, LengthDelimitedCodec>,
    est: Established,
    peer_addr: SocketAddr,
    max_frame_len: usize,
    parent: Option<&CancellationToken>,
) -> (Client<Req, Resp>, Incoming<Req, Resp>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    Req: Versioned + Send + 'static,
    Resp: Versioned + Send + 'static,
{
    read.decoder_mut().set_max_frame_length(max_frame_len);
    write.encoder_mut().set_max_frame_length(est.peer_max_frame);
    write.set_backpressure_boundary(64 * 1024);
    let token = parent.map_or_else(CancellationToken::new, CancellationToken::child_token);
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending { calls: HashMap::new(), closed: false }),
        next_id: AtomicU64::new(0),
        token: token.clone(),
        peer: est.peer,
        peer_addr,
        version: est.version,
        max_send: est.peer_max_frame,
    });
    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    tokio::spawn(write_loop(write, rx, token));
    let reader =
        Reader { shared: shared.clone(), tx: tx.downgrade(), inbound: in_tx, max_frame_len };
    tokio::spawn(reader.run(read));
    (Client::new(shared, tx), Incoming { rx: in_rx })
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut write: FramedWrite<W, LengthDelimitedCodec>,
    mut rx: mpsc::Receiver<Bytes>,
    token: CancellationToken,
) {
    let pump = async {
        while let Some(frame) = rx.recv().await {
            write.feed(frame).await?;
            for _ in 1..WRITE_BATCH {
                match rx.try_recv() {
                    Ok(frame) => write.feed(frame).await?,
                    Err(_) => break,
                }
            }
            SinkExt::<Bytes>::flush(&mut write).await?;
        }
        // Every handle is gone: the queue is drained, say goodbye.
        SinkExt::<Bytes>::close(&mut write).await?;
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        biased;
        _ = token.cancelled() => {}
        result = pump => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "node connection: write failed");
            }
        }
    }
    token.cancel();
}

struct Reader<Req, Resp> {
    shared: Arc<Shared<Resp>>,
    /// Weak, so that the reader alone does not keep the connection open.
    tx: mpsc::WeakSender<Bytes>,
    inbound: mpsc::UnboundedSender<Inbound<Req, Resp>>,
    max_frame_len: usize,
}

impl<Req: Versioned, Resp: Versioned> Reader<Req, Resp> {
    async fn run<R: AsyncRead + Unpin>(self, mut read: FramedRead<R, LengthDelimitedCodec>) {
        let token = self.shared.token.clone();
        let result = loop {
            let item = tokio::select! {
                biased;
                _ = token.cancelled() => break Ok(()),
                item = read.next() => item,
            };
            match item {
                None => break Ok(()),
                Some(Err(e)) => break Err(frame::read_error(e, self.max_frame_len)),
                Some(Ok(payload)) => {
                    if let Err(e) = self.dispatch(&payload) {
                        break Err(e);
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::warn!(peer = %self.shared.peer.node_id, addr = %self.shared.peer_addr,
                error = %e, "node connection closed on error");
        }
        self.shared.close();
    }

    /// Handles one frame; an error closes the connection.
    fn dispatch(&self, payload: &[u8]) -> Result<(), Error> {
        let version = self.shared.version;
        let (header, body) = frame::decode_header(payload)?;
        match header {
            Header::Response { id } => {
                // Unknown ids belong to callers that gave up: ignored.
                if let Some(waiter) = self.shared.take(id) {
                    let _ = waiter.send(Resp::decode(version, body));
                }
            }
            Header::Failed { id, reason } => {
                if let Some(waiter) = self.shared.take(id) {
                    let _ = waiter.send(Err(Error::Remote(reason)));
                }
            }
            Header::Message => {
                let msg = Req::decode(version, body)?;
                let _ = self.inbound.send(Inbound::Message(msg));
            }
            Header::Request { id } => {
                // Without a sender every handle is gone and nothing can be
                // answered; the connection is closing.
                let Some(tx) = self.tx.upgrade() else { return Ok(()) };
                let responder = Responder {
                    id,
                    tx: Some(tx),
                    version,
                    max_send: self.shared.max_send,
                    _resp: PhantomData,
                };
                match Req::decode(version, body) {
                    // If Incoming is gone the responder answers `Failed`.
                    Ok(body) => drop(self.inbound.send(Inbound::Request { body, responder })),
                    Err(e) => {
                        let mut responder = responder;
                        responder.send_failed(&format!("undecodable request: {e}"));
                    }
                }
            }
        }
        Ok(())
    }
}

impl<Resp> Responder<Resp> {
    /// Answers `Failed` (if not answered yet), without waiting.
    fn send_failed(&mut self, reason: &str) {
        let Some(tx) = self.tx.take() else { return };
        let Ok(frame) = failed_frame(self.id, reason) else { return };
        if let Err(mpsc::error::TrySendError::Full(frame)) = tx.try_send(frame) {
            // The queue is full: wait for room elsewhere, so that the
            // caller is answered all the same.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = tx.send(frame).await;
                });
            }
        }
    }
}
