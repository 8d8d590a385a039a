//! The `basic` class content properties (the property part of a content
//! header frame). The same encoding is used by the storage layer to persist
//! message properties, so it is usable on its own.
//!
//! Layout: one or more 16-bit flag words, then the present properties in spec
//! order. Bit 15 of the first word is `content-type` … bit 2 is `cluster-id`;
//! bit 1 is unused and bit 0 says another flag word follows.

use bytes::{BufMut, BytesMut};
use nom::combinator::cond;
use nom::Parser;

use super::error::DecodeError;
use super::value::FieldTable;
use super::wire::{self, fail, parse_all, put_shortstr, shortstr, shortstr_len, PResult};

/// Message properties of the `basic` class. Every property is optional;
/// `None` means the flag bit is clear and nothing is on the wire.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BasicProperties {
    /// MIME content type.
    pub content_type: Option<String>,
    /// MIME content encoding.
    pub content_encoding: Option<String>,
    /// Application headers (also used for RabbitMQ extensions like `x-…`).
    pub headers: Option<FieldTable>,
    /// 1 = transient, 2 = persistent.
    pub delivery_mode: Option<u8>,
    /// Message priority, 0..=9.
    pub priority: Option<u8>,
    /// Application correlation identifier.
    pub correlation_id: Option<String>,
    /// Address to reply to.
    pub reply_to: Option<String>,
    /// Message TTL in milliseconds, as a decimal string.
    pub expiration: Option<String>,
    /// Application message identifier.
    pub message_id: Option<String>,
    /// Message timestamp (seconds since the epoch).
    pub timestamp: Option<u64>,
    /// Message type name (the AMQP `type` property).
    pub kind: Option<String>,
    /// Creating user id (RabbitMQ validates it against the connection user).
    pub user_id: Option<String>,
    /// Creating application id.
    pub app_id: Option<String>,
    /// Deprecated cluster id.
    pub cluster_id: Option<String>,
}

// Property flag bits, in spec order.
const CONTENT_TYPE: u16 = 1 << 15;
const CONTENT_ENCODING: u16 = 1 << 14;
const HEADERS: u16 = 1 << 13;
const DELIVERY_MODE: u16 = 1 << 12;
const PRIORITY: u16 = 1 << 11;
const CORRELATION_ID: u16 = 1 << 10;
const REPLY_TO: u16 = 1 << 9;
const EXPIRATION: u16 = 1 << 8;
const MESSAGE_ID: u16 = 1 << 7;
const TIMESTAMP: u16 = 1 << 6;
const TYPE: u16 = 1 << 5;
const USER_ID: u16 = 1 << 4;
const APP_ID: u16 = 1 << 3;
const CLUSTER_ID: u16 = 1 << 2;
/// Bit 0: another flag word follows.
const CONTINUATION: u16 = 1;
/// Every bit of the first word that names a known property.
const KNOWN: u16 = 0xFFFC;

impl BasicProperties {
    /// True if `delivery_mode` is 2 (persistent).
    pub fn is_persistent(&self) -> bool {
        self.delivery_mode == Some(2)
    }

    /// The property flag word describing which properties are present.
    pub fn flags(&self) -> u16 {
        let mut flags = 0;
        let mut set = |bit: u16, present: bool| {
            if present {
                flags |= bit;
            }
        };
        set(CONTENT_TYPE, self.content_type.is_some());
        set(CONTENT_ENCODING, self.content_encoding.is_some());
        set(HEADERS, self.headers.is_some());
        set(DELIVERY_MODE, self.delivery_mode.is_some());
        set(PRIORITY, self.priority.is_some());
        set(CORRELATION_ID, self.correlation_id.is_some());
        set(REPLY_TO, self.reply_to.is_some());
        set(EXPIRATION, self.expiration.is_some());
        set(MESSAGE_ID, self.message_id.is_some());
        set(TIMESTAMP, self.timestamp.is_some());
        set(TYPE, self.kind.is_some());
        set(USER_ID, self.user_id.is_some());
        set(APP_ID, self.app_id.is_some());
        set(CLUSTER_ID, self.cluster_id.is_some());
        flags
    }

    /// Number of bytes [`encode_properties`] writes.
    pub fn encoded_len(&self) -> usize {
        let s = |v: &Option<String>| v.as_deref().map_or(0, shortstr_len);
        2 + s(&self.content_type)
            + s(&self.content_encoding)
            + self.headers.as_ref().map_or(0, FieldTable::encoded_len)
            + self.delivery_mode.map_or(0, |_| 1)
            + self.priority.map_or(0, |_| 1)
            + s(&self.correlation_id)
            + s(&self.reply_to)
            + s(&self.expiration)
            + s(&self.message_id)
            + self.timestamp.map_or(0, |_| 8)
            + s(&self.kind)
            + s(&self.user_id)
            + s(&self.app_id)
            + s(&self.cluster_id)
    }
}

/// Writes the property flags and the present properties (not the class id,
/// weight or body size of the header frame). Short strings longer than 255
/// bytes are truncated at a character boundary.
pub fn encode_properties(props: &BasicProperties, out: &mut BytesMut) {
    let put_str = |out: &mut BytesMut, v: &Option<String>| {
        if let Some(s) = v {
            put_shortstr(out, s);
        }
    };
    out.put_u16(props.flags());
    put_str(out, &props.content_type);
    put_str(out, &props.content_encoding);
    if let Some(headers) = &props.headers {
        headers.encode(out);
    }
    if let Some(v) = props.delivery_mode {
        out.put_u8(v);
    }
    if let Some(v) = props.priority {
        out.put_u8(v);
    }
    put_str(out, &props.correlation_id);
    put_str(out, &props.reply_to);
    put_str(out, &props.expiration);
    put_str(out, &props.message_id);
    if let Some(v) = props.timestamp {
        out.put_u64(v);
    }
    put_str(out, &props.kind);
    put_str(out, &props.user_id);
    put_str(out, &props.app_id);
    put_str(out, &props.cluster_id);
}

/// Decodes property flags and properties; `input` must contain exactly that
/// (trailing bytes are an error).
pub fn decode_properties(input: &[u8]) -> Result<BasicProperties, DecodeError> {
    parse_all("content properties", parse_properties, input)
}

/// Parses the property flag words and then the present properties.
pub(crate) fn parse_properties(input: &[u8]) -> PResult<'_, BasicProperties> {
    const CTX: &str = "content properties";
    let (mut input, flags) = wire::u16(CTX).parse(input)?;
    if flags & !(KNOWN | CONTINUATION) != 0 {
        return Err(fail(DecodeError::UnknownPropertyFlags { flags }));
    }
    // Further flag words may follow; basic has only 14 properties, so they
    // may only carry the continuation bit itself.
    let mut word = flags;
    while word & CONTINUATION != 0 {
        (input, word) = wire::u16(CTX).parse(input)?;
        if word & !CONTINUATION != 0 {
            return Err(fail(DecodeError::UnknownPropertyFlags { flags: word }));
        }
    }

    let has = |bit: u16| flags & bit != 0;
    let (
        input,
        (
            content_type,
            content_encoding,
            headers,
            delivery_mode,
            priority,
            correlation_id,
            reply_to,
            expiration,
            message_id,
            timestamp,
            kind,
            user_id,
            app_id,
            cluster_id,
        ),
    ) = (
        cond(has(CONTENT_TYPE), shortstr(CTX)),
        cond(has(CONTENT_ENCODING), shortstr(CTX)),
        cond(has(HEADERS), |i| FieldTable::parse(i, 0)),
        cond(has(DELIVERY_MODE), wire::u8(CTX)),
        cond(has(PRIORITY), wire::u8(CTX)),
        cond(has(CORRELATION_ID), shortstr(CTX)),
        cond(has(REPLY_TO), shortstr(CTX)),
        cond(has(EXPIRATION), shortstr(CTX)),
        cond(has(MESSAGE_ID), shortstr(CTX)),
        cond(has(TIMESTAMP), wire::u64(CTX)),
        cond(has(TYPE), shortstr(CTX)),
        cond(has(USER_ID), shortstr(CTX)),
        cond(has(APP_ID), shortstr(CTX)),
        cond(has(CLUSTER_ID), shortstr(CTX)),
    )
        .parse(input)?;
    let props = BasicProperties {
        content_type,
        content_encoding,
        headers,
        delivery_mode,
        priority,
        correlation_id,
        reply_to,
        expiration,
        message_id,
        timestamp,
        kind,
        user_id,
        app_id,
        cluster_id,
    };
    Ok((input, props))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use crate::amqp::arb::arb_properties;
    use proptest::prelude::*;

    fn encode(p: &BasicProperties) -> BytesMut {
        let mut out = BytesMut::new();
        encode_properties(p, &mut out);
        out
    }

    proptest! {
        #[test]
        fn round_trip(p in arb_properties()) {
            let bytes = encode(&p);
            prop_assert_eq!(bytes.len(), p.encoded_len());
            prop_assert_eq!(decode_properties(&bytes)?, p);
        }

        #[test]
        fn strict_prefix_fails(p in arb_properties()) {
            let bytes = encode(&p);
            for cut in 0..bytes.len() {
                prop_assert!(decode_properties(&bytes[..cut]).is_err());
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_properties(&bytes);
        }
    }

    #[test]
    fn byte_exact_persistent_text() {
        let p = BasicProperties {
            content_type: Some("text/plain".into()),
            delivery_mode: Some(2),
            ..Default::default()
        };
        assert!(p.is_persistent());
        let mut expected = vec![0x90, 0x00, 10];
        expected.extend_from_slice(b"text/plain");
        expected.push(2);
        assert_eq!(&encode(&p)[..], &expected[..]);
    }

    #[test]
    fn empty_properties_are_two_zero_bytes() {
        assert_eq!(&encode(&BasicProperties::default())[..], &[0, 0]);
    }

    #[test]
    fn continuation_words() {
        // delivery_mode present, continuation set, then an empty final word.
        let p = decode_properties(&[0x10, 0x01, 0x00, 0x00, 1]).unwrap();
        assert_eq!(p.delivery_mode, Some(1));
        // A continuation word announcing an unknown property is rejected.
        assert!(matches!(
            decode_properties(&[0x00, 0x01, 0x80, 0x00]),
            Err(DecodeError::UnknownPropertyFlags { flags: 0x8000 })
        ));
        // Bit 1 of the first word is unused.
        assert!(matches!(
            decode_properties(&[0x00, 0x02]),
            Err(DecodeError::UnknownPropertyFlags { .. })
        ));
    }
}
