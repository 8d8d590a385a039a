//! Errors of the STOMP codec.
//!
//! Every [`DecodeError`] is fatal for the connection: STOMP has no way to
//! resynchronise a byte stream, and the specification says a server that
//! rejects a frame sends an ERROR frame and closes. The session puts
//! [`DecodeError::summary`] in the ERROR frame's `message` header and the
//! `Display` text (which says exactly what was wrong) in its body.

use super::frame::Version;

/// Longest excerpt of offending input quoted in an error.
pub(crate) const EXCERPT_MAX: usize = 64;

/// A printable excerpt of untrusted bytes for an error message: lossy
/// UTF-8, at most [`EXCERPT_MAX`] characters, control characters escaped.
pub(crate) fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == EXCERPT_MAX {
            out.push('…');
            break;
        }
        out.extend(c.escape_debug());
    }
    out
}

/// Why the bytes received could not be decoded as a STOMP frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame (command, headers, body and NUL) is larger than
    /// [`super::Limits::max_frame_size`]. Detected from the headers alone
    /// when `content-length` is given, before the body is buffered.
    #[error("frame of at least {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Size of the frame, or how much of it was seen when the limit was hit.
        size: usize,
        /// The limit.
        max: usize,
    },

    /// The command line or a header line is longer than
    /// [`super::Limits::max_header_line_length`].
    #[error("header line of at least {length} bytes exceeds the limit of {max} bytes")]
    HeaderLineTooLong {
        /// Length of the line, or how much of it was seen.
        length: usize,
        /// The limit.
        max: usize,
    },

    /// More distinct headers than [`super::Limits::max_headers`]
    /// (repeated headers are dropped and do not count).
    #[error("more than {max} headers in one frame")]
    TooManyHeaders {
        /// The limit.
        max: usize,
    },

    /// The command line is not one of the 15 STOMP commands (commands are
    /// case sensitive).
    #[error("unknown command \"{command}\"")]
    UnknownCommand {
        /// The command line as received (an excerpt).
        command: String,
    },

    /// A header line without a `:`.
    #[error("header line without a colon: \"{line}\"")]
    MissingColon {
        /// The line (an excerpt).
        line: String,
    },

    /// A backslash escape this version does not define (`\t`, `\r` before
    /// 1.2, a backslash at the end of a name or value). STOMP 1.1 and 1.2
    /// make this a fatal protocol error.
    #[error("undefined escape sequence \"{sequence}\" in header \"{header}\" (STOMP {version})")]
    BadEscape {
        /// The sequence, e.g. `\t`.
        sequence: String,
        /// The header (name) it occurred in, an excerpt.
        header: String,
        /// The version whose rules were applied.
        version: Version,
    },

    /// A carriage return that is not part of a CR LF line end. CR must be
    /// escaped as `\r` (STOMP 1.2) and cannot occur in 1.0/1.1 headers.
    #[error("carriage return not followed by a line feed in {context}")]
    BareCarriageReturn {
        /// Where: "command", "header", "between frames".
        context: &'static str,
    },

    /// A NUL octet inside the command or a header line.
    #[error("NUL octet inside {context}")]
    NulInHeaders {
        /// Where: "command" or "header".
        context: &'static str,
    },

    /// A header name or value (after unescaping) that is not UTF-8.
    #[error("header \"{header}\" is not valid UTF-8")]
    InvalidUtf8 {
        /// The header (lossy excerpt).
        header: String,
    },

    /// A `content-length` that is not a non-negative decimal number.
    #[error("invalid content-length \"{value}\"")]
    BadContentLength {
        /// The value received (an excerpt).
        value: String,
    },

    /// The octet after a `content-length` body is not NUL.
    #[error(
        "body of content-length {content_length} is followed by 0x{found:02x}, not a NUL octet"
    )]
    MissingNul {
        /// The declared body length.
        content_length: usize,
        /// The octet found instead of NUL.
        found: u8,
    },

    /// The underlying transport failed (needed by tokio-util's codec traits).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl DecodeError {
    /// A short description for the `message` header of the ERROR frame
    /// (the `Display` text, more detailed, goes in its body).
    pub fn summary(&self) -> &'static str {
        match self {
            DecodeError::FrameTooLarge { .. } => "Frame too large",
            DecodeError::HeaderLineTooLong { .. } => "Header line too long",
            DecodeError::TooManyHeaders { .. } => "Too many headers",
            DecodeError::UnknownCommand { .. } => "Bad command",
            DecodeError::BadEscape { .. } => "Bad header escape",
            DecodeError::MissingColon { .. }
            | DecodeError::BareCarriageReturn { .. }
            | DecodeError::NulInHeaders { .. }
            | DecodeError::InvalidUtf8 { .. }
            | DecodeError::BadContentLength { .. }
            | DecodeError::MissingNul { .. } => "Invalid frame",
            DecodeError::Io(_) => "I/O error",
        }
    }
}

/// Why a frame cannot be written in the requested version.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A header name or value holds an octet that this frame's encoding
    /// cannot carry: LF or CR where no escaping applies (STOMP 1.0, and
    /// CONNECT/STOMP/CONNECTED frames), CR in STOMP 1.1 (which has no `\r`
    /// escape), a colon in an unescaped header name, or a NUL anywhere.
    #[error(
        "header \"{header}\" cannot be encoded in a STOMP {version} {command} frame: {reason}"
    )]
    Unrepresentable {
        /// The header name (an excerpt).
        header: String,
        /// The frame's command.
        command: &'static str,
        /// The version the frame was encoded for.
        version: Version,
        /// What could not be written.
        reason: &'static str,
    },

    /// The underlying transport failed (needed by tokio-util's codec traits).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
