//! The handshake: version negotiation and mutual authentication with the
//! cluster secret (layout and MAC input in the module docs of `rpc`).

use std::ops::RangeInclusive;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use super::frame::{read_error, HANDSHAKE_MAX_FRAME};
use super::{Error, Options, PeerInfo, Role, Secret, PROTOCOL};

/// Domain separation label of the MAC input.
const AUTH_LABEL: &[u8] = b"sluice-auth-v1";

#[derive(Serialize, Deserialize, Debug)]
pub(crate) struct HandshakeFrame {
    protocol: String,
    step: Step,
}

#[derive(Serialize, Deserialize, Debug)]
enum Step {
    Hello(Hello),
    Auth { mac: [u8; 32] },
    Accepted,
    Refused { reason: String },
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Hello {
    min_version: u16,
    max_version: u16,
    role: Role,
    node_id: String,
    nonce: [u8; 32],
    max_frame_len: u32,
}

/// What the handshake established about the peer.
#[derive(Debug)]
pub(crate) struct Established {
    pub peer: PeerInfo,
    pub version: u16,
    /// The largest payload the peer accepts.
    pub peer_max_frame: usize,
}

type Reader<R> = FramedRead<R, LengthDelimitedCodec>;
type Writer<W> = FramedWrite<W, LengthDelimitedCodec>;

/// Runs the handshake on fresh framed halves whose codecs are limited to
/// `HANDSHAKE_MAX_FRAME`. No deadline here: the callers add it.
pub(crate) async fn handshake<R, W>(
    read: &mut Reader<R>,
    write: &mut Writer<W>,
    secret: &Secret,
    me: &PeerInfo,
    options: &Options,
) -> Result<Established, Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mine = Hello {
        min_version: *options.versions.start(),
        max_version: *options.versions.end(),
        role: me.role,
        node_id: me.node_id.clone(),
        nonce: rand::random(),
        max_frame_len: u32::try_from(options.max_frame_len).unwrap_or(u32::MAX),
    };
    let my_hello = encode(Step::Hello(mine.clone()))?;
    write.send(my_hello.clone()).await?;

    let their_hello = recv(read).await?;
    let theirs = match parse(&their_hello)? {
        Step::Hello(h) => h,
        Step::Refused { reason } => return Err(Error::Refused { reason }),
        other => return Err(Error::Protocol(format!("expected Hello, got {other:?}"))),
    };
    let version = negotiate(&options.versions, &(theirs.min_version..=theirs.max_version))?;

    let mac = mac(secret, &theirs.nonce, &mine.nonce, &my_hello, &their_hello)?;
    write.send(encode(Step::Auth { mac })?).await?;

    let their_mac = match parse(&recv(read).await?)? {
        Step::Auth { mac } => mac,
        Step::Refused { reason } => return Err(Error::Refused { reason }),
        other => return Err(Error::Protocol(format!("expected Auth, got {other:?}"))),
    };
    if !verify(secret, &mine.nonce, &theirs.nonce, &their_hello, &my_hello, &their_mac)? {
        let reason = format!("{:?} does not know the cluster secret", theirs.node_id);
        // Best effort: the peer may already be gone.
        if let Ok(frame) = encode(Step::Refused { reason: "bad cluster secret".into() }) {
            let _ = write.send(frame).await;
        }
        return Err(Error::Refused { reason });
    }
    write.send(encode(Step::Accepted)?).await?;

    match parse(&recv(read).await?)? {
        Step::Accepted => {}
        Step::Refused { reason } => return Err(Error::Refused { reason }),
        other => return Err(Error::Protocol(format!("expected Accepted, got {other:?}"))),
    }
    Ok(Established {
        peer: PeerInfo { node_id: theirs.node_id, role: theirs.role },
        version,
        peer_max_frame: theirs.max_frame_len as usize,
    })
}

/// The highest version both sides speak.
pub(crate) fn negotiate(
    ours: &RangeInclusive<u16>,
    theirs: &RangeInclusive<u16>,
) -> Result<u16, Error> {
    let low = *ours.start().max(theirs.start());
    let high = *ours.end().min(theirs.end());
    if high >= low {
        Ok(high)
    } else {
        Err(Error::VersionMismatch { ours: ours.clone(), theirs: theirs.clone() })
    }
}

fn encode(step: Step) -> Result<Bytes, Error> {
    let frame = HandshakeFrame { protocol: PROTOCOL.to_string(), step };
    postcard::to_stdvec(&frame).map(Bytes::from).map_err(|e| Error::Encode(e.to_string()))
}

async fn recv<R: AsyncRead + Unpin>(read: &mut Reader<R>) -> Result<Bytes, Error> {
    match read.next().await {
        Some(Ok(frame)) => Ok(frame.freeze()),
        Some(Err(e)) => Err(read_error(e, HANDSHAKE_MAX_FRAME)),
        None => Err(Error::Closed),
    }
}

/// Decodes a handshake frame; trailing bytes are allowed (later revisions
/// may append fields).
fn parse(payload: &[u8]) -> Result<Step, Error> {
    let (frame, _rest): (HandshakeFrame, _) = postcard::take_from_bytes(payload)
        .map_err(|e| Error::Protocol(format!("not a {PROTOCOL} handshake: {e}")))?;
    if frame.protocol != PROTOCOL {
        return Err(Error::Protocol(format!("peer speaks {:?}, not {PROTOCOL}", frame.protocol)));
    }
    Ok(frame.step)
}

fn keyed(
    secret: &Secret,
    receiver_nonce: &[u8; 32],
    sender_nonce: &[u8; 32],
    sender_hello: &[u8],
    receiver_hello: &[u8],
) -> Result<Hmac<Sha256>, Error> {
    // HMAC takes keys of any length: this does not fail in practice.
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .map_err(|e| Error::InvalidSecret(format!("not usable as an HMAC key: {e}")))?;
    m.update(AUTH_LABEL);
    m.update(receiver_nonce);
    m.update(sender_nonce);
    for hello in [sender_hello, receiver_hello] {
        m.update(&u32::try_from(hello.len()).unwrap_or(u32::MAX).to_be_bytes());
        m.update(hello);
    }
    Ok(m)
}

/// The MAC the sender (whose nonce and Hello come second and first) sends.
fn mac(
    secret: &Secret,
    receiver_nonce: &[u8; 32],
    sender_nonce: &[u8; 32],
    sender_hello: &[u8],
    receiver_hello: &[u8],
) -> Result<[u8; 32], Error> {
    let tag = keyed(secret, receiver_nonce, sender_nonce, sender_hello, receiver_hello)?.finalize();
    let mut out = [0u8; 32];
    out.copy_from_slice(&tag.into_bytes());
    Ok(out)
}

/// Checks the peer's MAC in constant time.
fn verify(
    secret: &Secret,
    receiver_nonce: &[u8; 32],
    sender_nonce: &[u8; 32],
    sender_hello: &[u8],
    receiver_hello: &[u8],
    tag: &[u8; 32],
) -> Result<bool, Error> {
    Ok(keyed(secret, receiver_nonce, sender_nonce, sender_hello, receiver_hello)?
        .verify_slice(tag)
        .is_ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(&(1..=2), &(2..=3)).unwrap(), 2);
        assert_eq!(negotiate(&(1..=5), &(1..=3)).unwrap(), 3);
        assert!(matches!(negotiate(&(1..=1), &(2..=2)), Err(Error::VersionMismatch { .. })));
        #[allow(clippy::reversed_empty_ranges)] // an empty range on purpose
        let empty = 3..=1;
        assert!(matches!(negotiate(&empty, &(1..=3)), Err(Error::VersionMismatch { .. })));
    }

    #[test]
    fn mac_binds_every_input() {
        let s = Secret::new(*b"0123456789abcdef").unwrap();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let t = mac(&s, &a, &b, b"hello-b", b"hello-a").unwrap();
        let check =
            |s: &Secret, rn, sn, sh: &[u8], rh: &[u8]| verify(s, rn, sn, sh, rh, &t).unwrap();
        assert!(check(&s, &a, &b, b"hello-b", b"hello-a"));
        assert!(!check(&s, &b, &a, b"hello-b", b"hello-a"), "reflected");
        assert!(!check(&s, &a, &b, b"hello-a", b"hello-b"), "hellos swapped");
        assert!(!check(&s, &a, &b, b"hello-bX", b"hello-a"), "hello altered");
        let other = Secret::new(*b"0123456789abcdeF").unwrap();
        assert!(!check(&other, &a, &b, b"hello-b", b"hello-a"), "other secret");
    }

    #[test]
    fn handshake_frames_reject_garbage() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Err(Error::Protocol(_))));
        assert!(matches!(parse(&[]), Err(Error::Protocol(_))));
        let f =
            postcard::to_stdvec(&HandshakeFrame { protocol: "other".into(), step: Step::Accepted })
                .unwrap();
        assert!(matches!(parse(&f), Err(Error::Protocol(_))));
        let ok = encode(Step::Accepted).unwrap();
        for cut in 0..ok.len() {
            assert!(parse(&ok[..cut]).is_err());
        }
        let mut longer = ok.to_vec();
        longer.extend_from_slice(b"future fields");
        assert!(matches!(parse(&longer), Ok(Step::Accepted)));
    }
}
