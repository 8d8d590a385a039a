//! The ready messages of a queue by seq, packed for RAM: what the state
//! machine keeps per queued message is most of a node's memory with a
//! long queue (docs/performance.md, "Memory per queued message").
//!
//! A `BTreeMap<Seq, MsgMeta>` took about 105 bytes per message: 48 bytes
//! of metadata plus the map's nodes, which appends leave half full. Here a
//! message takes 32 bytes ([`Packed`]: seq, size, delivery count, expiry,
//! flags, priority) in chunks of up to [`CHUNK`] sorted entries, keyed by
//! their first seq. Appends (the common case) fill chunks completely;
//! an insert in the middle (a requeue) shifts at most one chunk and splits
//! it when full. Strict-ordering keys, which only strict queues have, live
//! in a map of their own.

use std::collections::BTreeMap;

use super::queue_sm::{MsgMeta, Seq};

/// Most entries in one chunk.
pub const CHUNK: usize = 64;

/// [`MsgMeta`] without the strict-ordering key, in 24 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Packed {
    size: u32,
    delivery_count: u32,
    /// Valid if `flags & EXPIRES`.
    expires_at: u64,
    flags: u8,
    priority: u8,
}

const PERSISTENT: u8 = 1;
const REDELIVERED: u8 = 2;
const EXPIRES: u8 = 4;

impl Packed {
    fn pack(meta: &MsgMeta) -> Self {
        let flag = |on: bool, bit: u8| if on { bit } else { 0 };
        Packed {
            size: meta.size,
            delivery_count: meta.delivery_count,
            expires_at: meta.expires_at.unwrap_or(0),
            flags: flag(meta.persistent, PERSISTENT)
                | flag(meta.redelivered, REDELIVERED)
                | flag(meta.expires_at.is_some(), EXPIRES),
            priority: meta.priority,
        }
    }

    fn unpack(&self, (order_ts, order_pub): (u64, u64)) -> MsgMeta {
        MsgMeta {
            size: self.size,
            persistent: self.flags & PERSISTENT != 0,
            redelivered: self.flags & REDELIVERED != 0,
            expires_at: (self.flags & EXPIRES != 0).then_some(self.expires_at),
            priority: self.priority,
            delivery_count: self.delivery_count,
            order_ts,
            order_pub,
        }
    }
}

/// Ready messages by seq.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReadyList {
    /// Sorted runs, keyed by their first seq; never empty.
    chunks: BTreeMap<Seq, Vec<(Seq, Packed)>>,
    len: usize,
    /// (order_ts, order_pub) of the messages whose key is not (0, 0).
    keys: BTreeMap<Seq, (u64, u64)>,
}

impl PartialEq for ReadyList {
    /// Same messages, however they are chunked.
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.keys == other.keys && self.iter().eq(other.iter())
    }
}

impl Eq for ReadyList {}

impl ReadyList {
    pub fn len(&self) -> usize {
        self.len
    }

    fn key_of(&self, seq: Seq) -> (u64, u64) {
        self.keys.get(&seq).copied().unwrap_or((0, 0))
    }

    /// The chunk that holds `seq` if anything does: the last one starting
    /// at or before it.
    fn chunk_of(&self, seq: Seq) -> Option<(&Seq, &Vec<(Seq, Packed)>)> {
        self.chunks.range(..=seq).next_back()
    }

    pub fn get(&self, seq: Seq) -> Option<MsgMeta> {
        let (_, chunk) = self.chunk_of(seq)?;
        let at = chunk.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        chunk.get(at).map(|(_, p)| p.unpack(self.key_of(seq)))
    }

    pub fn contains_key(&self, seq: Seq) -> bool {
        self.chunk_of(seq).is_some_and(|(_, chunk)| chunk.binary_search_by_key(&seq, |(s, _)| *s).is_ok())
    }

    /// Inserts or replaces; returns the message it replaced.
    pub fn insert(&mut self, seq: Seq, meta: MsgMeta) -> Option<MsgMeta> {
        let old_key = self.key_of(seq);
        let key = (meta.order_ts, meta.order_pub);
        if key == (0, 0) {
            self.keys.remove(&seq);
        } else {
            self.keys.insert(seq, key);
        }
        let packed = Packed::pack(&meta);
        // The chunk starting at or before `seq`, else the first one (which
        // then starts at `seq`).
        let start = match self.chunks.range(..=seq).next_back() {
            Some((start, _)) => *start,
            None => match self.chunks.first_key_value() {
                Some((first, _)) => {
                    let first = *first;
                    if let Some(chunk) = self.chunks.remove(&first) {
                        self.chunks.insert(seq, chunk);
                    }
                    seq
                }
                None => {
                    let mut chunk = Vec::with_capacity(CHUNK);
                    chunk.push((seq, packed));
                    self.chunks.insert(seq, chunk);
                    self.len += 1;
                    return None;
                }
            },
        };
        let is_last = self.chunks.last_key_value().is_some_and(|(last, _)| *last == start);
        let chunk = self.chunks.get_mut(&start)?;
        match chunk.binary_search_by_key(&seq, |(s, _)| *s) {
            Ok(at) => {
                let old = chunk.get_mut(at).map(|slot| std::mem::replace(&mut slot.1, packed));
                return old.map(|p| p.unpack(old_key));
            }
            Err(at) if at == chunk.len() && chunk.len() >= CHUNK && is_last => {
                // An append to a full last chunk starts a new one, so
                // appends leave every chunk full.
                let mut fresh = Vec::with_capacity(CHUNK);
                fresh.push((seq, packed));
                self.chunks.insert(seq, fresh);
            }
            Err(at) => {
                chunk.insert(at, (seq, packed));
                if chunk.len() > CHUNK {
                    let upper = chunk.split_off(chunk.len() / 2);
                    chunk.shrink_to(CHUNK);
                    if let Some(&(first, _)) = upper.first() {
                        let mut upper_chunk = Vec::with_capacity(CHUNK);
                        upper_chunk.extend(upper);
                        self.chunks.insert(first, upper_chunk);
                    }
                }
            }
        }
        self.len += 1;
        None
    }

    pub fn remove(&mut self, seq: Seq) -> Option<MsgMeta> {
        let (&start, _) = self.chunk_of(seq)?;
        let chunk = self.chunks.get_mut(&start)?;
        let at = chunk.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        let (_, packed) = chunk.remove(at);
        if chunk.is_empty() {
            self.chunks.remove(&start);
        } else {
            if chunk.len() < chunk.capacity() / 4 {
                chunk.shrink_to(chunk.len() * 2);
            }
            if at == 0 {
                // Keyed by its first seq again.
                if let Some(chunk) = self.chunks.remove(&start) {
                    if let Some(&(first, _)) = chunk.first() {
                        self.chunks.insert(first, chunk);
                    }
                }
            }
        }
        self.len -= 1;
        Some(packed.unpack(self.keys.remove(&seq).unwrap_or((0, 0))))
    }

    /// Sets every message's redelivered flag.
    pub fn mark_all_redelivered(&mut self) {
        for chunk in self.chunks.values_mut() {
            for (_, packed) in chunk.iter_mut() {
                packed.flags |= REDELIVERED;
            }
        }
    }

    /// The lowest seq.
    pub fn first(&self) -> Option<(Seq, MsgMeta)> {
        let (_, chunk) = self.chunks.first_key_value()?;
        chunk.first().map(|(seq, p)| (*seq, p.unpack(self.key_of(*seq))))
    }

    /// In seq order.
    pub fn iter(&self) -> impl Iterator<Item = (Seq, MsgMeta)> + '_ {
        self.chunks.values().flatten().map(|(seq, p)| (*seq, p.unpack(self.key_of(*seq))))
    }

    /// Removes everything, in seq order.
    pub fn take(&mut self) -> Vec<(Seq, MsgMeta)> {
        let all = self.iter().collect();
        *self = ReadyList::default();
        all
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn meta(n: u64) -> MsgMeta {
        MsgMeta {
            size: n as u32,
            persistent: n.is_multiple_of(2),
            redelivered: n.is_multiple_of(3),
            expires_at: (!n.is_multiple_of(5)).then_some(n * 7),
            priority: (n % 4) as u8,
            delivery_count: (n % 6) as u32,
            order_ts: if n.is_multiple_of(7) { n } else { 0 },
            order_pub: if n.is_multiple_of(7) { n + 1 } else { 0 },
        }
    }

    #[test]
    fn appends_fill_chunks() {
        let mut r = ReadyList::default();
        for seq in 0..10 * CHUNK as u64 {
            assert_eq!(r.insert(seq, meta(seq)), None);
        }
        assert_eq!(r.chunks.len(), 10);
        assert!(r.chunks.values().all(|c| c.len() == CHUNK && c.capacity() == CHUNK));
    }

    proptest! {
        /// Any sequence of inserts and removes gives what a BTreeMap gives.
        #[test]
        fn behaves_like_a_btreemap(ops in proptest::collection::vec((0u8..4, 0u64..400), 0..2000)) {
            let mut r = ReadyList::default();
            let mut model: BTreeMap<Seq, MsgMeta> = BTreeMap::new();
            for (op, seq) in ops {
                match op {
                    0 | 1 => prop_assert_eq!(r.insert(seq, meta(seq + u64::from(op))), model.insert(seq, meta(seq + u64::from(op)))),
                    2 => prop_assert_eq!(r.remove(seq), model.remove(&seq)),
                    _ => {
                        prop_assert_eq!(r.get(seq), model.get(&seq).copied());
                        prop_assert_eq!(r.contains_key(seq), model.contains_key(&seq));
                    }
                }
                prop_assert_eq!(r.len(), model.len());
            }
            prop_assert_eq!(r.first(), model.iter().next().map(|(s, m)| (*s, *m)));
            prop_assert!(r.iter().eq(model.iter().map(|(s, m)| (*s, *m))));
            for (start, chunk) in &r.chunks {
                prop_assert!(!chunk.is_empty() && chunk.len() <= CHUNK);
                prop_assert_eq!(chunk.first().map(|(s, _)| *s), Some(*start));
                prop_assert!(chunk.windows(2).all(|w| w[0].0 < w[1].0));
            }
            // Equality ignores chunking.
            let mut rebuilt = ReadyList::default();
            for (s, m) in model.iter() {
                rebuilt.insert(*s, *m);
            }
            prop_assert_eq!(&rebuilt, &r);
            let taken = r.take();
            prop_assert_eq!(taken, model.into_iter().collect::<Vec<_>>());
            prop_assert_eq!(r.len(), 0);
            prop_assert!(r.first().is_none());
        }
    }
}
