//! Serde for AMQP field tables: their AMQP encoding as bytes. The codecs
//! crate knows nothing of serde, and that encoding is exact (every value
//! type and integer width survives), so snapshots compare equal.

use bytes::BytesMut;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serializer};
use sluice_codecs::command::Arguments;

pub fn serialize<S: Serializer>(args: &Arguments, s: S) -> Result<S::Ok, S::Error> {
    let mut b = BytesMut::new();
    args.encode(&mut b);
    s.serialize_bytes(&b)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arguments, D::Error> {
    let bytes = serde_bytes::ByteBuf::deserialize(d)?;
    Arguments::decode(&bytes).map_err(D::Error::custom)
}
