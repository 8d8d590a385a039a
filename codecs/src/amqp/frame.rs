//! AMQP 0-9-1 framing: the protocol header and the four frame types.
//!
//! ```text
//! frame = type:u8 channel:u16 size:u32 payload[size] 0xCE
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use nom::number::complete::{be_u16, be_u32, be_u8};
use nom::{IResult, Parser};

use super::error::DecodeError;
use super::properties::{encode_properties, parse_properties, BasicProperties};
use super::spec::Method;
use super::wire::{self, parse_all};

/// The protocol header a 0-9-1 client sends first (and the one the server
/// answers with before closing when it sees any other header).
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";

/// Frame type octet of a method frame.
pub const FRAME_METHOD: u8 = 1;
/// Frame type octet of a content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Frame type octet of a content body frame.
pub const FRAME_BODY: u8 = 3;
/// Frame type octet of a heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The octet that terminates every frame.
pub const FRAME_END: u8 = 0xCE;
/// Bytes of framing around a payload: 7 header bytes + the frame-end octet.
pub const FRAME_OVERHEAD: u32 = 8;
/// The smallest frame_max a peer may negotiate; also the limit to use
/// before `connection.tune-ok` has been received.
pub const FRAME_MIN_SIZE: u32 = 4096;
/// Hard upper bound on a frame (overhead included), applied when frame_max
/// is 0 ("no limit") or larger, so one frame can never make us buffer more.
pub const HARD_FRAME_MAX: u32 = 128 * 1024 * 1024;

/// Size of the fixed frame header (type, channel, size).
const HEADER_LEN: usize = 7;
/// Fixed part of a content header payload: class, weight, body size.
const CONTENT_HEADER_FIXED: usize = 12;

/// What the first 8 bytes of a connection were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolHeader {
    /// Exactly `AMQP 0 0 9 1`.
    Amqp091,
    /// Anything else (another AMQP version, HTTP, garbage). The server
    /// should reply with [`PROTOCOL_HEADER`] and close the socket.
    Other([u8; 8]),
}

/// Classifies the protocol header at the start of `buf`; `None` until 8
/// bytes are available. Does not consume anything.
pub fn parse_protocol_header(buf: &[u8]) -> Option<ProtocolHeader> {
    let header: [u8; 8] = buf.get(..8)?.try_into().ok()?;
    Some(if header == PROTOCOL_HEADER {
        ProtocolHeader::Amqp091
    } else {
        ProtocolHeader::Other(header)
    })
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A method frame.
    Method {
        /// Channel number (0 = connection).
        channel: u16,
        /// The method and its arguments.
        method: Method,
    },
    /// A content header frame (the weight field is always 0 and dropped).
    ///
    /// Properties are decoded as `basic` properties whatever `class_id`
    /// says; basic is the only content class and the [`super::Assembler`]
    /// rejects a header whose class does not match its method.
    Header {
        /// Channel number.
        channel: u16,
        /// Class of the content (60 for basic).
        class_id: u16,
        /// Total size of the body that follows in body frames.
        body_size: u64,
        /// The content properties (boxed: they are most of a frame's
        /// size, and frames are moved several times each on the read path).
        properties: Box<BasicProperties>,
    },
    /// A content body frame; the payload shares the read buffer's memory.
    Body {
        /// Channel number.
        channel: u16,
        /// A slice of the body.
        payload: Bytes,
    },
    /// A heartbeat frame (must be on channel 0; checking that is the
    /// session's job).
    Heartbeat {
        /// Channel number as received.
        channel: u16,
    },
}

impl Frame {
    /// The channel the frame was sent on.
    pub fn channel(&self) -> u16 {
        match *self {
            Frame::Method { channel, .. }
            | Frame::Header { channel, .. }
            | Frame::Body { channel, .. }
            | Frame::Heartbeat { channel } => channel,
        }
    }
}

/// The effective frame limit (overhead included) for a negotiated frame_max.
fn effective_frame_max(frame_max: u32) -> u32 {
    if frame_max == 0 {
        HARD_FRAME_MAX
    } else {
        frame_max.min(HARD_FRAME_MAX)
    }
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` (consuming nothing, but reserving room for the rest of
/// the frame) while the frame is incomplete. The type and the declared size
/// are validated as soon as the 7-byte header is available, so an oversized
/// frame is rejected before its payload is buffered. `frame_max` counts the
/// whole frame including 8 bytes of framing; 0 means "no limit" and is capped
/// at [`HARD_FRAME_MAX`].
///
/// Body payloads are split off `buf` without copying.
pub fn decode_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, DecodeError> {
    let Ok((_, (frame_type, channel, size))) = frame_header(buf) else {
        buf.reserve(HEADER_LEN.saturating_sub(buf.len()));
        return Ok(None);
    };

    if !matches!(
        frame_type,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(DecodeError::UnknownFrameType(frame_type));
    }
    let max = effective_frame_max(frame_max);
    if u64::from(size) + u64::from(FRAME_OVERHEAD) > u64::from(max) {
        return Err(DecodeError::FrameTooLarge { size, max });
    }
    // Cannot overflow: size + 8 <= HARD_FRAME_MAX.
    let payload_len =
        usize::try_from(size).map_err(|_| DecodeError::FrameTooLarge { size, max })?;
    let total = HEADER_LEN + payload_len + 1;
    let Some(&end) = buf.get(total - 1) else {
        buf.reserve(total - buf.len());
        return Ok(None);
    };
    if end != FRAME_END {
        return Err(DecodeError::BadFrameEnd { got: end });
    }

    buf.advance(HEADER_LEN);
    let payload = buf.split_to(payload_len).freeze();
    buf.advance(1);

    let frame = match frame_type {
        FRAME_METHOD => Frame::Method {
            channel,
            method: decode_method_payload(&payload)?,
        },
        FRAME_HEADER => decode_header_payload(channel, &payload)?,
        FRAME_BODY => Frame::Body { channel, payload },
        _ => {
            // FRAME_HEARTBEAT: RabbitMQ treats a heartbeat with a payload as
            // an unknown frame, i.e. a frame error.
            if !payload.is_empty() {
                return Err(DecodeError::MalformedFrame {
                    context: "heartbeat",
                });
            }
            Frame::Heartbeat { channel }
        }
    };
    Ok(Some(frame))
}

/// Parses the fixed frame header: type, channel, payload size. Fails only
/// while fewer than [`HEADER_LEN`] bytes are available.
fn frame_header(input: &[u8]) -> IResult<&[u8], (u8, u16, u32)> {
    (be_u8, be_u16, be_u32).parse(input)
}

fn decode_method_payload(payload: &[u8]) -> Result<Method, DecodeError> {
    const CTX: &str = "method frame";
    let (args, (class_id, method_id)) = (wire::u16(CTX), wire::u16(CTX))
        .parse(payload)
        .map_err(|_| DecodeError::MalformedFrame { context: "method" })?;
    Method::decode(class_id, method_id, args)
}

fn decode_header_payload(channel: u16, payload: &[u8]) -> Result<Frame, DecodeError> {
    const CTX: &str = "content header";
    // The fixed part plus at least one property flag word.
    if payload.len() < CONTENT_HEADER_FIXED + 2 {
        return Err(DecodeError::MalformedFrame { context: CTX });
    }
    let (class_id, _weight, body_size, properties) = parse_all(
        "content properties",
        // The weight is unused (always 0).
        (
            wire::u16(CTX),
            wire::u16(CTX),
            wire::u64(CTX),
            parse_properties,
        ),
        payload,
    )?;
    Ok(Frame::Header {
        channel,
        class_id,
        body_size,
        properties: Box::new(properties),
    })
}

/// Writes a frame header with a placeholder size; returns where the payload
/// starts so [`end_frame`] can fill in the size.
fn begin_frame(out: &mut BytesMut, frame_type: u8, channel: u16) -> usize {
    out.put_u8(frame_type);
    out.put_u16(channel);
    out.put_u32(0);
    out.len()
}

/// Patches the size of the frame whose payload started at `start` and
/// writes the frame-end octet. Patching the size from what was actually
/// written keeps the frame valid even if a size estimate was off.
fn end_frame(out: &mut BytesMut, start: usize) {
    let size = u32::try_from(out.len().saturating_sub(start)).unwrap_or(u32::MAX);
    if let Some(slot) = out.get_mut(start.saturating_sub(4)..start) {
        slot.copy_from_slice(&size.to_be_bytes());
    }
    out.put_u8(FRAME_END);
}

/// Encodes any frame into `out`.
pub fn encode_frame(frame: &Frame, out: &mut BytesMut) {
    match frame {
        Frame::Method { channel, method } => encode_method_frame(*channel, method, out),
        Frame::Header {
            channel,
            class_id,
            body_size,
            properties,
        } => encode_header_frame(*channel, *class_id, *body_size, properties, out),
        Frame::Body { channel, payload } => {
            out.reserve(payload.len() + FRAME_OVERHEAD as usize);
            encode_body_frame(*channel, payload, out);
        }
        Frame::Heartbeat { channel } => {
            out.reserve(FRAME_OVERHEAD as usize);
            let start = begin_frame(out, FRAME_HEARTBEAT, *channel);
            end_frame(out, start);
        }
    }
}

/// Encodes a method frame.
pub fn encode_method_frame(channel: u16, method: &Method, out: &mut BytesMut) {
    out.reserve(method.encoded_len() + FRAME_OVERHEAD as usize);
    let start = begin_frame(out, FRAME_METHOD, channel);
    method.write(out);
    end_frame(out, start);
}

/// A `basic.deliver` method frame from borrowed fields: the bytes of
/// [`encode_method_frame`] with a [`super::spec::BasicDeliver`], without
/// building one (it owns three strings, copied for every delivery).
pub fn encode_deliver_frame(
    channel: u16,
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
    out: &mut BytesMut,
) {
    out.reserve(4 + 3 + consumer_tag.len() + 8 + 1 + exchange.len() + routing_key.len() + FRAME_OVERHEAD as usize);
    let start = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(60);
    out.put_u16(60);
    wire::put_shortstr(out, consumer_tag);
    out.put_u64(delivery_tag);
    out.put_u8(u8::from(redelivered));
    wire::put_shortstr(out, exchange);
    wire::put_shortstr(out, routing_key);
    end_frame(out, start);
}

/// Encodes a content header frame.
pub fn encode_header_frame(
    channel: u16,
    class_id: u16,
    body_size: u64,
    properties: &BasicProperties,
    out: &mut BytesMut,
) {
    out.reserve(header_frame_len(properties));
    write_header_frame(channel, class_id, body_size, properties, out);
}

fn write_header_frame(
    channel: u16,
    class_id: u16,
    body_size: u64,
    properties: &BasicProperties,
    out: &mut BytesMut,
) {
    let start = begin_frame(out, FRAME_HEADER, channel);
    out.put_u16(class_id);
    out.put_u16(0); // weight
    out.put_u64(body_size);
    encode_properties(properties, out);
    end_frame(out, start);
}

fn header_frame_len(properties: &BasicProperties) -> usize {
    FRAME_OVERHEAD as usize + CONTENT_HEADER_FIXED + properties.encoded_len()
}

fn encode_body_frame(channel: u16, payload: &[u8], out: &mut BytesMut) {
    let start = begin_frame(out, FRAME_BODY, channel);
    out.put_slice(payload);
    end_frame(out, start);
}

/// Encodes the content header frame and the body frames of a message.
///
/// The body is split into frames carrying at most `frame_max - 8` bytes
/// (`frame_max` 0 means no limit, capped at [`HARD_FRAME_MAX`]; a
/// `frame_max` of 8 or less is treated as 1 byte per frame rather than
/// looping forever). An empty body produces no body frames. Space for
/// everything is reserved up front.
pub fn encode_content(
    channel: u16,
    class_id: u16,
    properties: &BasicProperties,
    body: &[u8],
    frame_max: u32,
    out: &mut BytesMut,
) {
    let chunk = effective_frame_max(frame_max)
        .saturating_sub(FRAME_OVERHEAD)
        .max(1);
    let chunk = usize::try_from(chunk).unwrap_or(usize::MAX);
    let frames = body.len().div_ceil(chunk);
    out.reserve(header_frame_len(properties) + frames * FRAME_OVERHEAD as usize + body.len());

    write_header_frame(channel, class_id, body.len() as u64, properties, out);
    for part in body.chunks(chunk) {
        encode_body_frame(channel, part, out);
    }
}

/// Body parts of at least this many bytes are not copied by
/// [`encode_content_spliced`].
pub const SPLICE_MIN: usize = 16 * 1024;

/// [`encode_content`] for a vectored write: a body frame whose payload is
/// at least [`SPLICE_MIN`] bytes gets its header and frame-end octet in
/// `out`, but not its payload: `(offset, part)` is pushed to `spliced`
/// instead, the payload to be written at `offset` of `out` (from the
/// message's own buffer, so a big body is not copied once more).
pub fn encode_content_spliced(
    channel: u16,
    class_id: u16,
    properties: &BasicProperties,
    body: &Bytes,
    frame_max: u32,
    out: &mut BytesMut,
    spliced: &mut Vec<(usize, Bytes)>,
) {
    let chunk = effective_frame_max(frame_max).saturating_sub(FRAME_OVERHEAD).max(1);
    let chunk = usize::try_from(chunk).unwrap_or(usize::MAX);
    if body.len() < SPLICE_MIN || chunk < SPLICE_MIN {
        encode_content(channel, class_id, properties, body, frame_max, out);
        return;
    }
    out.reserve(header_frame_len(properties) + body.len().div_ceil(chunk) * FRAME_OVERHEAD as usize);
    write_header_frame(channel, class_id, body.len() as u64, properties, out);
    let mut at = 0;
    while at < body.len() {
        let part = body.slice(at..body.len().min(at + chunk));
        at += part.len();
        out.put_u8(FRAME_BODY);
        out.put_u16(channel);
        out.put_u32(u32::try_from(part.len()).unwrap_or(u32::MAX));
        spliced.push((out.len(), part));
        out.put_u8(FRAME_END);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use crate::amqp::arb::arb_frame;
    use proptest::prelude::*;

    proptest! {
        /// The borrowed `basic.deliver` encoder writes the bytes of the
        /// generic one, shortstrs over 255 bytes (truncated) included.
        #[test]
        fn deliver_frame_is_the_generic_encoding(
            channel in any::<u16>(),
            tag in "\\PC{0,300}",
            delivery_tag in any::<u64>(),
            redelivered in any::<bool>(),
            exchange in "\\PC{0,40}",
            key in "\\PC{0,300}",
        ) {
            let mut fast = BytesMut::new();
            encode_deliver_frame(channel, &tag, delivery_tag, redelivered, &exchange, &key, &mut fast);
            let method = Method::BasicDeliver(super::super::spec::BasicDeliver {
                consumer_tag: tag.clone(),
                delivery_tag,
                redelivered,
                exchange: exchange.clone(),
                routing_key: key.clone(),
            });
            let mut generic = BytesMut::new();
            encode_method_frame(channel, &method, &mut generic);
            prop_assert_eq!(fast, generic);
        }
    }

    /// `encode_content_spliced` with its parts put back at their offsets
    /// is byte for byte `encode_content`, for bodies on both sides of
    /// [`SPLICE_MIN`] and frame sizes that split them.
    #[test]
    fn spliced_content_is_the_same_bytes() {
        let properties = BasicProperties { content_type: Some("a/b".into()), ..Default::default() };
        for len in [0, 100, SPLICE_MIN - 1, SPLICE_MIN, 65_536, 200_001] {
            let body: Bytes = (0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
            for frame_max in [0, 4096, 20_000, 131_072] {
                let mut plain = BytesMut::new();
                encode_content(3, 60, &properties, &body, frame_max, &mut plain);
                let (mut out, mut spliced) = (BytesMut::new(), Vec::new());
                encode_content_spliced(3, 60, &properties, &body, frame_max, &mut out, &mut spliced);
                let mut joined = Vec::new();
                let mut from = 0;
                for (at, part) in &spliced {
                    joined.extend_from_slice(&out[from..*at]);
                    joined.extend_from_slice(part);
                    from = *at;
                }
                joined.extend_from_slice(&out[from..]);
                assert_eq!(joined, plain.to_vec(), "len {len}, frame_max {frame_max}");
                let big = len >= SPLICE_MIN && (frame_max == 0 || frame_max as usize - 8 >= SPLICE_MIN);
                assert_eq!(!spliced.is_empty(), big, "len {len}, frame_max {frame_max}");
            }
        }
    }

    proptest! {
        #[test]
        fn frame_round_trip(frame in arb_frame()) {
            let mut buf = BytesMut::new();
            encode_frame(&frame, &mut buf);
            buf.put_slice(b"next");
            let decoded = decode_frame(&mut buf, 0)?;
            prop_assert_eq!(decoded, Some(frame));
            prop_assert_eq!(&buf[..], b"next");
        }

        #[test]
        fn byte_at_a_time_equals_whole(frame in arb_frame()) {
            let mut encoded = BytesMut::new();
            encode_frame(&frame, &mut encoded);
            let mut buf = BytesMut::new();
            for (i, b) in encoded.iter().enumerate() {
                buf.put_u8(*b);
                let res = decode_frame(&mut buf, 0)?;
                if i + 1 < encoded.len() {
                    prop_assert_eq!(res, None);
                } else {
                    prop_assert_eq!(res.as_ref(), Some(&frame));
                }
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                frame_max in 1u32..600) {
            let mut buf = BytesMut::from(&bytes[..]);
            // Decode until error or need-more-data; must terminate.
            while let Ok(Some(_)) = decode_frame(&mut buf, frame_max) {}
        }
    }

    #[test]
    fn protocol_header() {
        assert_eq!(parse_protocol_header(b"AMQP\x00\x00\x09"), None);
        assert_eq!(
            parse_protocol_header(&PROTOCOL_HEADER),
            Some(ProtocolHeader::Amqp091)
        );
        assert_eq!(
            parse_protocol_header(b"AMQP\x00\x00\x09\x01extra"),
            Some(ProtocolHeader::Amqp091)
        );
        assert_eq!(
            parse_protocol_header(b"AMQP\x01\x01\x00\x09"),
            Some(ProtocolHeader::Other(*b"AMQP\x01\x01\x00\x09"))
        );
        assert_eq!(
            parse_protocol_header(b"GET / HTTP/1.1\r\n"),
            Some(ProtocolHeader::Other(*b"GET / HT"))
        );
    }

    proptest! {
        #[test]
        fn encode_content_size_matches_reservation(
            props in crate::amqp::arb::arb_properties(),
            body_len in 0usize..1000,
            frame_max in 9u32..300,
        ) {
            let body = vec![1u8; body_len];
            let mut out = BytesMut::new();
            encode_content(7, 60, &props, &body, frame_max, &mut out);
            let frames = body_len.div_ceil((frame_max - 8) as usize);
            let expected = header_frame_len(&props) + frames * 8 + body_len;
            prop_assert_eq!(out.len(), expected);
        }
    }

    #[test]
    fn tiny_frame_max_does_not_loop() {
        let mut out = BytesMut::new();
        encode_content(1, 60, &BasicProperties::default(), b"abc", 8, &mut out);
        let mut frames = Vec::new();
        while let Some(f) = decode_frame(&mut out, 0).unwrap() {
            frames.push(f);
        }
        assert_eq!(frames.len(), 4); // header + 3 one-byte bodies
    }
}
