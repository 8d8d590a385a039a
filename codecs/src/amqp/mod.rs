//! AMQP 0-9-1 wire codec.
//!
//! * [`spec`] – the method table (structs, [`Method`], reply codes),
//! * [`value`] – field tables and values,
//! * [`properties`] – `basic` content properties,
//! * [`frame`] – protocol header and frame encoding/decoding,
//! * [`codec`] – tokio-util [`FrameCodec`],
//! * [`assemble`] – per-channel `method [header body*]` assembly,
//! * [`error`] – [`DecodeError`] and its reply codes,
//! * [`map`] – mapping to the protocol-neutral command model.

pub mod assemble;
pub mod codec;
pub mod error;
pub mod frame;
pub mod map;
pub mod properties;
pub mod spec;
pub mod value;

#[cfg(test)]
mod arb;
mod wire;

pub use assemble::{AssembleError, Assembled, Assembler};
pub use codec::FrameCodec;
pub use error::DecodeError;
pub use frame::{
    decode_frame, encode_content, encode_content_spliced, encode_frame, encode_method_frame,
    parse_protocol_header, Frame, ProtocolHeader, PROTOCOL_HEADER, SPLICE_MIN,
};
pub use properties::BasicProperties;
pub use spec::*;
pub use value::{Decimal, FieldTable, FieldValue};
