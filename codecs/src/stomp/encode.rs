//! The STOMP encoder.
//!
//! Frames are written with LF line ends (valid in every version), headers
//! escaped as the version and command require, and a `content-length`
//! header whenever the body is not empty, so bodies may hold NUL octets.

use bytes::{BufMut, BytesMut};

use super::error::{excerpt, EncodeError};
use super::escape::{escape_into, Escaping};
use super::frame::{header, Frame, Version};

/// Writes `frame` as STOMP `version` to `out`.
///
/// `content-length` is always the body's real length: a `content-length`
/// header in `frame.headers` keeps its position but gets that value (later
/// repeats are dropped); without one, it is appended when the body is not
/// empty.
///
/// Fails, leaving `out` as it was, when a header cannot be written in this
/// version (see [`EncodeError::Unrepresentable`]).
pub fn encode_frame(
    frame: &Frame,
    version: Version,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let start = out.len();
    let result = write_frame(frame, version, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn write_frame(frame: &Frame, version: Version, out: &mut BytesMut) -> Result<(), EncodeError> {
    let escaping = Escaping::for_frame(frame.command, version);
    let headers_len: usize = frame
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2)
        .sum();
    out.reserve(frame.command.as_str().len() + headers_len + frame.body.len() + 32);

    out.put_slice(frame.command.as_str().as_bytes());
    out.put_u8(b'\n');
    let mut wrote_length = false;
    for (name, value) in &frame.headers {
        let fail = |reason| EncodeError::Unrepresentable {
            header: excerpt(name.as_bytes()),
            command: frame.command.as_str(),
            version,
            reason,
        };
        if name == header::CONTENT_LENGTH {
            if !wrote_length {
                write_content_length(frame.body.len(), out);
                wrote_length = true;
            }
            continue;
        }
        escape_into(name, escaping, true, out).map_err(fail)?;
        out.put_u8(b':');
        escape_into(value, escaping, false, out).map_err(fail)?;
        out.put_u8(b'\n');
    }
    if !wrote_length && !frame.body.is_empty() {
        write_content_length(frame.body.len(), out);
    }
    out.put_u8(b'\n');
    out.put_slice(&frame.body);
    out.put_u8(0);
    Ok(())
}

fn write_content_length(len: usize, out: &mut BytesMut) {
    out.put_slice(header::CONTENT_LENGTH.as_bytes());
    out.put_u8(b':');
    out.put_slice(len.to_string().as_bytes());
    out.put_u8(b'\n');
}

/// Writes one heart-beat: a single LF (an EOL in every version).
pub fn encode_heartbeat(out: &mut BytesMut) {
    out.put_u8(b'\n');
}
