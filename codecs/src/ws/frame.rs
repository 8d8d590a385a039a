//! WebSocket frames (RFC 6455 §5): decoding with limits and typed errors,
//! encoding, masking, and the assembly of fragmented messages.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::close_code;

/// Frame opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_u8(b: u8) -> Option<Opcode> {
        Some(match b {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    /// The 4-bit wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// Which side decodes: a server requires masked frames, a client unmasked ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// One frame, payload unmasked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: Opcode,
    pub payload: Bytes,
}

/// Why bytes could not be decoded. Every error is fatal for the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("reserved bits set without a negotiated extension (byte 0x{0:02x})")]
    ReservedBits(u8),
    #[error("unknown opcode 0x{0:x}")]
    UnknownOpcode(u8),
    #[error("a client frame is not masked")]
    Unmasked,
    #[error("a server frame is masked")]
    Masked,
    #[error("control frame is fragmented")]
    FragmentedControl,
    #[error("control frame payload of {0} bytes (at most 125)")]
    ControlTooLong(u64),
    #[error("payload length not in its shortest form")]
    NonMinimalLength,
    #[error("payload length has the most significant bit set")]
    LengthOverflow,
    #[error("frame payload of {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { size: u64, max: usize },
    #[error("message of at least {size} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { size: usize, max: usize },
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is unfinished")]
    ExpectedContinuation,
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("close frame payload of 1 byte")]
    BadClosePayload,
    #[error("close code {0} may not be sent")]
    BadCloseCode(u16),
}

impl DecodeError {
    /// The close code to answer this error with.
    pub fn close_code(&self) -> u16 {
        match self {
            DecodeError::FrameTooLarge { .. } | DecodeError::MessageTooLarge { .. } => close_code::TOO_BIG,
            DecodeError::InvalidUtf8 => close_code::INVALID_DATA,
            _ => close_code::PROTOCOL,
        }
    }
}

/// XORs `data` with `key`, starting at key offset 0 (RFC 6455 §5.3).
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Decodes one frame from the front of `buf` (consuming it) or returns
/// `Ok(None)` when more bytes are needed. The payload length is checked
/// against `max_payload` from the header, before the payload is buffered.
pub fn decode_frame(buf: &mut BytesMut, role: Role, max_payload: usize) -> Result<Option<Frame>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(DecodeError::ReservedBits(b0));
    }
    let opcode = Opcode::from_u8(b0 & 0x0F).ok_or(DecodeError::UnknownOpcode(b0 & 0x0F))?;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    match (role, masked) {
        (Role::Server, false) => return Err(DecodeError::Unmasked),
        (Role::Client, true) => return Err(DecodeError::Masked),
        _ => {}
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let len = u64::from(u16::from_be_bytes([buf[2], buf[3]]));
            if len < 126 {
                return Err(DecodeError::NonMinimalLength);
            }
            (len, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(DecodeError::LengthOverflow);
            }
            if len <= 0xFFFF {
                return Err(DecodeError::NonMinimalLength);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode.is_control() {
        if !fin {
            return Err(DecodeError::FragmentedControl);
        }
        if len > 125 {
            return Err(DecodeError::ControlTooLong(len));
        }
    }
    if len > max_payload as u64 {
        return Err(DecodeError::FrameTooLarge { size: len, max: max_payload });
    }
    // Fits in usize: at most max_payload.
    let len = len as usize;
    let key = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let k = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(k)
    } else {
        None
    };
    if buf.len() < at + len {
        buf.reserve(at + len - buf.len());
        return Ok(None);
    }
    buf.advance(at);
    let mut payload = buf.split_to(len);
    if let Some(k) = key {
        apply_mask(&mut payload, k);
    }
    Ok(Some(Frame { fin, opcode, payload: payload.freeze() }))
}

/// Encodes one frame; `mask` is required from clients, absent from servers.
pub fn encode_frame(fin: bool, opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>, dst: &mut BytesMut) {
    dst.reserve(payload.len() + 14);
    dst.put_u8(if fin { 0x80 } else { 0 } | opcode.as_u8());
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => dst.put_u8(m | n as u8),
        n if n <= 0xFFFF => {
            dst.put_u8(m | 126);
            dst.put_u16(n as u16);
        }
        n => {
            dst.put_u8(m | 127);
            dst.put_u64(n as u64);
        }
    }
    match mask {
        None => dst.extend_from_slice(payload),
        Some(k) => {
            dst.extend_from_slice(&k);
            let start = dst.len();
            dst.extend_from_slice(payload);
            apply_mask(&mut dst[start..], k);
        }
    }
}

/// A whole message, or a control frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// Close, with its status code and reason if it had a payload.
    Close(Option<(u16, String)>),
}

/// Encodes `msg` as one unfragmented frame.
pub fn encode_message(msg: &Message, mask: Option<[u8; 4]>, dst: &mut BytesMut) {
    match msg {
        Message::Text(b) => encode_frame(true, Opcode::Text, b, mask, dst),
        Message::Binary(b) => encode_frame(true, Opcode::Binary, b, mask, dst),
        Message::Ping(b) => encode_frame(true, Opcode::Ping, b, mask, dst),
        Message::Pong(b) => encode_frame(true, Opcode::Pong, b, mask, dst),
        Message::Close(None) => encode_frame(true, Opcode::Close, &[], mask, dst),
        Message::Close(Some((code, reason))) => encode_close(*code, reason, mask, dst),
    }
}

/// Encodes a close frame; the reason is cut (at a character boundary) to
/// fit the 125-byte control payload.
pub fn encode_close(code: u16, reason: &str, mask: Option<[u8; 4]>, dst: &mut BytesMut) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(true, Opcode::Close, &payload, mask, dst);
}

fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// Assembles messages from frames: fragmented data messages (control
/// frames may come between their fragments), a limit on the whole
/// message, UTF-8 of text messages and close payloads.
#[derive(Debug)]
pub struct MessageDecoder {
    role: Role,
    max_message: usize,
    /// Opcode and data of an unfinished fragmented message.
    partial: Option<(Opcode, BytesMut)>,
}

impl MessageDecoder {
    /// `max_message` bounds a message's total payload (and so each frame's).
    pub fn new(role: Role, max_message: usize) -> MessageDecoder {
        MessageDecoder { role, max_message, partial: None }
    }

    /// The next message or control frame, or `Ok(None)` when more bytes
    /// are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        loop {
            let room = self.max_message - self.partial.as_ref().map_or(0, |(_, d)| d.len());
            let Some(frame) = decode_frame(buf, self.role, room.max(125))? else {
                return Ok(None);
            };
            match frame.opcode {
                Opcode::Ping => return Ok(Some(Message::Ping(frame.payload))),
                Opcode::Pong => return Ok(Some(Message::Pong(frame.payload))),
                Opcode::Close => return parse_close(&frame.payload).map(|c| Some(Message::Close(c))),
                Opcode::Text | Opcode::Binary => {
                    if self.partial.is_some() {
                        return Err(DecodeError::ExpectedContinuation);
                    }
                    check_size(frame.payload.len(), self.max_message)?;
                    if frame.fin {
                        return finish(frame.opcode, frame.payload).map(Some);
                    }
                    self.partial = Some((frame.opcode, BytesMut::from(&frame.payload[..])));
                }
                Opcode::Continuation => {
                    let Some((opcode, mut data)) = self.partial.take() else {
                        return Err(DecodeError::UnexpectedContinuation);
                    };
                    check_size(data.len() + frame.payload.len(), self.max_message)?;
                    data.extend_from_slice(&frame.payload);
                    if frame.fin {
                        return finish(opcode, data.freeze()).map(Some);
                    }
                    self.partial = Some((opcode, data));
                }
            }
        }
    }
}

fn check_size(size: usize, max: usize) -> Result<(), DecodeError> {
    if size > max {
        return Err(DecodeError::MessageTooLarge { size, max });
    }
    Ok(())
}

fn finish(opcode: Opcode, data: Bytes) -> Result<Message, DecodeError> {
    if opcode == Opcode::Text {
        std::str::from_utf8(&data).map_err(|_| DecodeError::InvalidUtf8)?;
        Ok(Message::Text(data))
    } else {
        Ok(Message::Binary(data))
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, DecodeError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(DecodeError::BadClosePayload),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(DecodeError::BadCloseCode(code));
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| DecodeError::InvalidUtf8)?;
            Ok(Some((code, reason.to_string())))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    fn enc(msg: &Message, mask: Option<[u8; 4]>) -> BytesMut {
        let mut b = BytesMut::new();
        encode_message(msg, mask, &mut b);
        b
    }

    #[test]
    fn rfc_examples() {
        // RFC 6455 §5.7.
        let mut b = BytesMut::from(&[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f][..]);
        let mut d = MessageDecoder::new(Role::Client, MAX);
        assert_eq!(d.decode(&mut b).unwrap(), Some(Message::Text(Bytes::from_static(b"Hello"))));
        let mut b = BytesMut::from(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58][..]);
        let mut d = MessageDecoder::new(Role::Server, MAX);
        assert_eq!(d.decode(&mut b).unwrap(), Some(Message::Text(Bytes::from_static(b"Hello"))));
        assert!(b.is_empty());
        // Fragmented unmasked text "Hel" + "lo".
        let mut b = BytesMut::from(&[0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f][..]);
        let mut d = MessageDecoder::new(Role::Client, MAX);
        assert_eq!(d.decode(&mut b).unwrap(), Some(Message::Text(Bytes::from_static(b"Hello"))));
        // Masked ping "Hello" as the server receives it... and the encoder agrees.
        let e = enc(&Message::Text(Bytes::from_static(b"Hello")), Some([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!(&e[..], &[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]);
        // 256 bytes binary uses the 16-bit length; 64 KiB the 64-bit one.
        let e = enc(&Message::Binary(Bytes::from(vec![0u8; 256])), None);
        assert_eq!(&e[..4], &[0x82, 0x7E, 0x01, 0x00]);
        let e = enc(&Message::Binary(Bytes::from(vec![0u8; 65536])), None);
        assert_eq!(&e[..10], &[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn masking_is_required_by_role() {
        let mut b = enc(&Message::Text(Bytes::from_static(b"x")), None);
        assert_eq!(MessageDecoder::new(Role::Server, MAX).decode(&mut b), Err(DecodeError::Unmasked));
        let mut b = enc(&Message::Text(Bytes::from_static(b"x")), Some([1, 2, 3, 4]));
        assert_eq!(MessageDecoder::new(Role::Client, MAX).decode(&mut b), Err(DecodeError::Masked));
    }

    #[test]
    fn control_frames_between_fragments() {
        let k = Some([9, 8, 7, 6]);
        let mut b = BytesMut::new();
        encode_frame(false, Opcode::Binary, b"ab", k, &mut b);
        encode_frame(true, Opcode::Ping, b"p", k, &mut b);
        encode_frame(false, Opcode::Continuation, b"cd", k, &mut b);
        encode_frame(true, Opcode::Continuation, b"", k, &mut b);
        encode_close(1000, "bye", k, &mut b);
        let mut d = MessageDecoder::new(Role::Server, MAX);
        assert_eq!(d.decode(&mut b).unwrap(), Some(Message::Ping(Bytes::from_static(b"p"))));
        assert_eq!(d.decode(&mut b).unwrap(), Some(Message::Binary(Bytes::from_static(b"abcd"))));
        assert_eq!(d.decode(&mut b).unwrap(), Some(Message::Close(Some((1000, "bye".into())))));
        assert_eq!(d.decode(&mut b).unwrap(), None);
    }

    #[test]
    fn protocol_errors() {
        const K: Option<[u8; 4]> = Some([1, 1, 1, 1]);
        let k = K;
        type Build<'a> = Box<dyn Fn(&mut BytesMut) + 'a>;
        let cases: Vec<(Build, DecodeError)> = vec![
            (Box::new(|b| encode_frame(false, Opcode::Ping, b"", k, b)), DecodeError::FragmentedControl),
            (Box::new(|b| encode_frame(true, Opcode::Pong, &[0; 126], k, b)), DecodeError::ControlTooLong(126)),
            (Box::new(|b| encode_frame(true, Opcode::Continuation, b"x", k, b)), DecodeError::UnexpectedContinuation),
            (
                Box::new(|b| {
                    encode_frame(false, Opcode::Text, b"x", k, b);
                    encode_frame(true, Opcode::Text, b"y", k, b);
                }),
                DecodeError::ExpectedContinuation,
            ),
            (Box::new(|b| encode_frame(true, Opcode::Text, &[0xff, 0xfe], k, b)), DecodeError::InvalidUtf8),
            (Box::new(|b| encode_frame(true, Opcode::Close, &[3], k, b)), DecodeError::BadClosePayload),
            (Box::new(|b| encode_close(1005, "", k, b)), DecodeError::BadCloseCode(1005)),
            (Box::new(|b| b.extend_from_slice(&[0xC1, 0x80, 0, 0, 0, 0])), DecodeError::ReservedBits(0xC1)),
            (Box::new(|b| b.extend_from_slice(&[0x83, 0x80, 0, 0, 0, 0])), DecodeError::UnknownOpcode(3)),
            (Box::new(|b| b.extend_from_slice(&[0x82, 0xFE, 0, 5])), DecodeError::NonMinimalLength),
            (Box::new(|b| b.extend_from_slice(&[0x82, 0xFF, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF])), DecodeError::NonMinimalLength),
            (Box::new(|b| b.extend_from_slice(&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0])), DecodeError::LengthOverflow),
        ];
        for (build, want) in cases {
            let mut b = BytesMut::new();
            build(&mut b);
            let mut d = MessageDecoder::new(Role::Server, MAX);
            let got = loop {
                match d.decode(&mut b) {
                    Ok(Some(_)) => continue,
                    other => break other,
                }
            };
            assert_eq!(got, Err(want));
        }
    }

    #[test]
    fn size_limits() {
        let k = Some([0, 0, 0, 0]);
        let mut b = BytesMut::new();
        encode_frame(true, Opcode::Binary, &[0; 11], k, &mut b);
        let err = MessageDecoder::new(Role::Server, 10).decode(&mut b).unwrap_err();
        assert_eq!(err, DecodeError::MessageTooLarge { size: 11, max: 10 });
        assert_eq!(err.close_code(), 1009);
        // The limit is known from the header alone: 2^40 bytes announced, nothing buffered.
        let mut b = BytesMut::from(&[0x82, 0x7F, 0, 0, 1, 0, 0, 0, 0, 0][..]);
        assert!(matches!(MessageDecoder::new(Role::Client, 10).decode(&mut b), Err(DecodeError::FrameTooLarge { .. })));
        // Fragments add up.
        let mut b = BytesMut::new();
        encode_frame(false, Opcode::Binary, &[0; 6], k, &mut b);
        encode_frame(true, Opcode::Continuation, &[0; 6], k, &mut b);
        assert!(matches!(
            MessageDecoder::new(Role::Server, 10).decode(&mut b),
            Err(DecodeError::FrameTooLarge { .. } | DecodeError::MessageTooLarge { .. })
        ));
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            ".{0,300}".prop_map(|s| Message::Text(Bytes::from(s))),
            proptest::collection::vec(any::<u8>(), 0..70_000).prop_map(|v| Message::Binary(Bytes::from(v))),
            proptest::collection::vec(any::<u8>(), 0..126).prop_map(|v| Message::Ping(Bytes::from(v))),
            proptest::collection::vec(any::<u8>(), 0..126).prop_map(|v| Message::Pong(Bytes::from(v))),
            Just(Message::Close(None)),
            (prop_oneof![Just(1000u16), Just(1002), 3000..5000u16], "[a-z ]{0,100}")
                .prop_map(|(c, r)| Message::Close(Some((c, r)))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn round_trip_fragmented_and_split(
            msgs in proptest::collection::vec(message(), 1..5),
            mask in any::<[u8; 4]>(),
            frag in 1usize..5000,
            chunk in 1usize..3000,
        ) {
            // Data messages are cut into fragments of `frag` bytes; the wire
            // arrives in chunks of `chunk` bytes.
            let mut wire = BytesMut::new();
            for m in &msgs {
                match m {
                    Message::Text(d) | Message::Binary(d) => {
                        let op = if matches!(m, Message::Text(_)) { Opcode::Text } else { Opcode::Binary };
                        let parts: Vec<&[u8]> = if d.is_empty() { vec![&[][..]] } else { d.chunks(frag).collect() };
                        for (i, p) in parts.iter().enumerate() {
                            let o = if i == 0 { op } else { Opcode::Continuation };
                            encode_frame(i + 1 == parts.len(), o, p, Some(mask), &mut wire);
                        }
                    }
                    _ => encode_message(m, Some(mask), &mut wire),
                }
            }
            let mut d = MessageDecoder::new(Role::Server, MAX);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for c in wire.chunks(chunk) {
                buf.extend_from_slice(c);
                while let Some(m) = d.decode(&mut buf).unwrap() {
                    got.push(m);
                }
            }
            prop_assert_eq!(got, msgs.clone());
            prop_assert!(buf.is_empty());
            // Unmasked, as a client decodes the server.
            let mut wire = BytesMut::new();
            for m in &msgs {
                encode_message(m, None, &mut wire);
            }
            let mut d = MessageDecoder::new(Role::Client, MAX);
            let mut got = Vec::new();
            while let Some(m) = d.decode(&mut wire).unwrap() {
                got.push(m);
            }
            prop_assert_eq!(got, msgs);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000), chunk in 1usize..64, max in 0usize..5000) {
            for role in [Role::Server, Role::Client] {
                let mut d = MessageDecoder::new(role, max);
                let mut buf = BytesMut::new();
                'outer: for c in bytes.chunks(chunk) {
                    buf.extend_from_slice(c);
                    loop {
                        match d.decode(&mut buf) {
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(_) => break 'outer,
                        }
                    }
                }
            }
        }

        #[test]
        fn truncation_is_incomplete_not_an_error(m in message(), mask in any::<[u8; 4]>(), cut in 0usize..100_000) {
            let wire = enc(&m, Some(mask));
            let cut = cut % wire.len();
            let mut buf = BytesMut::from(&wire[..cut]);
            prop_assert_eq!(MessageDecoder::new(Role::Server, MAX).decode(&mut buf), Ok(None));
        }

        #[test]
        fn mask_is_an_involution(mut data in proptest::collection::vec(any::<u8>(), 0..100), key in any::<[u8; 4]>()) {
            let orig = data.clone();
            apply_mask(&mut data, key);
            apply_mask(&mut data, key);
            prop_assert_eq!(data, orig);
        }
    }
}
