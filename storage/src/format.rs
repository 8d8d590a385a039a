//! Value formats. The single place that defines how values look on disk.
//!
//! Message record (`msgs` keyspace), version 1:
//!
//! ```text
//! +---------+-------+----------------------+
//! | version | flags | data (opaque bytes)  |
//! |  1 B=1  |  1 B  | rest of the value    |
//! +---------+-------+----------------------+
//! flags bit 0: persistent; bits 1..7 must be 0 in version 1
//! ```
//!
//! A reader that finds another version or unknown flag bits returns
//! `Error::Corrupt` instead of guessing: a newer node's data must not be
//! misread by an older binary.
//!
//! Ack floor (`state` keyspace, key `b'f' ‖ queue`) and next seq (key
//! `b'n' ‖ queue`): exactly 8 bytes, `u64 BE`.
//!
//! Maintenance counters (`state` keyspace, key `b"c"`): 1 version byte (=1),
//! then `live_estimate: u64 BE ‖ removes_since_compaction: u64 BE` (17 B).
//! They are rewritten in the same atomic batch as the ops they count, so they
//! survive restarts and stay consistent with the data.

use crate::error::Error;
use bytes::Bytes;

/// Current (and only) message record version.
pub(crate) const RECORD_V1: u8 = 1;
/// Bytes in front of the data in a record.
pub(crate) const RECORD_HEADER_LEN: usize = 2;
const FLAG_PERSISTENT: u8 = 0b0000_0001;

const COUNTERS_V1: u8 = 1;

/// One stored message: an opaque payload plus the flag recovery needs.
///
/// `persistent = false` records are kept on disk only while the process runs
/// (e.g. paged-out transient messages). After a restart they may still be
/// there; `Store::scan_queue` returns them with `persistent == false` and the
/// caller is expected to delete them (see docs/storage.md, "Recovery").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRecord {
    /// Whether the message must survive a restart.
    pub persistent: bool,
    /// The opaque payload (whatever the cluster layer serialised).
    pub data: Bytes,
}

/// Encodes a record into a fresh value buffer (one copy: header + data).
pub(crate) fn encode_record(rec: &MessageRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(RECORD_HEADER_LEN + rec.data.len());
    v.push(RECORD_V1);
    v.push(if rec.persistent { FLAG_PERSISTENT } else { 0 });
    v.extend_from_slice(&rec.data);
    v
}

/// Decodes a record; the payload is a zero-copy slice of `value`.
pub(crate) fn decode_record(key: &[u8], value: Bytes) -> Result<MessageRecord, Error> {
    let corrupt = |detail: String| Error::Corrupt { what: "message record", key: key.to_vec(), detail };
    let (version, flags) = match value.get(..RECORD_HEADER_LEN) {
        Some(&[v, f]) => (v, f),
        _ => return Err(corrupt(format!("value of {} bytes is shorter than the header", value.len()))),
    };
    if version != RECORD_V1 {
        return Err(corrupt(format!("unknown record version {version}")));
    }
    if flags & !FLAG_PERSISTENT != 0 {
        return Err(corrupt(format!("unknown flag bits {flags:#010b}")));
    }
    Ok(MessageRecord { persistent: flags & FLAG_PERSISTENT != 0, data: value.slice(RECORD_HEADER_LEN..) })
}

/// Encodes an ack floor or a next seq.
pub(crate) fn encode_u64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// Decodes an ack floor or a next seq (`what` names it in errors).
pub(crate) fn decode_u64(what: &'static str, key: &[u8], value: &[u8]) -> Result<u64, Error> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| Error::Corrupt {
        what,
        key: key.to_vec(),
        detail: format!("expected 8 bytes, found {}", value.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Persisted maintenance counters (see module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// Puts minus removes, clamped at 0. Approximate: a remove of a key that
    /// does not exist still counts.
    pub live_estimate: u64,
    /// Removes (acks, queue deletions) since the last major compaction started.
    pub removes_since_compaction: u64,
}

pub(crate) fn encode_counters(c: Counters) -> [u8; 17] {
    let mut v = [0u8; 17];
    v[0] = COUNTERS_V1;
    v[1..9].copy_from_slice(&c.live_estimate.to_be_bytes());
    v[9..].copy_from_slice(&c.removes_since_compaction.to_be_bytes());
    v
}

pub(crate) fn decode_counters(key: &[u8], value: &[u8]) -> Result<Counters, Error> {
    let corrupt = |detail: String| Error::Corrupt { what: "maintenance counters", key: key.to_vec(), detail };
    let v: &[u8; 17] = value.try_into().map_err(|_| corrupt(format!("expected 17 bytes, found {}", value.len())))?;
    if v[0] != COUNTERS_V1 {
        return Err(corrupt(format!("unknown counters version {}", v[0])));
    }
    let (live, removes) = v[1..].split_at(8);
    let to_u64 = |b: &[u8]| b.try_into().map(u64::from_be_bytes).map_err(|_| corrupt("bad length".into()));
    Ok(Counters { live_estimate: to_u64(live)?, removes_since_compaction: to_u64(removes)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() -> Result<(), Error> {
        for persistent in [true, false] {
            let rec = MessageRecord { persistent, data: Bytes::from_static(b"hello") };
            assert_eq!(decode_record(b"k", Bytes::from(encode_record(&rec)))?, rec);
        }
        let empty = MessageRecord { persistent: true, data: Bytes::new() };
        assert_eq!(decode_record(b"k", Bytes::from(encode_record(&empty)))?, empty);
        Ok(())
    }

    #[test]
    fn record_rejects_unknown_version_flags_and_short_values() {
        for bad in [&[2u8, 1, 0][..], &[1, 0b10], &[1], &[]] {
            let r = decode_record(b"k", Bytes::copy_from_slice(bad));
            assert!(matches!(r, Err(Error::Corrupt { what: "message record", .. })), "{bad:?} -> {r:?}");
        }
    }

    #[test]
    fn floor_and_counters_round_trip() -> Result<(), Error> {
        assert_eq!(decode_u64("ack floor", b"f", &encode_u64(u64::MAX - 3))?, u64::MAX - 3);
        assert!(decode_u64("ack floor", b"f", &[1, 2, 3]).is_err());
        let c = Counters { live_estimate: 7, removes_since_compaction: 1 << 40 };
        assert_eq!(decode_counters(b"c", &encode_counters(c))?, c);
        assert!(decode_counters(b"c", &[9; 17]).is_err());
        Ok(())
    }
}
