//! A minimal AMQP 0-9-1 client for the load tool, on the broker's own codec
//! (`sluice_codecs::amqp`): the handshake, one channel, and raw frame
//! reading and writing. Cheap on purpose, so the figures measure the broker,
//! and protocol-correct, so it runs against any AMQP 0-9-1 broker.

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use sluice_codecs::amqp::{
    decode_frame, encode_content, encode_method_frame, BasicProperties, ConnectionOpen, ConnectionStartOk,
    ConnectionTuneOk, FieldTable, FieldValue, Frame, Method, PROTOCOL_HEADER,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Where to connect: `amqp://user:password@host:port/vhost` (vhost
/// percent-encoded, `%2f` for `/`; port 5672 and `/` by default).
#[derive(Clone, Debug)]
pub struct Uri {
    pub user: String,
    pub password: String,
    pub addr: String,
    pub vhost: String,
}

impl Uri {
    pub fn parse(uri: &str, scheme: &str, default_port: u16) -> Result<Uri> {
        let rest = uri
            .strip_prefix(&format!("{scheme}://"))
            .ok_or_else(|| anyhow!("--uri {uri:?}: expected {scheme}://user:password@host:port/vhost"))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (creds, host) = authority.rsplit_once('@').unwrap_or(("guest:guest", authority));
        let (user, password) = creds.split_once(':').unwrap_or((creds, ""));
        if host.is_empty() {
            bail!("--uri {uri:?}: no host");
        }
        let addr = if host.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            host.to_owned()
        } else {
            format!("{host}:{default_port}")
        };
        let vhost = if path.is_empty() { "/".to_owned() } else { percent_decode(path)? };
        Ok(Uri { user: percent_decode(user)?, password: percent_decode(password)?, addr, vhost })
    }
}

fn percent_decode(s: &str) -> Result<String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
            let byte = hex.ok_or_else(|| anyhow!("bad percent escape in {s:?}"))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| anyhow!("{s:?} is not UTF-8 once decoded"))
}

/// The reading half of a connection: whole frames.
pub struct Reader {
    read: OwnedReadHalf,
    buf: BytesMut,
    frame_max: u32,
}

impl Reader {
    /// The next frame; a connection.close from the broker is an error
    /// carrying its reply code and text.
    pub async fn frame(&mut self) -> Result<Frame> {
        loop {
            if let Some(frame) = decode_frame(&mut self.buf, self.frame_max).map_err(|e| anyhow!("bad frame from the broker: {e}"))? {
                if let Frame::Method { method: Method::ConnectionClose(c), .. } = &frame {
                    bail!("the broker closed the connection: {} {}", c.reply_code, c.reply_text);
                }
                if let Frame::Method { method: Method::ChannelClose(c), .. } = &frame {
                    bail!("the broker closed the channel: {} {}", c.reply_code, c.reply_text);
                }
                return Ok(frame);
            }
            if self.read.read_buf(&mut self.buf).await? == 0 {
                bail!("the broker closed the connection");
            }
        }
    }

    /// Whether a whole frame may already be buffered (no read needed).
    pub fn buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next method on `channel`, skipping heartbeats.
    pub async fn method(&mut self) -> Result<Method> {
        loop {
            match self.frame().await? {
                Frame::Method { method, .. } => return Ok(method),
                Frame::Heartbeat { .. } => {}
                other => bail!("unexpected frame while waiting for a method: {other:?}"),
            }
        }
    }
}

/// The writing half: frames are encoded into a buffer and written with
/// [`Writer::flush`], so many messages go out in one write.
pub struct Writer {
    write: OwnedWriteHalf,
    pub buf: BytesMut,
    frame_max: u32,
}

impl Writer {
    pub fn method(&mut self, channel: u16, method: impl Into<Method>) {
        encode_method_frame(channel, &method.into(), &mut self.buf);
    }

    /// basic.publish with its content.
    pub fn publish(&mut self, exchange: &str, routing_key: &str, properties: &BasicProperties, body: &[u8]) {
        self.method(
            1,
            sluice_codecs::amqp::BasicPublish {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                ..Default::default()
            },
        );
        encode_content(1, 60, properties, body, self.frame_max, &mut self.buf);
    }

    pub async fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.write.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Opens a connection and channel 1: PLAIN login, no heartbeats, the
/// broker's frame_max (at most 128 KiB).
pub async fn connect(uri: &Uri) -> Result<(Reader, Writer)> {
    let stream = TcpStream::connect(&uri.addr).await.with_context(|| format!("connect to {}", uri.addr))?;
    stream.set_nodelay(true)?;
    let (read, write) = stream.into_split();
    let mut r = Reader { read, buf: BytesMut::with_capacity(256 * 1024), frame_max: 0 };
    let mut w = Writer { write, buf: BytesMut::with_capacity(256 * 1024), frame_max: 0 };
    w.buf.extend_from_slice(&PROTOCOL_HEADER);
    w.flush().await?;
    match r.method().await? {
        Method::ConnectionStart(_) => {}
        other => bail!("expected connection.start, got {other:?}"),
    }
    let mut response = vec![0u8];
    response.extend_from_slice(uri.user.as_bytes());
    response.push(0);
    response.extend_from_slice(uri.password.as_bytes());
    let product = FieldValue::LongString(Bytes::from_static(b"sluice bench"));
    w.method(
        0,
        ConnectionStartOk {
            client_properties: FieldTable(vec![("product".to_owned(), product)]),
            mechanism: "PLAIN".to_owned(),
            response: Bytes::from(response),
            locale: "en_US".to_owned(),
        },
    );
    w.flush().await?;
    let tune = match r.method().await {
        Ok(Method::ConnectionTune(t)) => t,
        Ok(other) => bail!("login as {:?}: unexpected answer {other:?}", uri.user),
        // Brokers close the socket on a bad password (RabbitMQ without
        // the authentication_failure_close capability, sluice too).
        Err(e) => bail!("login as {:?} refused (wrong user or password?): {e}", uri.user),
    };
    let frame_max = match tune.frame_max {
        0 => 131_072,
        n => n.min(131_072),
    };
    r.frame_max = frame_max;
    w.frame_max = frame_max;
    w.method(0, ConnectionTuneOk { channel_max: tune.channel_max.clamp(1, 2047), frame_max, heartbeat: 0 });
    w.method(0, ConnectionOpen { virtual_host: uri.vhost.clone(), ..Default::default() });
    w.flush().await?;
    match r.method().await? {
        Method::ConnectionOpenOk(_) => {}
        other => bail!("expected connection.open-ok, got {other:?}"),
    }
    w.method(1, sluice_codecs::amqp::ChannelOpen::default());
    w.flush().await?;
    match r.method().await? {
        Method::ChannelOpenOk(_) => {}
        other => bail!("expected channel.open-ok, got {other:?}"),
    }
    Ok((r, w))
}

/// Sends `method` on channel 1 and waits for its answer (skipping
/// anything else that arrives, like confirms of earlier publishes).
pub async fn call(r: &mut Reader, w: &mut Writer, method: impl Into<Method>, is_answer: fn(&Method) -> bool) -> Result<Method> {
    w.method(1, method);
    w.flush().await?;
    loop {
        let m = r.method().await?;
        if is_answer(&m) {
            return Ok(m);
        }
    }
}

/// Closes the connection politely (errors ignored: the numbers are in).
pub async fn close(mut r: Reader, mut w: Writer) {
    w.method(0, sluice_codecs::amqp::ConnectionClose { reply_code: 200, reply_text: "bye".to_owned(), class_id: 0, method_id: 0 });
    if w.flush().await.is_err() {
        return;
    }
    let wait = async {
        loop {
            match r.frame().await {
                Ok(Frame::Method { method: Method::ConnectionCloseOk(_), .. }) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), wait).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() -> Result<()> {
        let u = Uri::parse("amqp://bob:s%40cret@10.0.0.1:5673/%2f", "amqp", 5672)?;
        assert_eq!((u.user.as_str(), u.password.as_str(), u.addr.as_str(), u.vhost.as_str()), ("bob", "s@cret", "10.0.0.1:5673", "/"));
        let u = Uri::parse("amqp://localhost", "amqp", 5672)?;
        assert_eq!((u.user.as_str(), u.addr.as_str(), u.vhost.as_str()), ("guest", "localhost:5672", "/"));
        let u = Uri::parse("amqp://a:b@h/prod", "amqp", 5672)?;
        assert_eq!(u.vhost, "prod");
        assert!(Uri::parse("http://h", "amqp", 5672).is_err());
        assert!(Uri::parse("amqp://a:b@h/%zz", "amqp", 5672).is_err());
        Ok(())
    }
}
