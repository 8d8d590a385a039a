//! The connection's writer task: the only code that writes to the socket.
//!
//! It encodes replies into one buffer, drains whatever else is queued (so a
//! burst of deliveries becomes one `write`; big bodies are not copied into
//! it but written from their own buffers, with a vectored write), writes,
//! and then gives each
//! written delivery's pending credit back to its consumer. It also sends
//! heartbeats when the connection has been idle for half the heartbeat
//! interval.
//!
//! Bounds: [`WriterHandle::queued_bytes`] counts what waits to be written,
//! and the session stops reading its socket while that is high (a client
//! that publishes but never reads cannot grow our memory); a write that
//! makes no progress for [`SEND_TIMEOUT`] (RabbitMQ's default
//! `send_timeout`) kills the connection instead of hanging it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sluice_cluster::Consumer;
use sluice_codecs::amqp::map::encode_reply_spliced;
use sluice_codecs::amqp::{encode_frame, Frame};
use sluice_codecs::command::Reply;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::channel::Outbox;

/// A write that makes no progress for this long kills the connection.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(15);

/// What the writer is asked to send.
pub enum WriterMsg {
    Reply { channel: u16, reply: Reply, consumer: Option<Arc<Consumer>> },
    /// Frames the session encoded itself (connection.*, channel.*).
    Raw(Bytes),
}

impl WriterMsg {
    /// Approximate bytes this message will take on the wire.
    fn cost(&self) -> u64 {
        match self {
            WriterMsg::Raw(b) => b.len() as u64,
            WriterMsg::Reply { reply, .. } => {
                let body = match reply {
                    Reply::Deliver { message, .. } | Reply::GetOk { message, .. } | Reply::Return { message, .. } => {
                        message.body.len() as u64
                    }
                    _ => 0,
                };
                body + 128
            }
        }
    }
}

/// The sending side of a writer task, shared by the session and its outbox.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::UnboundedSender<WriterMsg>,
    queued: Arc<AtomicU64>,
}

impl WriterHandle {
    /// Queues a message for the socket.
    pub fn send(&self, msg: WriterMsg) {
        let cost = msg.cost();
        self.queued.fetch_add(cost, Ordering::AcqRel);
        if let Err(mpsc::error::SendError(msg)) = self.tx.send(msg) {
            self.queued.fetch_sub(cost, Ordering::AcqRel);
            if let WriterMsg::Reply { consumer: Some(c), .. } = msg {
                // The writer is gone; the delivery will never be written.
                c.release_pending();
            }
        }
    }

    /// Bytes queued and not yet written to the socket.
    pub fn queued_bytes(&self) -> u64 {
        self.queued.load(Ordering::Acquire)
    }
}

/// [`Outbox`] for an AMQP connection.
pub struct AmqpOutbox(pub WriterHandle);

impl Outbox for AmqpOutbox {
    fn send(&self, channel: u16, reply: Reply, consumer: Option<Arc<Consumer>>) {
        self.0.send(WriterMsg::Reply { channel, reply, consumer });
    }
}

/// Most bytes gathered before a write.
const WRITE_CHUNK: usize = 256 * 1024;

/// The writer's buffer when a connection starts (it grows as needed).
const INITIAL_WRITE_BUFFER: usize = 4 * 1024;

/// Starts the writer task. `dead` is cancelled when the socket fails or
/// stalls, so the session can end the connection.
pub fn spawn<W>(
    socket: W,
    frame_max: Arc<AtomicU32>,
    heartbeat: Arc<AtomicU32>,
    dead: CancellationToken,
) -> (WriterHandle, tokio::task::JoinHandle<()>)
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicU64::new(0));
    let handle = WriterHandle { tx, queued: queued.clone() };
    let task = tokio::spawn(run(socket, rx, queued, frame_max, heartbeat, dead));
    (handle, task)
}

async fn run<W: tokio::io::AsyncWrite + Unpin>(
    mut socket: W,
    mut rx: mpsc::UnboundedReceiver<WriterMsg>,
    queued: Arc<AtomicU64>,
    frame_max: Arc<AtomicU32>,
    heartbeat: Arc<AtomicU32>,
    dead: CancellationToken,
) {
    // Small at first: an idle connection keeps only this (5,000 idle
    // connections took 117 KiB each with 64 KiB here); a busy one grows
    // it to what its batches need, and gives a very large one back.
    let mut buf = BytesMut::with_capacity(INITIAL_WRITE_BUFFER);
    // Big bodies to write at their offsets of `buf` (and their total size).
    let mut spliced: Vec<(usize, Bytes)> = Vec::new();
    let mut written: Vec<Arc<Consumer>> = Vec::new();
    let mut failed = false;
    loop {
        let hb = heartbeat.load(Ordering::Acquire);
        let msg = if hb == 0 {
            rx.recv().await
        } else {
            // Half the interval, as RabbitMQ does, so a client never sees a gap.
            match tokio::time::timeout(Duration::from_millis(u64::from(hb) * 500), rx.recv()).await {
                Ok(m) => m,
                Err(_) => {
                    encode_frame(&Frame::Heartbeat { channel: 0 }, &mut buf);
                    write(&mut socket, &buf, &[], &mut failed, &dead).await;
                    buf.clear();
                    continue;
                }
            }
        };
        let Some(msg) = msg else { break };
        let fm = frame_max.load(Ordering::Acquire);
        let mut cost = msg.cost();
        encode(msg, fm, &mut buf, &mut spliced, &mut written);
        // `cost` counts spliced bodies too (not in `buf`).
        while cost < WRITE_CHUNK as u64 {
            match rx.try_recv() {
                Ok(m) => {
                    cost += m.cost();
                    encode(m, fm, &mut buf, &mut spliced, &mut written);
                }
                Err(_) => break,
            }
        }
        write(&mut socket, &buf, &spliced, &mut failed, &dead).await;
        queued.fetch_sub(cost, Ordering::AcqRel);
        buf.clear();
        if buf.capacity() > 4 * WRITE_CHUNK {
            buf = BytesMut::with_capacity(INITIAL_WRITE_BUFFER);
        }
        spliced.clear();
        for c in written.drain(..) {
            c.release_pending();
        }
    }
    if !failed {
        let _ = tokio::time::timeout(SEND_TIMEOUT, async {
            let _ = socket.flush().await;
            let _ = socket.shutdown().await;
        })
        .await;
    }
}

/// Writes unless the socket already failed; a failure or a stall of
/// [`SEND_TIMEOUT`] marks it failed and signals `dead`. After that the
/// writer keeps draining (so consumers get their credit back) but writes
/// nothing.
async fn write<W: tokio::io::AsyncWrite + Unpin>(
    socket: &mut W,
    buf: &[u8],
    spliced: &[(usize, Bytes)],
    failed: &mut bool,
    dead: &CancellationToken,
) {
    if *failed {
        return;
    }
    // The flush is a no-op on TCP; over TLS it pushes out records the
    // TLS layer still holds when the socket was full during the write.
    let sent = async {
        if spliced.is_empty() {
            socket.write_all(buf).await?;
        } else {
            write_all_spliced(socket, buf, spliced).await?;
        }
        socket.flush().await
    };
    let ok = matches!(tokio::time::timeout(SEND_TIMEOUT, sent).await, Ok(Ok(())));
    if !ok {
        *failed = true;
        dead.cancel();
    }
}

/// Writes `buf` with each `(offset, part)` of `spliced` (ascending
/// offsets) inserted at its offset, with vectored writes.
async fn write_all_spliced<W: tokio::io::AsyncWrite + Unpin>(
    socket: &mut W,
    buf: &[u8],
    spliced: &[(usize, Bytes)],
) -> std::io::Result<()> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * spliced.len() + 1);
    let mut from = 0;
    for (at, part) in spliced {
        let at = (*at).clamp(from, buf.len());
        parts.push(&buf[from..at]);
        parts.push(part);
        from = at;
    }
    parts.push(&buf[from..]);
    parts.retain(|p| !p.is_empty());
    let (mut first, mut skip) = (0, 0);
    while first < parts.len() {
        let slices: Vec<std::io::IoSlice<'_>> = parts[first..]
            .iter()
            .take(64)
            .enumerate()
            .map(|(i, p)| std::io::IoSlice::new(if i == 0 { &p[skip..] } else { p }))
            .collect();
        let mut n = socket.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && first < parts.len() {
            let left = parts[first].len() - skip;
            if n >= left {
                n -= left;
                first += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
    Ok(())
}

fn encode(
    msg: WriterMsg,
    frame_max: u32,
    buf: &mut BytesMut,
    spliced: &mut Vec<(usize, Bytes)>,
    written: &mut Vec<Arc<Consumer>>,
) {
    match msg {
        WriterMsg::Reply { channel, reply, consumer } => {
            encode_reply_spliced(channel, &reply, frame_max, buf, spliced);
            if let Some(c) = consumer {
                written.push(c);
            }
        }
        WriterMsg::Raw(bytes) => buf.extend_from_slice(&bytes),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Through a pipe that takes a few KiB at a time (partial writes
    /// mid-part), the bytes arrive with every part at its offset.
    #[tokio::test]
    async fn spliced_parts_arrive_in_place() {
        let buf: Vec<u8> = (0..10_000u32).map(|i| (i % 7) as u8).collect();
        let parts: Vec<(usize, Bytes)> = vec![
            (0, Bytes::from(vec![1u8; 20_000])),
            (100, Bytes::from(vec![2u8; 30_001])),
            (100, Bytes::from(vec![3u8; 5])),
            (10_000, Bytes::from(vec![4u8; 17_000])),
        ];
        let mut expected = Vec::new();
        let mut from = 0;
        for (at, part) in &parts {
            expected.extend_from_slice(&buf[from..*at]);
            expected.extend_from_slice(part);
            from = *at;
        }
        expected.extend_from_slice(&buf[from..]);
        let (mut tx, mut rx) = tokio::io::duplex(3000);
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.unwrap();
            got
        });
        write_all_spliced(&mut tx, &buf, &parts).await.unwrap();
        drop(tx);
        assert_eq!(reading.await.unwrap(), expected);
    }
}
