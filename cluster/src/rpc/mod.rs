//! The node protocol's transport: how `sluice node` processes and gateways
//! talk to each other. Generic over the message types, which are designed
//! elsewhere; this module moves them, authenticated and pipelined.
//!
//! - [`connect`] opens a connection and returns a [`Client`] (clone-able,
//!   many calls in flight at once) plus the [`Incoming`] stream of what the
//!   peer sends on its own (one-way messages and requests).
//! - [`serve`] accepts connections and hands each request to a [`Handler`],
//!   one task per request, so a slow request does not hold up the others.
//!   The handler gets a [`Client`] for that peer to push messages back.
//! - [`Secret`]: the shared cluster secret and its file; without
//!   `--cluster-secret-file` it is `$XDG_CONFIG_HOME/sluice/cluster-secret`
//!   or `~/.config/sluice/cluster-secret`, created (mode 0600) on first use.
//!
//! The protocol is symmetric after the handshake: either side may call,
//! answer or send one-way messages with the same `Req`/`Resp` types.
//!
//! # Wire format
//!
//! Every frame is `length: u32 big-endian ‖ payload`, `length` = payload
//! bytes (tokio-util's `LengthDelimitedCodec`). A receiver accepts at most
//! 64 KiB per frame during the handshake and then its `max_frame_len`
//! (default 64 MiB, announced in its `Hello`); a larger length closes the
//! connection before anything is buffered. Payloads are postcard (serde).
//!
//! ## Handshake
//!
//! Every handshake payload is `HandshakeFrame { protocol: String, step }`,
//! `protocol` = `"sluice-node"` (the magic, so a stranger is rejected at
//! its first frame). `step` is one of (postcard variant index first):
//!
//! ```text
//! 0 Hello    { min_version: u16, max_version: u16, role: Role (0 Node, 1 Gateway),
//!              node_id: String, nonce: [u8; 32], max_frame_len: u32 }
//! 1 Auth     { mac: [u8; 32] }
//! 2 Accepted
//! 3 Refused  { reason: String }
//! ```
//!
//! A receiver ignores bytes after a handshake frame it understood, so a
//! later handshake revision may append fields. Both sides do, without
//! waiting for the other:
//!
//! 1. send `Hello` (nonce: 32 bytes from a CSPRNG); read the peer's.
//!    The version is `min(max_a, max_b)` if that is `>= max(min_a, min_b)`;
//!    otherwise both sides fail with [`Error::VersionMismatch`] and close.
//! 2. send `Auth { mac }` with, for the sender A and receiver B,
//!    ```text
//!    mac = HMAC-SHA256(key = secret,
//!            "sluice-auth-v1" ‖ nonce_B ‖ nonce_A
//!            ‖ u32be(len hello_A) ‖ hello_A ‖ u32be(len hello_B) ‖ hello_B)
//!    ```
//!    where `hello_X` is the exact `Hello` payload X sent (so it covers X's
//!    node id, role and version range: a relay cannot alter them). The
//!    secret never crosses the wire; each MAC covers the signer's own fresh
//!    nonce, so a MAC can be neither replayed nor reflected.
//! 3. read the peer's `Auth` and check it in constant time; send `Accepted`,
//!    or `Refused { reason }` and close ([`Error::Refused`]).
//! 4. read the peer's verdict: `Accepted` completes the handshake.
//!
//! The whole handshake (and for [`connect`] the TCP connect) must finish
//! within [`Options::handshake_timeout`] (5 s), or the socket is dropped.
//!
//! ## Messages (version 3)
//!
//! After the handshake each payload is `header ‖ body`: the header is a
//! postcard enum, the body the rest of the frame, encoded by
//! [`Versioned::encode`] for the negotiated version.
//!
//! ```text
//! 0 Request  { id: varint u64 }                 body = Req
//! 1 Response { id: varint u64 }                 body = Resp
//! 2 Message                                     body = Req (one-way)
//! 3 Failed   { id: varint u64, reason: String } body = empty
//! ```
//!
//! Ids are chosen by the caller, unique per connection and direction;
//! responses come in any order. `Failed` answers a request the peer could
//! not answer (undecodable, handler panicked or dropped it):
//! [`Error::Remote`]. An undecodable response fails only its call
//! ([`Error::Decode`]); undecodable headers or one-way messages close the
//! connection. When a connection closes, every pending call fails with
//! [`Error::Closed`].

mod client;
mod conn;
mod error;
mod frame;
mod handshake;
mod secret;
mod server;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests;

use std::ops::RangeInclusive;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use client::{connect, connect_with, Client};
pub use conn::{Inbound, Incoming, Responder};
pub use error::Error;
pub use secret::Secret;
pub use server::{serve, serve_with, Handler};

/// The magic that starts every handshake frame.
pub const PROTOCOL: &str = "sluice-node";

/// The protocol versions this build speaks. 2: `Attach` and `Deliver`
/// carry an attach epoch (version 1 had none). 3: a leader counts a remote
/// consumer's deliveries as pending until its gateway reports them
/// written (`Written`), and tells publishing gateways when a queue lags
/// (`Lagging`); a version-2 gateway would send no `Written` and stall its
/// consumers. The node protocol's types are not translated between
/// versions, so this build speaks only 3.
pub const SUPPORTED_VERSIONS: RangeInclusive<u16> = 3..=3;

/// A message type of the protocol, encoded for a negotiated version.
///
/// Derive `Serialize`/`Deserialize` (with `#[serde(with = "serde_bytes")]`
/// on byte payloads) and write `impl Versioned for T {}`. The defaults use
/// postcard and ignore the version; a type whose shape
/// changes between versions overrides both methods (for a rolling upgrade
/// an old and a new node speak the older version).
pub trait Versioned: Serialize + DeserializeOwned {
    /// Appends the encoding of `self` for `version` to `out`.
    fn encode(&self, version: u16, out: &mut Vec<u8>) -> Result<(), Error> {
        let _ = version;
        postcard::to_io(self, out).map(drop).map_err(|e| Error::Encode(e.to_string()))
    }

    /// Decodes a whole body (trailing bytes are an error).
    fn decode(version: u16, bytes: &[u8]) -> Result<Self, Error> {
        let _ = version;
        let (value, rest) =
            postcard::take_from_bytes(bytes).map_err(|e| Error::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(Error::Decode(format!("{} trailing bytes after the message", rest.len())));
        }
        Ok(value)
    }
}

/// For protocols (or tests) without responses.
impl Versioned for () {}

/// What a process is in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// A `sluice node` process (storage).
    Node,
    /// A gateway (client-facing protocols).
    Gateway,
}

/// Who is at one end of a connection, as announced in its `Hello` and
/// proven by its MAC.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerInfo {
    pub node_id: String,
    pub role: Role,
}

impl PeerInfo {
    pub fn node(node_id: impl Into<String>) -> Self {
        PeerInfo { node_id: node_id.into(), role: Role::Node }
    }

    pub fn gateway(node_id: impl Into<String>) -> Self {
        PeerInfo { node_id: node_id.into(), role: Role::Gateway }
    }
}

/// Tuning of one endpoint.
#[derive(Clone, Debug)]
pub struct Options {
    /// Protocol versions offered in the handshake.
    pub versions: RangeInclusive<u16>,
    /// Largest frame payload accepted from the peer (at most `u32::MAX`).
    pub max_frame_len: usize,
    /// Deadline for the handshake (and, for [`connect`], the TCP connect).
    pub handshake_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            versions: SUPPORTED_VERSIONS,
            max_frame_len: 64 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// Fuzzing entry point (`fuzz/fuzz_targets/node_frame.rs`): bytes as a
/// peer sends them, through every decoder a node or gateway applies to
/// them: a handshake frame, the length-delimited framing, each frame's
/// header, request and response bodies, and a message record. Whatever
/// the input, it must return (errors are fine), never panic or hang.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    use tokio_util::codec::Decoder;
    let _ = postcard::take_from_bytes::<handshake::HandshakeFrame>(data);
    let mut codec = frame::codec(1 << 20);
    let mut buf = bytes::BytesMut::from(data);
    while let Ok(Some(payload)) = codec.decode(&mut buf) {
        if let Ok((_header, body)) = frame::decode_header(&payload) {
            for version in SUPPORTED_VERSIONS {
                let _ = crate::node::NodeRequest::decode(version, body);
                let _ = crate::node::NodeResponse::decode(version, body);
            }
        }
        let _ = crate::record::decode(&payload.freeze());
    }
}
