//! Field tables and field values (the `table` argument type and the `headers`
//! message property), using the type tags RabbitMQ actually puts on the wire
//! (its errata to the 0-9-1 spec, e.g. `s` is a signed 16-bit integer and
//! `l` a signed 64-bit one).

use bytes::{BufMut, Bytes, BytesMut};
use nom::combinator::map;
use nom::number::complete::{be_f32, be_f64, be_i16, be_i32, be_i64, be_i8};
use nom::Parser;

use super::error::DecodeError;
use super::wire::{
    self, begin_u32_len, fail, label, long_slice, longstr, longstr_len, parse_all, patch_u32_len,
    put_longstr, put_shortstr, shortstr, shortstr_len, until_end, PResult,
};

/// Maximum nesting of tables/arrays inside a table accepted by the decoder.
/// Real clients nest two or three levels; the limit only exists so that
/// hostile input cannot exhaust the stack through recursion.
pub const MAX_DEPTH: usize = 64;

/// An AMQP `decimal-value`: `value / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Decimal {
    /// Number of decimal digits after the point.
    pub scale: u8,
    /// Unscaled value.
    pub value: u32,
}

/// One value in a [`FieldTable`] or field array. The wire type tag is noted
/// on each variant.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// `t`: boolean octet.
    Bool(bool),
    /// `b`: signed 8-bit.
    I8(i8),
    /// `B`: unsigned 8-bit.
    U8(u8),
    /// `s`: signed 16-bit.
    I16(i16),
    /// `u`: unsigned 16-bit.
    U16(u16),
    /// `I`: signed 32-bit.
    I32(i32),
    /// `i`: unsigned 32-bit.
    U32(u32),
    /// `l`: signed 64-bit.
    I64(i64),
    /// `f`: IEEE-754 single.
    F32(f32),
    /// `d`: IEEE-754 double.
    F64(f64),
    /// `D`: decimal (scale octet + unsigned 32-bit value).
    Decimal(Decimal),
    /// `S`: long string (arbitrary bytes, usually UTF-8).
    LongString(Bytes),
    /// `A`: field array.
    Array(Vec<FieldValue>),
    /// `T`: 64-bit POSIX timestamp.
    Timestamp(u64),
    /// `F`: nested field table.
    Table(FieldTable),
    /// `V`: no value.
    Void,
    /// `x`: byte array (RabbitMQ extension).
    ByteArray(Bytes),
}

impl FieldValue {
    /// The value as `i64` if it is any of the integer variants.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            FieldValue::I8(v) => Some(i64::from(v)),
            FieldValue::U8(v) => Some(i64::from(v)),
            FieldValue::I16(v) => Some(i64::from(v)),
            FieldValue::U16(v) => Some(i64::from(v)),
            FieldValue::I32(v) => Some(i64::from(v)),
            FieldValue::U32(v) => Some(i64::from(v)),
            FieldValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as `&str` if it is a long string holding valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::LongString(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The value as `bool` if it is a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            FieldValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as a nested table, if it is one.
    pub fn as_table(&self) -> Option<&FieldTable> {
        match self {
            FieldValue::Table(t) => Some(t),
            _ => None,
        }
    }

    /// Number of bytes [`FieldValue::encode`] writes (type tag included).
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            FieldValue::Bool(_) | FieldValue::I8(_) | FieldValue::U8(_) => 1,
            FieldValue::I16(_) | FieldValue::U16(_) => 2,
            FieldValue::I32(_) | FieldValue::U32(_) | FieldValue::F32(_) => 4,
            FieldValue::I64(_) | FieldValue::F64(_) | FieldValue::Timestamp(_) => 8,
            FieldValue::Decimal(_) => 5,
            FieldValue::LongString(b) | FieldValue::ByteArray(b) => longstr_len(b),
            FieldValue::Array(items) => {
                4 + items.iter().map(FieldValue::encoded_len).sum::<usize>()
            }
            FieldValue::Table(t) => t.encoded_len(),
            FieldValue::Void => 0,
        }
    }

    /// Writes the type tag followed by the value.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            FieldValue::Bool(v) => {
                out.put_u8(b't');
                out.put_u8(u8::from(*v));
            }
            FieldValue::I8(v) => {
                out.put_u8(b'b');
                out.put_i8(*v);
            }
            FieldValue::U8(v) => {
                out.put_u8(b'B');
                out.put_u8(*v);
            }
            FieldValue::I16(v) => {
                out.put_u8(b's');
                out.put_i16(*v);
            }
            FieldValue::U16(v) => {
                out.put_u8(b'u');
                out.put_u16(*v);
            }
            FieldValue::I32(v) => {
                out.put_u8(b'I');
                out.put_i32(*v);
            }
            FieldValue::U32(v) => {
                out.put_u8(b'i');
                out.put_u32(*v);
            }
            FieldValue::I64(v) => {
                out.put_u8(b'l');
                out.put_i64(*v);
            }
            FieldValue::F32(v) => {
                out.put_u8(b'f');
                out.put_f32(*v);
            }
            FieldValue::F64(v) => {
                out.put_u8(b'd');
                out.put_f64(*v);
            }
            FieldValue::Decimal(d) => {
                out.put_u8(b'D');
                out.put_u8(d.scale);
                out.put_u32(d.value);
            }
            FieldValue::LongString(b) => {
                out.put_u8(b'S');
                put_longstr(out, b);
            }
            FieldValue::Array(items) => {
                out.put_u8(b'A');
                let pos = begin_u32_len(out);
                for item in items {
                    item.encode(out);
                }
                patch_u32_len(out, pos);
            }
            FieldValue::Timestamp(v) => {
                out.put_u8(b'T');
                out.put_u64(*v);
            }
            FieldValue::Table(t) => {
                out.put_u8(b'F');
                t.encode(out);
            }
            FieldValue::Void => out.put_u8(b'V'),
            FieldValue::ByteArray(b) => {
                out.put_u8(b'x');
                put_longstr(out, b);
            }
        }
    }

    /// Parses one tagged value; `depth` is the nesting level of the
    /// enclosing table/array.
    fn parse(input: &[u8], depth: usize) -> PResult<'_, FieldValue> {
        const CTX: &str = "field value";
        let (input, tag) = wire::u8(CTX).parse(input)?;
        match tag {
            b't' => wire::u8(CTX).map(|v| FieldValue::Bool(v != 0)).parse(input),
            b'b' => label(CTX, be_i8).map(FieldValue::I8).parse(input),
            b'B' => wire::u8(CTX).map(FieldValue::U8).parse(input),
            b's' => label(CTX, be_i16).map(FieldValue::I16).parse(input),
            b'u' => wire::u16(CTX).map(FieldValue::U16).parse(input),
            b'I' => label(CTX, be_i32).map(FieldValue::I32).parse(input),
            b'i' => wire::u32(CTX).map(FieldValue::U32).parse(input),
            b'l' => label(CTX, be_i64).map(FieldValue::I64).parse(input),
            b'f' => label(CTX, be_f32).map(FieldValue::F32).parse(input),
            b'd' => label(CTX, be_f64).map(FieldValue::F64).parse(input),
            b'D' => (wire::u8(CTX), wire::u32(CTX))
                .map(|(scale, value)| FieldValue::Decimal(Decimal { scale, value }))
                .parse(input),
            b'S' => longstr(CTX).map(FieldValue::LongString).parse(input),
            b'A' => map(|i| parse_array(i, depth + 1), FieldValue::Array).parse(input),
            b'T' => wire::u64(CTX).map(FieldValue::Timestamp).parse(input),
            b'F' => map(|i| FieldTable::parse(i, depth + 1), FieldValue::Table).parse(input),
            b'V' => Ok((input, FieldValue::Void)),
            b'x' => longstr(CTX).map(FieldValue::ByteArray).parse(input),
            other => Err(fail(DecodeError::BadFieldType(other))),
        }
    }
}

/// Parses a field array (length prefix included) nested at `depth`.
fn parse_array(input: &[u8], depth: usize) -> PResult<'_, Vec<FieldValue>> {
    if depth > MAX_DEPTH {
        return Err(fail(DecodeError::TooDeep));
    }
    long_slice("field array")
        .and_then(until_end(|i| FieldValue::parse(i, depth)))
        .parse(input)
}

impl From<bool> for FieldValue {
    fn from(v: bool) -> Self {
        FieldValue::Bool(v)
    }
}

impl From<i64> for FieldValue {
    fn from(v: i64) -> Self {
        FieldValue::I64(v)
    }
}

impl From<i32> for FieldValue {
    fn from(v: i32) -> Self {
        FieldValue::I32(v)
    }
}

impl From<&str> for FieldValue {
    fn from(v: &str) -> Self {
        FieldValue::LongString(Bytes::copy_from_slice(v.as_bytes()))
    }
}

impl From<String> for FieldValue {
    fn from(v: String) -> Self {
        FieldValue::LongString(Bytes::from(v))
    }
}

impl From<FieldTable> for FieldValue {
    fn from(v: FieldTable) -> Self {
        FieldValue::Table(v)
    }
}

/// An ordered field table. Order is preserved on the wire; keys are short
/// strings (at most 255 bytes of UTF-8; longer keys are truncated on encode).
///
/// Decoding keeps duplicate keys as received; [`FieldTable::get`] returns the
/// first one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldTable(pub Vec<(String, FieldValue)>);

impl FieldTable {
    /// An empty table.
    pub fn new() -> Self {
        FieldTable(Vec::new())
    }

    /// The value stored under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Sets `key` to `value`, replacing an existing entry in place (keeping
    /// its position) or appending a new one.
    pub fn insert(&mut self, key: impl Into<String>, value: FieldValue) {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }

    /// Iterates over the entries in wire order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &FieldValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// True if the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Number of bytes [`FieldTable::encode`] writes (length prefix included).
    pub fn encoded_len(&self) -> usize {
        4 + self
            .0
            .iter()
            .map(|(k, v)| shortstr_len(k) + v.encoded_len())
            .sum::<usize>()
    }

    /// Writes the table: `u32` byte length, then `key type value` entries.
    pub fn encode(&self, out: &mut BytesMut) {
        let pos = begin_u32_len(out);
        for (key, value) in &self.0 {
            put_shortstr(out, key);
            value.encode(out);
        }
        patch_u32_len(out, pos);
    }

    /// Decodes a complete table encoding (length prefix included); the input
    /// must contain exactly one table.
    pub fn decode(input: &[u8]) -> Result<FieldTable, DecodeError> {
        parse_all("field table", |i| FieldTable::parse(i, 0), input)
    }

    /// Parses a table (length prefix included); `depth` is its nesting level.
    pub(crate) fn parse(input: &[u8], depth: usize) -> PResult<'_, FieldTable> {
        if depth > MAX_DEPTH {
            return Err(fail(DecodeError::TooDeep));
        }
        let entry = (shortstr("field table key"), |i| FieldValue::parse(i, depth));
        long_slice("field table")
            .and_then(until_end(entry))
            .map(FieldTable)
            .parse(input)
    }
}

impl<K: Into<String>> FromIterator<(K, FieldValue)> for FieldTable {
    fn from_iter<I: IntoIterator<Item = (K, FieldValue)>>(iter: I) -> Self {
        let mut table = FieldTable::new();
        for (k, v) in iter {
            table.insert(k, v);
        }
        table
    }
}

/// Encodes `table` (length prefix included) into `out`.
pub fn encode_table(table: &FieldTable, out: &mut BytesMut) {
    table.encode(out);
}

/// Decodes exactly one table (length prefix included) from `input`.
pub fn decode_table(input: &[u8]) -> Result<FieldTable, DecodeError> {
    FieldTable::decode(input)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use crate::amqp::arb::arb_table;
    use proptest::prelude::*;

    fn encode(t: &FieldTable) -> BytesMut {
        let mut out = BytesMut::new();
        t.encode(&mut out);
        out
    }

    proptest! {
        #[test]
        fn table_round_trip(t in arb_table(3)) {
            let bytes = encode(&t);
            prop_assert_eq!(bytes.len(), t.encoded_len());
            prop_assert_eq!(FieldTable::decode(&bytes)?, t);
        }

        #[test]
        fn table_decode_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = FieldTable::decode(&bytes);
        }

        #[test]
        fn table_decode_garbage_with_valid_length(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            // A correct length prefix gets the fuzzing past the first check.
            let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(&body);
            let _ = FieldTable::decode(&bytes);
        }

        #[test]
        fn table_strict_prefix_fails(t in arb_table(2)) {
            let bytes = encode(&t);
            for cut in 0..bytes.len() {
                prop_assert!(FieldTable::decode(&bytes[..cut]).is_err());
            }
        }
    }

    #[test]
    fn byte_exact_table() {
        let mut t = FieldTable::new();
        t.insert("a", FieldValue::Bool(true));
        t.insert("b", FieldValue::I16(-2));
        let bytes = encode(&t);
        assert_eq!(
            &bytes[..],
            &[0, 0, 0, 9, 1, b'a', b't', 1, 1, b'b', b's', 0xff, 0xfe]
        );
    }

    #[test]
    fn insert_replaces_in_place() {
        let mut t = FieldTable::new();
        t.insert("x", FieldValue::I8(1));
        t.insert("y", FieldValue::I8(2));
        t.insert("x", FieldValue::I8(3));
        assert_eq!(t.len(), 2);
        assert_eq!(t.get("x"), Some(&FieldValue::I8(3)));
        assert_eq!(t.iter().next().map(|(k, _)| k), Some("x"));
    }

    #[test]
    fn helpers() {
        assert_eq!(FieldValue::U32(7).as_i64(), Some(7));
        assert_eq!(FieldValue::I8(-7).as_i64(), Some(-7));
        assert_eq!(FieldValue::Timestamp(7).as_i64(), None);
        assert_eq!(FieldValue::from("hi").as_str(), Some("hi"));
        assert_eq!(
            FieldValue::LongString(Bytes::from_static(b"\xff")).as_str(),
            None
        );
        assert_eq!(FieldValue::Bool(true).as_bool(), Some(true));
        assert_eq!(FieldValue::Void.as_bool(), None);
    }

    #[test]
    fn unknown_tag_and_long_key() {
        // key "k", tag 'L' (not supported)
        let bytes = [0, 0, 0, 3, 1, b'k', b'L'];
        assert!(matches!(
            FieldTable::decode(&bytes),
            Err(DecodeError::BadFieldType(b'L'))
        ));

        let mut t = FieldTable::new();
        t.insert("é".repeat(200), FieldValue::Void);
        let decoded = FieldTable::decode(&encode(&t)).unwrap();
        let key = &decoded.0[0].0;
        assert_eq!(key.len(), 254, "truncated at a char boundary");
    }

    #[test]
    fn max_depth_is_accepted_deeper_is_not() {
        fn nested(levels: usize) -> FieldTable {
            let mut t = FieldTable::new();
            for _ in 0..levels {
                let mut outer = FieldTable::new();
                outer.insert("n", FieldValue::Table(t));
                t = outer;
            }
            t
        }
        assert!(FieldTable::decode(&encode(&nested(MAX_DEPTH))).is_ok());
        assert!(matches!(
            FieldTable::decode(&encode(&nested(MAX_DEPTH + 1))),
            Err(DecodeError::TooDeep)
        ));
    }
}
