//! Decode errors of the AMQP 0-9-1 wire codec.
//!
//! Every [`DecodeError`] is a *connection-level* (hard) error: once the byte
//! stream cannot be parsed there is no way to resynchronise, so the session
//! answers with `connection.close` carrying [`DecodeError::reply_code`] and
//! drops the socket.

use super::spec::reply_code;

/// Why a frame, method, property list or field table could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The declared frame payload does not fit in the negotiated `frame_max`
    /// (which counts the 7-byte frame header and the frame-end octet too).
    #[error(
        "frame payload of {size} bytes exceeds frame_max {max} (including 8 bytes of framing)"
    )]
    FrameTooLarge {
        /// Declared payload size.
        size: u32,
        /// Effective frame_max the frame was checked against.
        max: u32,
    },

    /// The octet after the payload was not `0xCE`.
    #[error("bad frame end octet 0x{got:02x} (expected 0xce)")]
    BadFrameEnd {
        /// The octet found instead of `0xCE`.
        got: u8,
    },

    /// The frame type octet is not 1 (method), 2 (header), 3 (body) or 8 (heartbeat).
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),

    /// A frame whose payload is structurally impossible for its type, e.g. a
    /// method frame shorter than its class/method ids or a heartbeat with payload.
    #[error("malformed {context} frame")]
    MalformedFrame {
        /// Which frame type was malformed.
        context: &'static str,
    },

    /// A method frame for a class this codec does not know.
    #[error("unknown class {0}")]
    UnknownClass(u16),

    /// A method frame for a known class but an unknown method.
    #[error("unknown method {class_id}.{method_id}")]
    UnknownMethod {
        /// Class id of the method frame.
        class_id: u16,
        /// Method id of the method frame.
        method_id: u16,
    },

    /// The payload ended in the middle of a value.
    #[error("truncated {context}")]
    Truncated {
        /// What was being decoded.
        context: &'static str,
    },

    /// A short string (or table key) was not valid UTF-8.
    #[error("invalid UTF-8 in {context}")]
    InvalidUtf8 {
        /// What was being decoded.
        context: &'static str,
    },

    /// A field-table / array value carried an unknown type tag.
    #[error("unknown field value type 0x{0:02x}")]
    BadFieldType(u8),

    /// Field tables/arrays nested deeper than [`super::value::MAX_DEPTH`].
    #[error("field tables nested too deeply")]
    TooDeep,

    /// Bytes were left over after all fields of a structure were decoded.
    #[error("{count} trailing bytes after {context}")]
    TrailingBytes {
        /// What was being decoded.
        context: &'static str,
        /// How many bytes were left.
        count: usize,
    },

    /// Property flags announce a property this codec does not know (bit 1 of
    /// the first flag word, or any property bit in a continuation word).
    #[error("unknown property flags 0x{flags:04x}")]
    UnknownPropertyFlags {
        /// The offending flag word.
        flags: u16,
    },

    /// The underlying transport failed (needed by tokio-util's codec traits).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl DecodeError {
    /// The AMQP reply code to put in the `connection.close` sent because of
    /// this error.
    ///
    /// * framing errors, and arguments cut short or followed by stray bytes
    ///   → 501 FRAME_ERROR (RabbitMQ answers "cannot decode" with 501),
    /// * argument values that are not valid (bad UTF-8, unknown field type,
    ///   nesting too deep, unknown property flags) → 502 SYNTAX_ERROR,
    /// * unknown class or method → 540 NOT_IMPLEMENTED,
    /// * I/O errors → 541 INTERNAL_ERROR (informational only: the socket is
    ///   gone, nothing can be sent).
    pub fn reply_code(&self) -> u16 {
        match self {
            DecodeError::FrameTooLarge { .. }
            | DecodeError::BadFrameEnd { .. }
            | DecodeError::UnknownFrameType(_)
            | DecodeError::MalformedFrame { .. }
            | DecodeError::Truncated { .. }
            | DecodeError::TrailingBytes { .. } => reply_code::FRAME_ERROR,
            DecodeError::UnknownClass(_) | DecodeError::UnknownMethod { .. } => {
                reply_code::NOT_IMPLEMENTED
            }
            DecodeError::InvalidUtf8 { .. }
            | DecodeError::BadFieldType(_)
            | DecodeError::TooDeep
            | DecodeError::UnknownPropertyFlags { .. } => reply_code::SYNTAX_ERROR,
            DecodeError::Io(_) => reply_code::INTERNAL_ERROR,
        }
    }
}
