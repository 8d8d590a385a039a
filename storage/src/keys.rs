//! Key layout. This is the single place that defines how keys look on disk.
//!
//! The database has exactly three keyspaces (fjall column families; they
//! share one journal and one batch is atomic across them). There are few on
//! purpose: every keyspace has its own memtable, and an idle memtable pins
//! journal files (fjall #288), so never one keyspace per queue.
//!
//! | keyspace | key                                  | value                              |
//! |----------|--------------------------------------|------------------------------------|
//! | `msgs`   | `queue: u64 BE ‖ seq: u64 BE` (16 B)  | message record (`format.rs`)       |
//! | `state`  | `b'f' ‖ queue: u64 BE` (9 B)          | ack floor: `u64 BE`                |
//! | `state`  | `b'n' ‖ queue: u64 BE` (9 B)          | next seq (max seq put + 1): `u64 BE` |
//! | `state`  | `b"c"` (1 B)                          | maintenance counters (`format.rs`) |
//! | `meta`   | caller's opaque key (1..=65535 B)     | caller's opaque value              |
//!
//! Big-endian integers make byte order equal numeric order, so one queue is
//! the contiguous range `msg_key(q, 0)..=msg_key(q, u64::MAX)` and a range
//! scan yields messages in seq order.
//!
//! **Write-once rule.** Each `msgs` key is written at most once in the life
//! of the database: never again after an ack, a `DeleteQueue` or a restart.
//! That is what allows acks to use weak (single-delete) tombstones. Why it
//! matters: when a compaction sees weak tombstone → value for a key, it drops
//! the pair *and every older version it has of that key*; an even older
//! value in a table outside that compaction then becomes visible again (an
//! acked message comes back). The store keeps a per-queue next seq (highest
//! seq ever put + 1, kept across `DeleteQueue`) so callers can always number
//! new messages from `Store::next_seq`. `state` and `meta` keys are
//! overwritten, so they are always deleted with strong tombstones.

/// Keyspace holding every message of every queue.
pub(crate) const MSGS: &str = "msgs";
/// Keyspace holding per-queue ack floors and the maintenance counters.
pub(crate) const STATE: &str = "state";
/// Keyspace holding the caller's opaque definitions.
pub(crate) const META: &str = "meta";
/// Keyspace holding replicated logs (one per Raft group): `log u64 BE ‖
/// index u64 BE` → entry. Unlike `msgs`, an index may be written again
/// (a follower's conflicting tail is truncated and rewritten), so removes
/// here are strong tombstones.
pub(crate) const LOGS: &str = "logs";

const LOG_FIRST_TAG: u8 = b'L';
const LOG_META_TAG: u8 = b'm';

/// `logs` key of entry `index` of `log`.
pub(crate) fn log_key(log: u64, index: u64) -> [u8; MSG_KEY_LEN] {
    msg_key(log, index)
}

/// `state` key of a log's first index (entries below were compacted away).
pub(crate) fn log_first_key(log: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LOG_FIRST_TAG;
    k[1..].copy_from_slice(&log.to_be_bytes());
    k
}

/// `state` key of one of a log's small records (hard state, snapshot meta).
pub(crate) fn log_meta_key(log: u64, tag: u8) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = LOG_META_TAG;
    k[1..9].copy_from_slice(&log.to_be_bytes());
    k[9] = tag;
    k
}

/// Length of a `msgs` key.
pub(crate) const MSG_KEY_LEN: usize = 16;

const FLOOR_TAG: u8 = b'f';
const NEXT_SEQ_TAG: u8 = b'n';

/// Key of the maintenance counters in `state`. One byte, so it cannot collide
/// with a floor key (9 bytes).
pub(crate) const COUNTERS_KEY: &[u8] = b"c";

/// `msgs` key of message `seq` of `queue`.
pub(crate) fn msg_key(queue: u64, seq: u64) -> [u8; MSG_KEY_LEN] {
    let mut k = [0u8; MSG_KEY_LEN];
    k[..8].copy_from_slice(&queue.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Splits a `msgs` key into `(queue, seq)`; `None` if it has the wrong length.
pub(crate) fn decode_msg_key(key: &[u8]) -> Option<(u64, u64)> {
    let key: &[u8; MSG_KEY_LEN] = key.try_into().ok()?;
    let (q, s) = key.split_at(8);
    Some((u64::from_be_bytes(q.try_into().ok()?), u64::from_be_bytes(s.try_into().ok()?)))
}

/// Inclusive key range of the messages of `queue` with seq >= `from`.
pub(crate) fn queue_range(queue: u64, from: u64) -> std::ops::RangeInclusive<[u8; MSG_KEY_LEN]> {
    msg_key(queue, from)..=msg_key(queue, u64::MAX)
}

/// `state` key of the ack floor of `queue`.
pub(crate) fn floor_key(queue: u64) -> [u8; 9] {
    tagged(FLOOR_TAG, queue)
}

/// `state` key of the next seq of `queue`.
pub(crate) fn next_seq_key(queue: u64) -> [u8; 9] {
    tagged(NEXT_SEQ_TAG, queue)
}

fn tagged(tag: u8, queue: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..].copy_from_slice(&queue.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Byte order of keys must equal numeric order of (queue, seq): range
        /// scans and the ack floor rely on it.
        #[test]
        fn msg_key_order_is_numeric_order(a in any::<(u64, u64)>(), b in any::<(u64, u64)>()) {
            prop_assert_eq!(msg_key(a.0, a.1).cmp(&msg_key(b.0, b.1)), a.cmp(&b));
        }

        #[test]
        fn msg_key_round_trips(q in any::<u64>(), s in any::<u64>()) {
            prop_assert_eq!(decode_msg_key(&msg_key(q, s)), Some((q, s)));
        }

        #[test]
        fn queue_range_contains_exactly_the_queue(q in any::<u64>(), from in any::<u64>(),
                                                  other in any::<(u64, u64)>()) {
            let r = queue_range(q, from);
            let inside = other.0 == q && other.1 >= from;
            prop_assert_eq!(r.contains(&msg_key(other.0, other.1)), inside);
        }
    }

    #[test]
    fn decode_rejects_wrong_length() {
        assert_eq!(decode_msg_key(&[0u8; 15]), None);
        assert_eq!(decode_msg_key(&[0u8; 17]), None);
    }
}
