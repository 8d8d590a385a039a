//! Proptest strategies shared by the unit tests (test builds only).

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;

use super::frame::Frame;
use super::properties::BasicProperties;
use super::spec::arb_method;
use super::value::{Decimal, FieldTable, FieldValue};

/// One strategy per method argument domain, named like the domain so the
/// `methods!` macro can call `field::$ty()`.
pub(crate) mod field {
    use super::*;

    pub(crate) fn octet() -> impl Strategy<Value = u8> {
        any::<u8>()
    }
    pub(crate) fn short() -> impl Strategy<Value = u16> {
        any::<u16>()
    }
    pub(crate) fn long() -> impl Strategy<Value = u32> {
        any::<u32>()
    }
    pub(crate) fn longlong() -> impl Strategy<Value = u64> {
        any::<u64>()
    }
    #[allow(dead_code)] // no method argument uses the domain today
    pub(crate) fn timestamp() -> impl Strategy<Value = u64> {
        any::<u64>()
    }
    pub(crate) fn bit() -> impl Strategy<Value = bool> {
        any::<bool>()
    }
    /// Unicode strings (multi-byte chars included) and ASCII up to the
    /// 255-byte limit.
    pub(crate) fn shortstr() -> impl Strategy<Value = String> {
        prop_oneof!["\\PC{0,40}", "[a-z]{0,255}"]
    }
    pub(crate) fn longstr() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..64).prop_map(Bytes::from)
    }
    pub(crate) fn table() -> impl Strategy<Value = FieldTable> {
        arb_table(2)
    }
}

fn non_nan_f32() -> impl Strategy<Value = f32> {
    // NaN != NaN would break equality checks; every other bit pattern is fair.
    any::<u32>()
        .prop_map(f32::from_bits)
        .prop_map(|f| if f.is_nan() { 0.0 } else { f })
}

fn non_nan_f64() -> impl Strategy<Value = f64> {
    any::<u64>()
        .prop_map(f64::from_bits)
        .prop_map(|f| if f.is_nan() { 0.0 } else { f })
}

/// Any field value, nesting tables/arrays up to `depth` levels.
pub(crate) fn arb_value(depth: u32) -> BoxedStrategy<FieldValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(FieldValue::Bool),
        any::<i8>().prop_map(FieldValue::I8),
        any::<u8>().prop_map(FieldValue::U8),
        any::<i16>().prop_map(FieldValue::I16),
        any::<u16>().prop_map(FieldValue::U16),
        any::<i32>().prop_map(FieldValue::I32),
        any::<u32>().prop_map(FieldValue::U32),
        any::<i64>().prop_map(FieldValue::I64),
        non_nan_f32().prop_map(FieldValue::F32),
        non_nan_f64().prop_map(FieldValue::F64),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| FieldValue::Decimal(Decimal { scale, value })),
        field::longstr().prop_map(FieldValue::LongString),
        any::<u64>().prop_map(FieldValue::Timestamp),
        Just(FieldValue::Void),
        field::longstr().prop_map(FieldValue::ByteArray),
    ];
    leaf.prop_recursive(depth, 48, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(FieldValue::Array),
            vec((field::shortstr(), inner), 0..4)
                .prop_map(|entries| FieldValue::Table(FieldTable(entries))),
        ]
    })
    .boxed()
}

/// Any field table whose values nest up to `depth` further levels.
pub(crate) fn arb_table(depth: u32) -> BoxedStrategy<FieldTable> {
    vec((field::shortstr(), arb_value(depth)), 0..6)
        .prop_map(FieldTable)
        .boxed()
}

/// Any basic properties.
pub(crate) fn arb_properties() -> BoxedStrategy<BasicProperties> {
    let s = || proptest::option::of(field::shortstr());
    (
        (
            s(),
            s(),
            proptest::option::of(arb_table(2)),
            proptest::option::of(any::<u8>()),
        ),
        (proptest::option::of(any::<u8>()), s(), s(), s(), s()),
        (proptest::option::of(any::<u64>()), s(), s(), s(), s()),
    )
        .prop_map(
            |(
                (content_type, content_encoding, headers, delivery_mode),
                (priority, correlation_id, reply_to, expiration, message_id),
                (timestamp, kind, user_id, app_id, cluster_id),
            )| BasicProperties {
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
            },
        )
        .boxed()
}

/// Any frame.
pub(crate) fn arb_frame() -> BoxedStrategy<Frame> {
    prop_oneof![
        (any::<u16>(), arb_method())
            .prop_map(|(channel, method)| Frame::Method { channel, method }),
        (any::<u16>(), any::<u16>(), any::<u64>(), arb_properties()).prop_map(
            |(channel, class_id, body_size, properties)| Frame::Header {
                channel,
                class_id,
                body_size,
                properties: Box::new(properties),
            }
        ),
        (any::<u16>(), vec(any::<u8>(), 0..200)).prop_map(|(channel, payload)| Frame::Body {
            channel,
            payload: Bytes::from(payload),
        }),
        any::<u16>().prop_map(|channel| Frame::Heartbeat { channel }),
    ]
    .boxed()
}
