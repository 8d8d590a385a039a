//! WebSocket (RFC 6455) for STOMP over WebSocket: a pure framing codec and
//! the HTTP/1.1 upgrade handshake, both over bytes with no I/O, so that
//! they can be fuzzed and property-tested in isolation.
//!
//! * [`frame`]: frame header parsing and encoding, masking, message
//!   assembly from fragments ([`MessageDecoder`]), control frames, limits;
//! * [`handshake`]: the upgrade request head (bounded), the checks of
//!   RFC 6455 §4.2.1, `Sec-WebSocket-Accept` (SHA-1 and base64 are
//!   implemented here: a few dozen lines, checked against the RFC vectors).
//!
//! Every decode error is a typed [`DecodeError`] that names the close code
//! to send ([`DecodeError::close_code`]).

pub mod frame;
pub mod handshake;

pub use frame::{
    apply_mask, decode_frame, encode_close, encode_frame, encode_message, DecodeError, Frame, Message, MessageDecoder,
    Opcode, Role,
};
pub use handshake::{accept_key, check_upgrade, parse_request, response_101, response_error, HandshakeError, Request, Upgrade};

/// Close codes used by this crate (RFC 6455 §7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The endpoint is going away (server shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL: u16 = 1002;
    /// A text message that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A message larger than the limit.
    pub const TOO_BIG: u16 = 1009;
}
