//! tokio-util codec adapter around [`decode_frame`] / [`encode_frame`].

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use super::error::DecodeError;
use super::frame::{decode_frame, encode_frame, Frame, FRAME_MIN_SIZE};

/// Frames an AMQP 0-9-1 byte stream (after the 8-byte protocol header, which
/// the session reads itself with [`super::parse_protocol_header`]).
///
/// `frame_max` is the limit applied to incoming frames (whole frame,
/// including 8 bytes of framing; 0 = no limit, capped at
/// [`super::frame::HARD_FRAME_MAX`]). The session raises it after
/// `connection.tune-ok`, e.g. through `Framed::codec_mut()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCodec {
    /// Maximum accepted incoming frame size.
    pub frame_max: u32,
}

impl FrameCodec {
    /// A codec accepting frames of up to `frame_max` bytes.
    pub fn new(frame_max: u32) -> Self {
        FrameCodec { frame_max }
    }
}

impl Default for FrameCodec {
    /// Uses [`FRAME_MIN_SIZE`], the limit that applies before tuning.
    fn default() -> Self {
        FrameCodec::new(FRAME_MIN_SIZE)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        decode_frame(src, self.frame_max)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = DecodeError;

    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), DecodeError> {
        encode_frame(&item, dst);
        Ok(())
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = DecodeError;

    fn encode(&mut self, item: &Frame, dst: &mut BytesMut) -> Result<(), DecodeError> {
        encode_frame(item, dst);
        Ok(())
    }
}
