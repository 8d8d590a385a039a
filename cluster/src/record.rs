//! A message as a storage record.
//!
//! Layout (version 1): `u8 version = 1`, `u8 len` + exchange bytes,
//! `u8 len` + routing key bytes, `u32 BE len` + the AMQP basic-properties
//! encoding (flags + property list), then the body up to the end. The body
//! is sliced out of the record without copying.

use bytes::{BufMut, Bytes, BytesMut};
use sluice_codecs::amqp::properties::{decode_properties, encode_properties};
use sluice_codecs::command::{Message, Properties};

use crate::Error;

const VERSION: u8 = 1;

/// Encodes a message into one record.
pub fn encode(message: &Message) -> Bytes {
    let [head, body] = encode_parts(message);
    let mut out = BytesMut::with_capacity(head.len() + body.len());
    out.put_slice(&head);
    out.put_slice(&body);
    out.freeze()
}

/// The record in two parts, everything before the body and the body
/// itself (shared, not copied), whose concatenation is [`encode`]'s: a log
/// entry that carries the record then copies the body only once.
pub fn encode_parts(message: &Message) -> [Bytes; 2] {
    let mut props = BytesMut::new();
    encode_properties(&message.properties, &mut props);
    let exchange = truncate(&message.exchange);
    let key = truncate(&message.routing_key);
    let mut head = BytesMut::with_capacity(1 + 2 + exchange.len() + key.len() + 4 + props.len());
    head.put_u8(VERSION);
    head.put_u8(exchange.len() as u8);
    head.put_slice(exchange);
    head.put_u8(key.len() as u8);
    head.put_slice(key);
    head.put_u32(props.len() as u32);
    head.put_slice(&props);
    [head.freeze(), message.body.clone()]
}

/// Names are at most 255 bytes (AMQP shortstr); anything longer was refused
/// upstream, so cutting here only guards the format.
fn truncate(s: &str) -> &[u8] {
    let b = s.as_bytes();
    b.get(..255).unwrap_or(b)
}

/// Decodes a record written by [`encode`].
pub fn decode(record: &Bytes) -> Result<Message, Error> {
    let (exchange, routing_key, properties, end) = decode_head(record)?;
    let body = record.slice(end..);
    Ok(Message { exchange, routing_key, properties: Box::new(properties), body })
}

/// Decodes a record kept as [`encode_parts`] made it (head and body apart).
pub fn decode_parts(head: &[u8], body: &Bytes) -> Result<Message, Error> {
    let (exchange, routing_key, properties, end) = decode_head(head)?;
    if end != head.len() {
        return Err(Error::Corrupt("message record: bytes after the properties".to_owned()));
    }
    Ok(Message { exchange, routing_key, properties: Box::new(properties), body: body.clone() })
}

/// Everything before the body, and where the body starts.
fn decode_head(record: &[u8]) -> Result<(String, String, Properties, usize), Error> {
    let corrupt = |what: &str| Error::Corrupt(format!("message record: {what}"));
    let mut pos = 0usize;
    let version = *record.first().ok_or_else(|| corrupt("empty"))?;
    if version != VERSION {
        return Err(corrupt("unknown version"));
    }
    pos += 1;
    let short = |pos: &mut usize| -> Result<String, Error> {
        let len = *record.get(*pos).ok_or_else(|| corrupt("truncated name"))? as usize;
        let bytes = record.get(*pos + 1..*pos + 1 + len).ok_or_else(|| corrupt("truncated name"))?;
        *pos += 1 + len;
        String::from_utf8(bytes.to_vec()).map_err(|_| corrupt("name not utf-8"))
    };
    let exchange = short(&mut pos)?;
    let routing_key = short(&mut pos)?;
    let len_bytes: [u8; 4] = record
        .get(pos..pos + 4)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| corrupt("truncated properties length"))?;
    let props_len = u32::from_be_bytes(len_bytes) as usize;
    pos += 4;
    let props = record.get(pos..pos + props_len).ok_or_else(|| corrupt("truncated properties"))?;
    let properties = decode_properties(props).map_err(|e| corrupt(&e.to_string()))?;
    pos += props_len;
    Ok((exchange, routing_key, properties, pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = Message {
            exchange: "ex".into(),
            routing_key: "a.b".into(),
            properties: Box::new(Properties { delivery_mode: Some(2), content_type: Some("text/plain".into()), ..Default::default() }),
            body: Bytes::from_static(b"hello\0world"),
        };
        let r = encode(&m);
        assert_eq!(decode(&r).unwrap(), m);
        let [head, body] = encode_parts(&m);
        assert_eq!([&head[..], &body[..]].concat(), &r[..]);
        assert_eq!(body.as_ptr(), m.body.as_ptr(), "the body is shared, not copied");
        let parted = decode_parts(&head, &body).unwrap();
        assert_eq!(parted, m);
        assert_eq!(parted.body.as_ptr(), m.body.as_ptr(), "decoded from parts without a copy");
        assert!(decode_parts(&r, &body).is_err(), "a whole record is not a head");
        for cut in 0..head.len() {
            assert!(decode_parts(&head[..cut], &body).is_err(), "head prefix {cut} must not decode");
        }
        for cut in 0..r.len() - m.body.len() {
            assert!(decode(&r.slice(..cut)).is_err(), "prefix {cut} must not decode");
        }
    }
}
