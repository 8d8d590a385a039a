//! [`connect`] and [`Client`], the handle on one connection.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_rustls::TlsConnector;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::conn::{self, Incoming, Shared};
use super::frame::{self, Header, HANDSHAKE_MAX_FRAME};
use super::handshake::handshake;
use super::{Error, Options, PeerInfo, Secret, Versioned};

/// Connects to a node (TCP, then the handshake) with default [`Options`].
pub async fn connect<Req, Resp>(
    addr: impl ToSocketAddrs,
    secret: &Secret,
    me: PeerInfo,
) -> Result<(Client<Req, Resp>, Incoming<Req, Resp>), Error>
where
    Req: Versioned + Send + 'static,
    Resp: Versioned + Send + 'static,
{
    connect_with(addr, secret, me, &Options::default()).await
}

/// [`connect`] with options. The TCP connect and the handshake together
/// must finish within `options.handshake_timeout`.
pub async fn connect_with<Req, Resp>(
    addr: impl ToSocketAddrs,
    secret: &Secret,
    me: PeerInfo,
    options: &Options,
) -> Result<(Client<Req, Resp>, Incoming<Req, Resp>), Error>
where
    Req: Versioned + Send + 'static,
    Resp: Versioned + Send + 'static,
{
    let setup = async {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let peer_addr = stream.peer_addr()?;
        match secret.tls() {
            None => {
                let (r, w) = stream.into_split();
                establish(r, w, peer_addr, secret, &me, options).await
            }
            Some(tls) => {
                // Names are not checked (the cluster CA is; see
                // `tls::NodeTls`): the peer's address stands in for one.
                let name = ServerName::IpAddress(peer_addr.ip().into());
                let stream = TlsConnector::from(tls.client.clone()).connect(name, stream).await?;
                let (r, w) = tokio::io::split(stream);
                establish(r, w, peer_addr, secret, &me, options).await
            }
        }
    };
    tokio::time::timeout(options.handshake_timeout, setup).await.map_err(|_| Error::Timeout)?
}

/// The handshake on a connected stream, then the connection's tasks.
async fn establish<R, W, Req, Resp>(
    r: R,
    w: W,
    peer_addr: SocketAddr,
    secret: &Secret,
    me: &PeerInfo,
    options: &Options,
) -> Result<(Client<Req, Resp>, Incoming<Req, Resp>), Error>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    Req: Versioned + Send + 'static,
    Resp: Versioned + Send + 'static,
{
    let mut read = FramedRead::new(r, frame::codec(HANDSHAKE_MAX_FRAME));
    let mut write = FramedWrite::new(w, frame::codec(HANDSHAKE_MAX_FRAME));
    let est = handshake(&mut read, &mut write, secret, me, options).await?;
    tracing::debug!(peer = %est.peer.node_id, %peer_addr, version = est.version, tls = secret.tls().is_some(),
        "node connection established");
    Ok(conn::start(read, write, est, peer_addr, options.max_frame_len, None))
}

/// A handle on one authenticated connection, whichever side opened it:
/// calls (many in flight at once, answered in any order) and one-way
/// messages to the peer. Cheap to clone; the connection stays open while
/// a handle exists (and the peer keeps it), and closes when the last one
/// is dropped, after the frames already queued are written.
pub struct Client<Req, Resp> {
    shared: Arc<Shared<Resp>>,
    tx: mpsc::Sender<bytes::Bytes>,
    _req: PhantomData<fn(Req)>,
}

impl<Req, Resp> Clone for Client<Req, Resp> {
    fn clone(&self) -> Self {
        Client { shared: self.shared.clone(), tx: self.tx.clone(), _req: PhantomData }
    }
}

impl<Req, Resp> std::fmt::Debug for Client<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.shared.peer)
            .field("addr", &self.shared.peer_addr)
            .field("version", &self.shared.version)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Removes a pending call whose caller stopped waiting.
struct PendingGuard<'a, Resp> {
    shared: &'a Shared<Resp>,
    id: u64,
}

impl<Resp> Drop for PendingGuard<'_, Resp> {
    fn drop(&mut self) {
        self.shared.forget(self.id);
    }
}

impl<Req: Versioned, Resp: Versioned> Client<Req, Resp> {
    pub(crate) fn new(shared: Arc<Shared<Resp>>, tx: mpsc::Sender<bytes::Bytes>) -> Self {
        Client { shared, tx, _req: PhantomData }
    }

    /// Sends a request and waits for its response. Fails with `Closed` if
    /// the connection closes first, `Remote` if the peer could not answer,
    /// `FrameTooLarge` (connection unaffected) if the request is too large.
    pub async fn call(&self, req: Req) -> Result<Resp, Error> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = frame::encode(
            &Header::Request { id },
            Some(&req),
            self.shared.version,
            self.shared.max_send,
        )?;
        drop(req);
        let (waiter, answer) = oneshot::channel();
        self.shared.register(id, waiter)?;
        let _guard = PendingGuard { shared: &self.shared, id };
        self.tx.send(frame).await.map_err(|_| Error::Closed)?;
        answer.await.unwrap_or(Err(Error::Closed))
    }

    /// [`Client::call`] with a deadline: `Timeout` when it passes (a late
    /// response is then ignored).
    pub async fn call_timeout(&self, req: Req, timeout: Duration) -> Result<Resp, Error> {
        tokio::time::timeout(timeout, self.call(req)).await.map_err(|_| Error::Timeout)?
    }

    /// Queues a one-way message. Messages sent one after the other arrive
    /// in that order; `Ok` means queued, not delivered.
    pub async fn send(&self, msg: Req) -> Result<(), Error> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        let frame =
            frame::encode(&Header::Message, Some(&msg), self.shared.version, self.shared.max_send)?;
        drop(msg);
        self.tx.send(frame).await.map_err(|_| Error::Closed)
    }
}

impl<Req, Resp> Client<Req, Resp> {
    /// The protocol version agreed in the handshake.
    pub fn negotiated_version(&self) -> u16 {
        self.shared.version
    }

    /// Identifies the connection (equal for every handle of it) while it
    /// exists.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.shared) as *const () as usize
    }

    /// The authenticated peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.shared.peer
    }

    /// The peer's socket address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.shared.peer_addr
    }

    /// Whether the connection is closed (or closing).
    pub fn is_closed(&self) -> bool {
        self.shared.token.is_cancelled()
    }

    /// Waits until the connection is closed.
    pub async fn closed(&self) {
        self.shared.token.cancelled().await;
    }

    /// Closes the connection now, for every handle: pending calls fail
    /// with `Closed`, queued frames are dropped.
    pub fn close(&self) {
        self.shared.token.cancel();
    }
}
