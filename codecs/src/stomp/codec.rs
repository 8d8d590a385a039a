//! tokio-util codec adapter around [`Decoder`] and [`encode_frame`].

use bytes::BytesMut;
use tokio_util::codec;

use super::decode::{Decoder, Item, Limits};
use super::encode::{encode_frame, encode_heartbeat};
use super::error::{DecodeError, EncodeError};
use super::frame::{Frame, Version};

/// Frames a STOMP byte stream in both directions.
///
/// The version starts at 1.0; the session calls [`StompCodec::set_version`]
/// (e.g. through `Framed::codec_mut()`) after CONNECT is negotiated and
/// before it reads the next frame.
#[derive(Debug, Default)]
pub struct StompCodec {
    decoder: Decoder,
}

impl StompCodec {
    /// A codec for `version` with `limits`.
    pub fn new(version: Version, limits: Limits) -> StompCodec {
        StompCodec {
            decoder: Decoder::new(version, limits),
        }
    }

    /// The version used to decode and encode.
    pub fn version(&self) -> Version {
        self.decoder.version
    }

    /// Switches both directions to `version`.
    pub fn set_version(&mut self, version: Version) {
        self.decoder.version = version;
    }

    /// The limits applied to incoming frames.
    pub fn limits(&self) -> &Limits {
        &self.decoder.limits
    }
}

impl codec::Decoder for StompCodec {
    type Item = Item;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Item>, DecodeError> {
        self.decoder.decode(src)
    }
}

impl codec::Encoder<&Frame> for StompCodec {
    type Error = EncodeError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
        encode_frame(frame, self.decoder.version, dst)
    }
}

impl codec::Encoder<Frame> for StompCodec {
    type Error = EncodeError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
        encode_frame(&frame, self.decoder.version, dst)
    }
}

impl codec::Encoder<Item> for StompCodec {
    type Error = EncodeError;

    /// A frame, or a heart-beat EOL.
    fn encode(&mut self, item: Item, dst: &mut BytesMut) -> Result<(), EncodeError> {
        match item {
            Item::Frame(frame) => encode_frame(&frame, self.decoder.version, dst),
            Item::Heartbeat => {
                encode_heartbeat(dst);
                Ok(())
            }
        }
    }
}
