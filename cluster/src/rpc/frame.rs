//! Frames after the handshake: `header ‖ body` inside a length-delimited
//! frame (see the module docs of `rpc` for the layout).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::codec::length_delimited::LengthDelimitedCodecError;
use tokio_util::codec::LengthDelimitedCodec;

use super::{Error, Versioned};

/// The largest frame accepted while the peer is not yet authenticated.
pub(crate) const HANDSHAKE_MAX_FRAME: usize = 64 * 1024;

/// The envelope of every post-handshake frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Header {
    /// A call; the body is a `Req`. The peer answers with `Response` or `Failed`.
    Request { id: u64 },
    /// The answer to the caller's request `id`; the body is a `Resp`.
    Response { id: u64 },
    /// A one-way message; the body is a `Req`.
    Message,
    /// The peer could not answer request `id`; no body.
    Failed { id: u64, reason: String },
}

/// The length-delimited codec: a 4-byte big-endian length, then the payload.
pub(crate) fn codec(max_frame_len: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(4)
        .max_frame_length(max_frame_len)
        .new_codec()
}

/// Encodes `header ‖ body` and checks the payload against the peer's limit.
pub(crate) fn encode<T: Versioned>(
    header: &Header,
    body: Option<&T>,
    version: u16,
    max: usize,
) -> Result<Bytes, Error> {
    let mut out = Vec::with_capacity(64);
    postcard::to_io(header, &mut out).map_err(|e| Error::Encode(e.to_string()))?;
    if let Some(body) = body {
        body.encode(version, &mut out)?;
    }
    if out.len() > max {
        return Err(Error::FrameTooLarge { size: Some(out.len()), max });
    }
    Ok(Bytes::from(out))
}

/// Splits a payload into its header and body bytes.
pub(crate) fn decode_header(payload: &[u8]) -> Result<(Header, &[u8]), Error> {
    postcard::take_from_bytes(payload).map_err(|e| Error::Decode(format!("frame header: {e}")))
}

/// Turns an error of the codec's reader into ours.
pub(crate) fn read_error(e: std::io::Error, max: usize) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<LengthDelimitedCodecError>()) {
        Error::FrameTooLarge { size: None, max }
    } else {
        Error::Io(e)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_layout() {
        let b = encode(&Header::Request { id: 300 }, Some(&()), 1, 1024).unwrap();
        // variant 0, then 300 as a varint (0xac 0x02); `()` encodes to nothing.
        assert_eq!(&b[..], &[0, 0xac, 0x02]);
        let (h, rest) = decode_header(&b).unwrap();
        assert_eq!(h, Header::Request { id: 300 });
        assert!(rest.is_empty());
    }

    #[test]
    fn outbound_limit() {
        let big = vec![7u8; 100];
        let r = encode(&Header::Message, Some(&Blob(big)), 1, 50);
        assert!(matches!(r, Err(Error::FrameTooLarge { size: Some(_), max: 50 })));
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Blob(#[serde(with = "serde_bytes")] Vec<u8>);
    impl Versioned for Blob {}

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Msg {
        A { x: u64, s: String },
        B(#[serde(with = "serde_bytes")] Vec<u8>),
        C(Vec<Option<u32>>),
    }
    impl Versioned for Msg {}

    /// Garbage and every truncation of valid frames give errors, never panics.
    #[test]
    fn garbage_never_panics() {
        let valid = [
            encode(
                &Header::Request { id: u64::MAX },
                Some(&Msg::A { x: 5, s: "hé".into() }),
                1,
                1 << 20,
            ),
            encode(&Header::Response { id: 1 }, Some(&Msg::B(vec![1; 300])), 1, 1 << 20),
            encode(
                &Header::Message,
                Some(&Msg::C(vec![Some(1), None, Some(u32::MAX)])),
                1,
                1 << 20,
            ),
            encode::<()>(&Header::Failed { id: 9, reason: "x".into() }, None, 1, 1 << 20),
        ];
        for frame in valid {
            let frame = frame.unwrap();
            for cut in 0..frame.len() {
                if let Ok((_, body)) = decode_header(&frame[..cut]) {
                    let _ = Msg::decode(1, body);
                }
            }
            let (_, body) = decode_header(&frame).unwrap();
            if !body.is_empty() {
                Msg::decode(1, body).unwrap();
                let mut longer = body.to_vec();
                longer.push(0);
                assert!(Msg::decode(1, &longer).is_err(), "trailing bytes are refused");
            }
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len % 97)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            if let Ok((_, body)) = decode_header(&bytes) {
                let _ = Msg::decode(1, body);
            }
            let _ = Msg::decode(1, &bytes);
        }
    }
}
