//! Errors of the node protocol.

use std::ops::RangeInclusive;
use std::path::PathBuf;

/// What can go wrong on a node-protocol connection or with the cluster secret.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The handshake failed authentication: the peer does not know the
    /// cluster secret, or it found that we do not.
    #[error("refused: {reason}")]
    Refused { reason: String },
    /// The two peers have no protocol version in common.
    #[error("no common protocol version: ours {}..={}, theirs {}..={}",
        .ours.start(), .ours.end(), .theirs.start(), .theirs.end())]
    VersionMismatch { ours: RangeInclusive<u16>, theirs: RangeInclusive<u16> },
    /// A frame is larger than the receiver accepts. Outbound, the call fails
    /// and the connection stays up; inbound, the connection is closed.
    #[error("frame too large ({}; the limit is {max} bytes)", describe_size(.size))]
    FrameTooLarge { size: Option<usize>, max: usize },
    /// Bytes from the peer are not a valid frame or message.
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// A message could not be serialised.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The peer broke the protocol (wrong magic, handshake step out of order).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer received the request but produced no response (its handler
    /// panicked or dropped the request, or it could not decode it).
    #[error("the peer failed the request: {0}")]
    Remote(String),
    /// The connection is closed; every pending call fails with this.
    #[error("connection closed")]
    Closed,
    /// Socket I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The handshake (or a call with a deadline) did not finish in time.
    #[error("timed out")]
    Timeout,
    /// The cluster secret file cannot be read or written.
    #[error("cluster secret file {}: {source}", .path.display())]
    SecretFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The cluster secret file is readable by other users: refused, as
    /// Erlang refuses such a cookie.
    #[error(
        "cluster secret file {} is accessible by group or others (mode {mode:03o}); \
         run `chmod 600 {}`",
        .path.display(), .path.display()
    )]
    InsecureSecretFile { path: PathBuf, mode: u32 },
    /// The secret is empty or too short.
    #[error("invalid cluster secret: {0}")]
    InvalidSecret(String),
    /// Neither `XDG_CONFIG_HOME` nor `HOME` is set, so there is no default
    /// place for the secret file.
    #[error(
        "no default place for the cluster secret: neither XDG_CONFIG_HOME nor HOME is set; \
         pass --cluster-secret-file"
    )]
    NoSecretLocation,
}

fn describe_size(size: &Option<usize>) -> String {
    match size {
        Some(size) => format!("{size} bytes"),
        None => "length prefix over the limit".to_string(),
    }
}
