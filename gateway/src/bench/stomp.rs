//! A minimal STOMP 1.2 client for the load tool, on the broker's own codec
//! (`sluice_codecs::stomp`): CONNECT, then raw frames. Receipts stand in
//! for publisher confirms (the broker sends them once a persistent message
//! is safe), `prefetch-count` (RabbitMQ's extension) for basic.qos.

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use sluice_codecs::stomp::{encode_frame, Command, Decoder, Frame, Item, Limits, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::amqp::Uri;

pub struct Reader {
    read: OwnedReadHalf,
    buf: BytesMut,
    decoder: Decoder,
}

impl Reader {
    /// The next frame; an ERROR frame is an error carrying its message.
    pub async fn frame(&mut self) -> Result<Frame> {
        loop {
            match self.decoder.decode(&mut self.buf).map_err(|e| anyhow!("bad frame from the broker: {e}"))? {
                Some(Item::Frame(f)) if f.command == Command::Error => {
                    let message = f.header("message").unwrap_or("").to_owned();
                    bail!("the broker sent ERROR: {message} {}", String::from_utf8_lossy(&f.body).trim());
                }
                Some(Item::Frame(f)) => return Ok(f),
                Some(Item::Heartbeat) => continue,
                None => {}
            }
            if self.read.read_buf(&mut self.buf).await? == 0 {
                bail!("the broker closed the connection");
            }
        }
    }

    /// Whether a frame may already be buffered: the end-of-lines some
    /// brokers (RabbitMQ) send after each frame's NUL do not count, or a
    /// consumer would wait to flush its acks for a frame that never comes.
    pub fn buffered(&self) -> bool {
        self.buf.iter().any(|b| !matches!(b, b'\n' | b'\r'))
    }
}

pub struct Writer {
    write: OwnedWriteHalf,
    pub buf: BytesMut,
}

impl Writer {
    pub fn frame(&mut self, frame: &Frame) -> Result<()> {
        encode_frame(frame, Version::V1_2, &mut self.buf).map_err(|e| anyhow!("cannot encode {:?}: {e}", frame.command))
    }

    /// SEND, with a receipt request when `receipt` is given.
    pub fn send(&mut self, destination: &str, body: &[u8], persistent: bool, receipt: Option<u64>) -> Result<()> {
        let mut f = Frame::new(Command::Send).with_header("destination", destination);
        if persistent {
            f = f.with_header("persistent", "true");
        }
        if let Some(r) = receipt {
            f = f.with_header("receipt", r.to_string());
        }
        self.frame(&f.with_body(Bytes::copy_from_slice(body)))
    }

    pub async fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.write.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// CONNECT as `uri`'s user to its vhost (the `host` header), STOMP 1.2,
/// no heart-beats.
pub async fn connect(uri: &Uri) -> Result<(Reader, Writer)> {
    let stream = TcpStream::connect(&uri.addr).await.with_context(|| format!("connect to {}", uri.addr))?;
    stream.set_nodelay(true)?;
    let (read, write) = stream.into_split();
    let limits = Limits { max_frame_size: 128 * 1024 * 1024, ..Limits::default() };
    let mut r = Reader { read, buf: BytesMut::with_capacity(256 * 1024), decoder: Decoder::new(Version::V1_2, limits) };
    let mut w = Writer { write, buf: BytesMut::with_capacity(256 * 1024) };
    let connect = Frame::new(Command::Connect)
        .with_header("accept-version", "1.2")
        .with_header("host", uri.vhost.clone())
        .with_header("login", uri.user.clone())
        .with_header("passcode", uri.password.clone())
        .with_header("heart-beat", "0,0");
    w.frame(&connect)?;
    w.flush().await?;
    let answer = r.frame().await.map_err(|e| anyhow!("login as {:?} refused: {e}", uri.user))?;
    if answer.command != Command::Connected {
        bail!("expected CONNECTED, got {:?}", answer.command);
    }
    Ok((r, w))
}
