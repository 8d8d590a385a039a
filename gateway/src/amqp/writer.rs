//! The connection's writer task: the only code that writes to the socket.
//!
//! It encodes replies into one buffer, drains whatever else is queued (so a
//! burst of deliveries becomes one `write`), writes, and then gives each
//! written delivery's pending credit back to its consumer. It also sends
//! heartbeats when the connection has been idle for the heartbeat interval.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sluice_cluster::Consumer;
use sluice_codecs::amqp::map::encode_reply;
use sluice_codecs::amqp::{encode_frame, Frame};
use sluice_codecs::command::Reply;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::channel::Outbox;

/// What the writer is asked to send.
pub enum WriterMsg {
    Reply { channel: u16, reply: Reply, consumer: Option<Arc<Consumer>> },
    /// Frames the session encoded itself (connection.*, channel.*).
    Raw(Bytes),
}

/// [`Outbox`] for an AMQP connection.
pub struct AmqpOutbox(pub mpsc::UnboundedSender<WriterMsg>);

impl Outbox for AmqpOutbox {
    fn send(&self, channel: u16, reply: Reply, consumer: Option<Arc<Consumer>>) {
        if let Err(mpsc::error::SendError(WriterMsg::Reply { consumer: Some(c), .. })) =
            self.0.send(WriterMsg::Reply { channel, reply, consumer })
        {
            // The writer is gone; the delivery will never be written.
            c.release_pending();
        }
    }
}

/// Most bytes gathered before a write.
const WRITE_CHUNK: usize = 256 * 1024;

/// Runs until every sender is dropped or the socket fails.
pub async fn run<W: tokio::io::AsyncWrite + Unpin>(
    mut socket: W,
    mut rx: mpsc::UnboundedReceiver<WriterMsg>,
    frame_max: Arc<AtomicU32>,
    heartbeat: Arc<AtomicU32>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
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
                    if !failed && socket.write_all(&buf).await.is_err() {
                        failed = true;
                    }
                    buf.clear();
                    continue;
                }
            }
        };
        let Some(msg) = msg else { break };
        let fm = frame_max.load(Ordering::Acquire);
        encode(msg, fm, &mut buf, &mut written);
        while buf.len() < WRITE_CHUNK {
            match rx.try_recv() {
                Ok(m) => encode(m, fm, &mut buf, &mut written),
                Err(_) => break,
            }
        }
        if !failed && socket.write_all(&buf).await.is_err() {
            // Keep draining so consumers get their credit back; the reader
            // notices the dead socket and closes the connection.
            failed = true;
        }
        buf.clear();
        for c in written.drain(..) {
            c.release_pending();
        }
    }
    let _ = socket.flush().await;
    let _ = socket.shutdown().await;
}

fn encode(msg: WriterMsg, frame_max: u32, buf: &mut BytesMut, written: &mut Vec<Arc<Consumer>>) {
    match msg {
        WriterMsg::Reply { channel, reply, consumer } => {
            encode_reply(channel, &reply, frame_max, buf);
            if let Some(c) = consumer {
                written.push(c);
            }
        }
        WriterMsg::Raw(bytes) => buf.extend_from_slice(&bytes),
    }
}
