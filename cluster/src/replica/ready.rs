//! The ready messages of a queue by seq, packed for RAM: what the state
//! machine keeps per queued message is most of a node's memory with a
//! long queue (docs/performance.md, "Memory per queued message").
//!
//! A `BTreeMap<Seq, MsgMeta>` took about 105 bytes per message: 48 bytes
//! of metadata plus the map's nodes, which appends leave half full. Here a
//! message takes 12 bytes (a [`Slot`]: its seq as an offset from its
//! chunk's base, size, delivery count, flags, priority), 20 when it
//! expires, in chunks of up to [`CHUNK`] sorted slots keyed by their base.
//! Appends (the common case) fill chunks completely; an insert in the
//! middle (a requeue) shifts at most one chunk and splits it when full.
//! What rarely differs from zero lives in maps of their own: strict-ordering
//! keys (only strict queues have them) and delivery counts too big for a
//! slot.

use std::collections::BTreeMap;

use super::queue_sm::{MsgMeta, Seq};

/// Most entries in one chunk.
pub const CHUNK: usize = 64;

/// [`MsgMeta`] without its expiry, strict-ordering key and seq's high
/// bits, in 12 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    /// The seq minus its chunk's base.
    offset: u32,
    size: u32,
    /// The delivery count, or [`BIG_COUNT`]: the count is in
    /// [`ReadyList::counts`].
    count: u16,
    flags: u8,
    priority: u8,
}

const PERSISTENT: u8 = 1;
const REDELIVERED: u8 = 2;
const EXPIRES: u8 = 4;
const BIG_COUNT: u16 = u16::MAX;

/// Sorted slots. Every seq in a chunk is at least its base (its key in
/// [`ReadyList::chunks`]) and above every seq of the chunk before it, so
/// the chunk of a seq is the last one whose base is at or below it.
#[derive(Clone, Debug, Default)]
struct Chunk {
    slots: Vec<Slot>,
    /// The expiry of each slot (ms) when any of them expires (0 for one
    /// that does not); empty when none does.
    expires: Vec<u64>,
}

impl Chunk {
    fn new(slot: Slot, expires_at: Option<u64>) -> Self {
        let mut slots = Vec::with_capacity(CHUNK);
        slots.push(slot);
        let expires = match expires_at {
            Some(at) => {
                let mut expires = Vec::with_capacity(CHUNK);
                expires.push(at);
                expires
            }
            None => Vec::new(),
        };
        Chunk { slots, expires }
    }

    fn find(&self, offset: u32) -> Result<usize, usize> {
        self.slots.binary_search_by_key(&offset, |s| s.offset)
    }

    fn expires_at(&self, at: usize) -> u64 {
        self.expires.get(at).copied().unwrap_or(0)
    }

    fn set(&mut self, at: usize, slot: Slot, expires_at: Option<u64>) {
        if let Some(s) = self.slots.get_mut(at) {
            *s = slot;
        }
        match expires_at {
            Some(t) if self.expires.is_empty() => {
                self.expires = vec![0; self.slots.len()];
                if let Some(e) = self.expires.get_mut(at) {
                    *e = t;
                }
            }
            _ => {
                if let Some(e) = self.expires.get_mut(at) {
                    *e = expires_at.unwrap_or(0);
                }
            }
        }
    }

    fn insert(&mut self, at: usize, slot: Slot, expires_at: Option<u64>) {
        if expires_at.is_some() && self.expires.is_empty() {
            self.expires = vec![0; self.slots.len()];
        }
        self.slots.insert(at, slot);
        if !self.expires.is_empty() {
            self.expires.insert(at, expires_at.unwrap_or(0));
        }
    }

    fn remove(&mut self, at: usize) -> (Slot, u64) {
        let slot = self.slots.remove(at);
        let expires_at = if self.expires.is_empty() { 0 } else { self.expires.remove(at) };
        if self.slots.len() < self.slots.capacity() / 4 {
            self.slots.shrink_to(self.slots.len() * 2);
            self.expires.shrink_to(self.expires.len() * 2);
        }
        (slot, expires_at)
    }

    /// The slots from `at` on, as a chunk of their own based at the first
    /// of them (whose seq is `old base + its offset`).
    fn split_off(&mut self, at: usize) -> (u32, Chunk) {
        let mut slots = Vec::with_capacity(CHUNK);
        slots.extend(self.slots.drain(at..));
        let shift = slots.first().map_or(0, |s| s.offset);
        for s in &mut slots {
            s.offset -= shift;
        }
        let expires = if self.expires.is_empty() {
            Vec::new()
        } else {
            let mut expires = Vec::with_capacity(CHUNK);
            expires.extend(self.expires.drain(at..));
            expires
        };
        self.slots.shrink_to(CHUNK);
        self.expires.shrink_to(CHUNK);
        (shift, Chunk { slots, expires })
    }

    /// Room below the first slot: the base can go down by this much.
    fn headroom(&self) -> u32 {
        u32::MAX - self.slots.last().map_or(0, |s| s.offset)
    }
}

/// Ready messages by seq.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReadyList {
    /// Sorted runs keyed by their base (see [`Chunk`]); never empty.
    chunks: BTreeMap<Seq, Chunk>,
    len: usize,
    /// (order_ts, order_pub) of the messages whose key is not (0, 0).
    keys: BTreeMap<Seq, (u64, u64)>,
    /// Delivery counts of [`BIG_COUNT`] and more.
    counts: BTreeMap<Seq, u32>,
}

impl PartialEq for ReadyList {
    /// Same messages, however they are chunked.
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for ReadyList {}

fn slot(meta: &MsgMeta, offset: u32) -> Slot {
    let flag = |on: bool, bit: u8| if on { bit } else { 0 };
    Slot {
        offset,
        size: meta.size,
        count: u16::try_from(meta.delivery_count).unwrap_or(BIG_COUNT).min(BIG_COUNT),
        flags: flag(meta.persistent, PERSISTENT)
            | flag(meta.redelivered, REDELIVERED)
            | flag(meta.expires_at.is_some(), EXPIRES),
        priority: meta.priority,
    }
}

impl ReadyList {
    pub fn len(&self) -> usize {
        self.len
    }

    fn unpack(&self, seq: Seq, slot: &Slot, expires_at: u64) -> MsgMeta {
        let (order_ts, order_pub) = self.keys.get(&seq).copied().unwrap_or((0, 0));
        let delivery_count = match slot.count {
            BIG_COUNT => self.counts.get(&seq).copied().unwrap_or(u32::from(BIG_COUNT)),
            count => u32::from(count),
        };
        MsgMeta {
            size: slot.size,
            persistent: slot.flags & PERSISTENT != 0,
            redelivered: slot.flags & REDELIVERED != 0,
            expires_at: (slot.flags & EXPIRES != 0).then_some(expires_at),
            priority: slot.priority,
            delivery_count,
            order_ts,
            order_pub,
        }
    }

    /// The base of the chunk holding `seq` and its index there.
    fn position(&self, seq: Seq) -> Option<(Seq, usize)> {
        let (base, chunk) = self.chunks.range(..=seq).next_back()?;
        let offset = u32::try_from(seq - base).ok()?;
        chunk.find(offset).ok().map(|at| (*base, at))
    }

    pub fn get(&self, seq: Seq) -> Option<MsgMeta> {
        let (base, at) = self.position(seq)?;
        let chunk = self.chunks.get(&base)?;
        chunk.slots.get(at).map(|slot| self.unpack(seq, slot, chunk.expires_at(at)))
    }

    pub fn contains_key(&self, seq: Seq) -> bool {
        self.position(seq).is_some()
    }

    /// Keeps what does not fit a slot in the side maps.
    fn note_side(&mut self, seq: Seq, meta: &MsgMeta) {
        if (meta.order_ts, meta.order_pub) == (0, 0) {
            self.keys.remove(&seq);
        } else {
            self.keys.insert(seq, (meta.order_ts, meta.order_pub));
        }
        if meta.delivery_count >= u32::from(BIG_COUNT) {
            self.counts.insert(seq, meta.delivery_count);
        } else {
            self.counts.remove(&seq);
        }
    }

    /// Inserts or replaces; returns the message it replaced.
    pub fn insert(&mut self, seq: Seq, meta: MsgMeta) -> Option<MsgMeta> {
        // An append (the common case: above every seq) into a last chunk
        // with room needs neither a search nor a shift.
        if let Some(mut last) = self.chunks.last_entry() {
            let base = *last.key();
            let chunk = last.get_mut();
            let above = chunk.slots.last().is_some_and(|top| seq > base + u64::from(top.offset));
            let offset = if above && chunk.slots.len() < CHUNK { u32::try_from(seq - base).ok() } else { None };
            if let Some(offset) = offset {
                let at = chunk.slots.len();
                chunk.insert(at, slot(&meta, offset), meta.expires_at);
                self.note_side(seq, &meta);
                self.len += 1;
                return None;
            }
        }
        if let Some((base, at)) = self.position(seq) {
            let old = self.get(seq);
            self.note_side(seq, &meta);
            if let Some(chunk) = self.chunks.get_mut(&base) {
                // `position` found it, so the offset fits.
                chunk.set(at, slot(&meta, (seq - base) as u32), meta.expires_at);
            }
            return old;
        }
        self.note_side(seq, &meta);
        self.len += 1;
        let last = self.chunks.last_key_value().map(|(last, _)| *last);
        let Some((&base, chunk)) = self.chunks.range_mut(..=seq).next_back() else {
            // Below every chunk: the first one takes it if its base can go
            // down that far.
            if let Some(entry) = self.chunks.first_entry() {
                let shift = entry.key() - seq;
                if shift <= u64::from(entry.get().headroom()) {
                    let mut chunk = entry.remove();
                    for s in &mut chunk.slots {
                        s.offset += shift as u32;
                    }
                    chunk.insert(0, slot(&meta, 0), meta.expires_at);
                    self.put(seq, chunk);
                    return None;
                }
            }
            self.chunks.insert(seq, Chunk::new(slot(&meta, 0), meta.expires_at));
            return None;
        };
        let offset = u32::try_from(seq - base).ok();
        let at = offset.map(|offset| chunk.find(offset).unwrap_or_else(|at| at));
        match (offset, at) {
            (Some(offset), Some(at)) if !(at >= CHUNK && last == Some(base)) => {
                chunk.insert(at, slot(&meta, offset), meta.expires_at);
                if chunk.slots.len() > CHUNK {
                    let (shift, upper) = chunk.split_off(chunk.slots.len() / 2);
                    self.chunks.insert(base + u64::from(shift), upper);
                }
            }
            // An append to a full last chunk starts a new one, so appends
            // leave every chunk full; a seq too far above its chunk's base
            // for an offset also gets a chunk of its own (the next chunk's
            // base is above it).
            _ => {
                self.chunks.insert(seq, Chunk::new(slot(&meta, 0), meta.expires_at));
            }
        }
        None
    }

    /// Puts `chunk` at `base`, split in two if it grew over [`CHUNK`].
    fn put(&mut self, base: Seq, mut chunk: Chunk) {
        if chunk.slots.len() > CHUNK {
            let (shift, upper) = chunk.split_off(chunk.slots.len() / 2);
            self.chunks.insert(base + u64::from(shift), upper);
        }
        self.chunks.insert(base, chunk);
    }

    pub fn remove(&mut self, seq: Seq) -> Option<MsgMeta> {
        let (base, at) = self.position(seq)?;
        let chunk = self.chunks.get_mut(&base)?;
        let (slot, expires_at) = chunk.remove(at);
        if chunk.slots.is_empty() {
            self.chunks.remove(&base);
        }
        self.len -= 1;
        let meta = self.unpack(seq, &slot, expires_at);
        self.keys.remove(&seq);
        self.counts.remove(&seq);
        Some(meta)
    }

    /// Sets every message's redelivered flag.
    pub fn mark_all_redelivered(&mut self) {
        for chunk in self.chunks.values_mut() {
            for slot in chunk.slots.iter_mut() {
                slot.flags |= REDELIVERED;
            }
        }
    }

    /// The lowest seq.
    pub fn first(&self) -> Option<(Seq, MsgMeta)> {
        let (base, chunk) = self.chunks.first_key_value()?;
        let slot = chunk.slots.first()?;
        let seq = base + u64::from(slot.offset);
        Some((seq, self.unpack(seq, slot, chunk.expires_at(0))))
    }

    /// In seq order.
    pub fn iter(&self) -> impl Iterator<Item = (Seq, MsgMeta)> + '_ {
        self.chunks.iter().flat_map(move |(base, chunk)| {
            chunk.slots.iter().enumerate().map(move |(at, slot)| {
                let seq = base + u64::from(slot.offset);
                (seq, self.unpack(seq, slot, chunk.expires_at(at)))
            })
        })
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
            // Now and then too big for a slot.
            delivery_count: if n.is_multiple_of(11) { u32::from(BIG_COUNT) + (n % 3) as u32 } else { (n % 6) as u32 },
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
        assert!(r.chunks.values().all(|c| c.slots.len() == CHUNK && c.slots.capacity() == CHUNK));
    }

    #[test]
    fn a_slot_is_12_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 12);
    }

    /// Applies `ops` to a `ReadyList` and a `BTreeMap` side by side; seqs
    /// are `seq * spread`, so a large spread makes seqs too far apart for
    /// one chunk's offsets.
    fn check_against_btreemap(ops: Vec<(u8, u64)>, spread: u64) -> Result<(), TestCaseError> {
        let mut r = ReadyList::default();
        let mut model: BTreeMap<Seq, MsgMeta> = BTreeMap::new();
        for (op, n) in ops {
            let seq = n * spread;
            match op {
                0 | 1 => prop_assert_eq!(r.insert(seq, meta(n + u64::from(op))), model.insert(seq, meta(n + u64::from(op)))),
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
        let mut below = None;
        for (base, chunk) in &r.chunks {
            prop_assert!(!chunk.slots.is_empty() && chunk.slots.len() <= CHUNK);
            prop_assert!(chunk.expires.is_empty() || chunk.expires.len() == chunk.slots.len());
            prop_assert!(chunk.slots.windows(2).all(|w| w[0].offset < w[1].offset));
            // Every seq of a chunk is above the chunk before it's.
            prop_assert!(below.is_none_or(|b| b < *base));
            below = chunk.slots.last().map(|s| base + u64::from(s.offset));
        }
        prop_assert_eq!(r.keys.len(), model.values().filter(|m| (m.order_ts, m.order_pub) != (0, 0)).count());
        prop_assert_eq!(r.counts.len(), model.values().filter(|m| m.delivery_count >= u32::from(BIG_COUNT)).count());
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
        Ok(())
    }

    proptest! {
        /// Any sequence of inserts and removes gives what a BTreeMap gives.
        #[test]
        fn behaves_like_a_btreemap(ops in proptest::collection::vec((0u8..4, 0u64..400), 0..2000)) {
            check_against_btreemap(ops, 1)?;
        }

        /// The same with seqs 2^27 apart: up to 32 of them fit one chunk's
        /// offsets (u32), more do not.
        #[test]
        fn behaves_like_a_btreemap_with_sparse_seqs(ops in proptest::collection::vec((0u8..4, 0u64..40), 0..400)) {
            check_against_btreemap(ops, 1 << 27)?;
        }
    }
}
