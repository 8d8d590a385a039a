//! What a queue's Raft log and checkpoints hold, and where each live
//! message's body is: the entry encoding, [`Batches`] (seq → log entry),
//! the [`BodyCache`] of recent entries and the [`Checkpoint`] record.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes};
use serde::{Deserialize, Serialize};

use crate::replica::queue_sm::{self, Command, Seq};
use crate::Error;

/// Version byte in front of every log entry (1 was the first cut's
/// postcard `{cmd, bodies}`; 2 had no clock in `Enqueue`, `Checkout`
/// and `Get` and no TTL per message: logs of either are not readable any
/// more).
/// Version byte in front of a log entry (3: messages without priority,
/// not readable any more).
const ENTRY_VERSION: u8 = 5;

/// Version byte in front of a [`Checkpoint`] (1: messages without an
/// expiry; 2: without priority and delivery count; 4: without the
/// strict-ordering publisher; none readable any more).
const CHECKPOINT_VERSION: u8 = 5;

/// Encodes one log entry: the commands, then the bodies (message records)
/// of its `Enqueue` commands, in order, so that a body can be sliced out of
/// the entry without decoding anything else:
///
/// `2 ‖ u32 LE len ‖ postcard(Vec<Command>) ‖ u32 LE n ‖ n × u32 LE end
/// offset ‖ bodies`.
///
/// Each body (message record) comes in parts ([`crate::record::encode_parts`])
/// that are written one after the other.
pub(crate) fn encode_entry(cmds: &[Command], bodies: &[[Bytes; 2]]) -> Result<Vec<u8>, Error> {
    let cmd_bytes = postcard::to_stdvec(cmds).map_err(|e| Error::Corrupt(format!("encoding a log entry: {e}")))?;
    let len = |parts: &[Bytes; 2]| parts.iter().map(Bytes::len).sum::<usize>();
    let body_len: usize = bodies.iter().map(len).sum();
    // Built in the Vec raft takes: every body is copied once, here.
    let mut out = Vec::with_capacity(1 + 4 + cmd_bytes.len() + 4 + 4 * bodies.len() + body_len);
    out.put_u8(ENTRY_VERSION);
    out.put_u32_le(u32_of(cmd_bytes.len())?);
    out.put_slice(&cmd_bytes);
    out.put_u32_le(u32_of(bodies.len())?);
    let mut end = 0usize;
    for parts in bodies {
        end += len(parts);
        out.put_u32_le(u32_of(end)?);
    }
    for part in bodies.iter().flatten() {
        out.put_slice(part);
    }
    Ok(out)
}

fn u32_of(n: usize) -> Result<u32, Error> {
    u32::try_from(n).map_err(|_| Error::Corrupt("log entry too large".to_owned()))
}

fn read_u32(data: &[u8], at: usize) -> Option<usize> {
    let bytes: [u8; 4] = data.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(bytes)).ok()
}

/// Where the parts of an encoded entry are.
struct Layout {
    cmds: std::ops::Range<usize>,
    count: usize,
    /// Offset of the end-offset table.
    table: usize,
    /// Offset of the first body.
    bodies: usize,
}

fn layout(index: u64, data: &[u8]) -> Result<Layout, Error> {
    let corrupt = |what: &str| Error::Corrupt(format!("queue log entry {index}: {what}"));
    if data.first() != Some(&ENTRY_VERSION) {
        return Err(corrupt("unknown version"));
    }
    let cmd_len = read_u32(data, 1).ok_or_else(|| corrupt("truncated"))?;
    let cmds = 5..5usize.checked_add(cmd_len).ok_or_else(|| corrupt("truncated"))?;
    let count = read_u32(data, cmds.end).ok_or_else(|| corrupt("truncated"))?;
    let table = cmds.end + 4;
    let bodies = count.checked_mul(4).and_then(|n| n.checked_add(table)).ok_or_else(|| corrupt("truncated"))?;
    if bodies > data.len() {
        return Err(corrupt("truncated body table"));
    }
    Ok(Layout { cmds, count, table, bodies })
}

/// The commands of an entry.
pub(crate) fn decode_commands(index: u64, data: &[u8]) -> Result<Vec<Command>, Error> {
    let layout = layout(index, data)?;
    let cmds = data.get(layout.cmds).ok_or_else(|| Error::Corrupt(format!("queue log entry {index}: truncated")))?;
    postcard::from_bytes(cmds).map_err(|e| Error::Corrupt(format!("queue log entry {index}: {e}")))
}

/// Body `position` of an entry, sliced out of `data` without copying.
pub(crate) fn entry_body(index: u64, data: &Bytes, position: u32) -> Result<Bytes, Error> {
    let layout = layout(index, data)?;
    let corrupt = || Error::Corrupt(format!("queue log entry {index}: no body {position}"));
    let position = usize::try_from(position).map_err(|_| corrupt())?;
    if position >= layout.count {
        return Err(corrupt());
    }
    let start = if position == 0 { 0 } else { read_u32(data, layout.table + 4 * (position - 1)).ok_or_else(corrupt)? };
    let end = read_u32(data, layout.table + 4 * position).ok_or_else(corrupt)?;
    let (start, end) = (layout.bodies + start, layout.bodies + end);
    if start > end || end > data.len() {
        return Err(corrupt());
    }
    Ok(data.slice(start..end))
}

/// The seqs one `Enqueue` command assigned, and where their bodies are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Batch {
    /// Log index of the entry carrying the bodies.
    pub index: u64,
    /// Seqs `first .. first + count` (the key in [`Batches`] is `first`).
    pub count: u32,
    /// Body position (in the entry) of the first seq.
    pub first_body: u32,
    /// Body position of each seq, only when a duplicate publish left a gap.
    pub positions: Option<Box<[u32]>>,
    /// Seqs of the batch still live (ready or held).
    pub live: u32,
    /// The leader's clock when it proposed the entry (ms since the epoch,
    /// the `Enqueue`'s `now_ms`), for the publish-to-deliver latency.
    /// Not in checkpoints: 0 (unknown) after a restart.
    #[serde(skip)]
    pub enqueued_ms: u64,
}

/// Where the body of every live message is: one [`Batch`] per `Enqueue`
/// that still has a live message, by its first seq. Seqs grow with the log
/// index, so the first batch holds the oldest entry still needed.
/// Derived from applied entries only, hence identical on every replica.
///
/// A long queue has a batch per few messages, so they are kept in a sorted
/// deque (56 bytes each; a `BTreeMap` took about 130): new batches come at
/// the back, and one whose messages are all gone stays, dead, until the
/// batches before it went too, or until the dead ones outnumber the live.
#[derive(Clone, Debug, Default)]
pub(crate) struct Batches {
    /// Increasing first seq; the front one, if any, is live.
    list: VecDeque<(Seq, Batch)>,
    /// Batches with a live message.
    live: usize,
}

/// Serializes as the `Vec<(Seq, Batch)>` of the live batches that
/// [`Batches::from_vec`] takes, without building it.
impl Serialize for Batches {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.live))?;
        for entry in self.list.iter().filter(|(_, b)| b.live > 0) {
            seq.serialize_element(entry)?;
        }
        seq.end()
    }
}

impl Batches {
    pub fn from_vec(mut batches: Vec<(Seq, Batch)>) -> Self {
        batches.retain(|(_, b)| b.live > 0);
        batches.sort_by_key(|(first, _)| *first);
        Batches { live: batches.len(), list: batches.into() }
    }

    /// Batches with a live message.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn clear(&mut self) {
        self.list.clear();
        self.live = 0;
    }

    /// The batch that would hold `seq`: the last one starting at or before
    /// it.
    fn find(&self, seq: Seq) -> Option<usize> {
        self.list.partition_point(|(first, _)| *first <= seq).checked_sub(1)
    }

    /// Records the seqs an `Enqueue` (stamped `now_ms`) assigned; `seqs[i]`
    /// is the seq of the command's message `i`, whose body is at
    /// `first_body + i`.
    pub fn enqueued(&mut self, index: u64, first_body: u32, seqs: &[Option<Seq>], now_ms: u64) {
        let assigned: Vec<(Seq, u32)> = seqs
            .iter()
            .zip(first_body..)
            .filter_map(|(seq, position)| seq.map(|seq| (seq, position)))
            .collect();
        let Some(&(first, _)) = assigned.first() else { return };
        let count = u32::try_from(assigned.len()).unwrap_or(u32::MAX);
        let gaps = assigned.len() != seqs.len();
        let positions = gaps.then(|| assigned.iter().map(|(_, p)| *p).collect());
        let first_body = assigned.first().map_or(first_body, |(_, p)| *p);
        let batch = Batch { index, count, first_body, positions, live: count, enqueued_ms: now_ms };
        // Always at the back, as seqs only grow; kept sorted whatever.
        let at = self.list.partition_point(|(f, _)| *f < first);
        match self.list.get_mut(at) {
            Some((f, old)) if *f == first => {
                if old.live == 0 {
                    self.live += 1;
                }
                *old = batch;
            }
            _ => {
                self.list.insert(at, (first, batch));
                self.live += 1;
            }
        }
    }

    /// The live batch holding `seq` and the seq's offset in it.
    fn holding(&self, seq: Seq) -> Option<(&Batch, u32)> {
        let (first, batch) = self.list.get(self.find(seq)?)?;
        let offset = seq.checked_sub(*first)?;
        if offset >= u64::from(batch.count) || batch.live == 0 {
            return None;
        }
        Some((batch, u32::try_from(offset).ok()?))
    }

    /// Entry index and body position of a live seq.
    pub fn locate(&self, seq: Seq) -> Option<(u64, u32)> {
        let (batch, offset) = self.holding(seq)?;
        let position = match &batch.positions {
            Some(p) => *p.get(usize::try_from(offset).ok()?)?,
            None => batch.first_body.checked_add(offset)?,
        };
        Some((batch.index, position))
    }

    /// When the `Enqueue` of a live seq was proposed (ms since the epoch;
    /// 0: unknown).
    pub fn enqueued_ms(&self, seq: Seq) -> u64 {
        self.holding(seq).map_or(0, |(b, _)| b.enqueued_ms)
    }

    /// A message is gone for good.
    pub fn removed(&mut self, seq: Seq) {
        let Some(at) = self.find(seq) else { return };
        let Some((first, batch)) = self.list.get_mut(at) else { return };
        if batch.live == 0 || seq.checked_sub(*first).is_none_or(|offset| offset >= u64::from(batch.count)) {
            return;
        }
        batch.live -= 1;
        if batch.live > 0 {
            return;
        }
        self.live -= 1;
        while self.list.front().is_some_and(|(_, b)| b.live == 0) {
            self.list.pop_front();
        }
        let dead = self.list.len() - self.live;
        if dead > self.live.max(64) {
            self.list.retain(|(_, b)| b.live > 0);
            if self.list.capacity() > 4 * self.list.len().max(64) {
                self.list.shrink_to(2 * self.list.len());
            }
        }
    }

    /// The log index of the oldest entry holding a live message.
    pub fn oldest_index(&self) -> Option<u64> {
        self.list.front().map(|(_, b)| b.index)
    }
}

/// Recently applied (or read back) entries that carry bodies, by log
/// index, within a byte budget; the oldest go first. A consumer that keeps
/// up reads every body from here. An entry read back from the log (a
/// consumer behind) is kept in a slot of its own, so reading a big batch
/// sequentially reads it from disk once.
#[derive(Debug)]
pub(crate) struct BodyCache {
    entries: BTreeMap<u64, Bytes>,
    bytes: usize,
    limit: usize,
    read_back: Option<(u64, Bytes)>,
    /// The node's budget over all its queues' caches (`entries` only).
    budget: Option<Arc<CacheBudget>>,
}

/// Bytes of body cache shared by all the queues of a node: with many busy
/// queues, each queue's own limit times their number would be far too much
/// RAM. A queue caches an entry only while the node's total allows it,
/// evicting its own oldest entries first.
#[derive(Debug)]
pub struct CacheBudget {
    used: AtomicUsize,
    limit: usize,
}

impl CacheBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(CacheBudget { used: AtomicUsize::new(0), limit })
    }

    /// Bytes cached now over all queues.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        let _ = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| Some(used.saturating_sub(n)));
    }
}

impl Drop for BodyCache {
    fn drop(&mut self) {
        self.give(self.bytes);
    }
}

impl BodyCache {
    pub fn new(limit: usize, budget: Option<Arc<CacheBudget>>) -> Self {
        BodyCache { entries: BTreeMap::new(), bytes: 0, limit, read_back: None, budget }
    }

    fn give(&self, n: usize) {
        if let Some(budget) = &self.budget {
            budget.give(n);
        }
    }

    /// Drops the oldest entry; false if there is none.
    fn evict_oldest(&mut self) -> bool {
        let Some((_, old)) = self.entries.pop_first() else { return false };
        self.bytes -= old.len();
        self.give(old.len());
        true
    }

    pub fn get(&self, index: u64) -> Option<Bytes> {
        if let Some((i, data)) = &self.read_back {
            if *i == index {
                return Some(data.clone());
            }
        }
        self.entries.get(&index).cloned()
    }

    /// An entry just applied.
    pub fn insert(&mut self, index: u64, data: Bytes) {
        if data.len() > self.limit {
            return;
        }
        if let Some(old) = self.entries.remove(&index) {
            self.bytes -= old.len();
            self.give(old.len());
        }
        while self.bytes + data.len() > self.limit && self.evict_oldest() {}
        if let Some(budget) = self.budget.clone() {
            while !budget.take(data.len()) {
                if !self.evict_oldest() {
                    // Other queues hold the node's budget: not cached (a
                    // consumer reads it back from the log).
                    return;
                }
            }
        }
        self.bytes += data.len();
        self.entries.insert(index, data);
    }

    /// An entry read back from the log.
    pub fn read_back(&mut self, index: u64, data: Bytes) {
        self.read_back = Some((index, data));
    }

    /// Drops entries below `index` (they hold no live message).
    pub fn trim_below(&mut self, index: u64) {
        if self.entries.first_key_value().is_some_and(|(i, _)| *i < index) {
            let keep = self.entries.split_off(&index);
            for data in std::mem::replace(&mut self.entries, keep).into_values() {
                self.bytes -= data.len();
                self.give(data.len());
            }
        }
        if self.read_back.as_ref().is_some_and(|(i, _)| *i < index) {
            self.read_back = None;
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.give(self.bytes);
        self.bytes = 0;
        self.read_back = None;
    }

    pub fn bytes(&self) -> usize {
        self.bytes + self.read_back.as_ref().map_or(0, |(_, d)| d.len())
    }
}

/// The state of a replica at log index `state_at`: what a checkpoint (the
/// `'q'` record, written with the apply state) and a compaction snapshot
/// (the raft snapshot's data) hold. A snapshot is placed at or below the
/// oldest entry still needed, so it may be older than `state_at`: whoever
/// loads it skips the entries up to `state_at`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    /// The log index the state reflects.
    pub state_at: u64,
    /// The last log index carrying a configuration change.
    pub conf_changed_at: u64,
    pub sm: queue_sm::Snapshot,
    pub batches: Vec<(Seq, Batch)>,
}

/// [`Checkpoint`] as it is encoded, the queue's state borrowed (the same
/// fields in the same order: the same bytes).
#[derive(Serialize)]
pub(crate) struct CheckpointRef<'a> {
    pub state_at: u64,
    pub conf_changed_at: u64,
    pub sm: queue_sm::SnapshotRef<'a>,
    pub batches: &'a Batches,
}

impl CheckpointRef<'_> {
    /// The version byte and the checkpoint, in one buffer of exactly its
    /// size: a checkpoint of a long queue is tens of MB, kept as the log's
    /// snapshot until the next one, so neither a second copy nor a
    /// growing buffer's spare capacity is worth it.
    pub fn encode(&self) -> Result<Bytes, Error> {
        let error = |e: postcard::Error| Error::Corrupt(format!("encoding a checkpoint: {e}"));
        let size = postcard::experimental::serialized_size(self).map_err(error)?;
        let mut buf = Vec::with_capacity(size + 1);
        buf.push(CHECKPOINT_VERSION);
        let buf = postcard::to_extend(self, buf).map_err(error)?;
        Ok(Bytes::from(buf))
    }
}

impl Checkpoint {

    pub fn decode(data: &[u8]) -> Result<Self, Error> {
        match data.split_first() {
            Some((&CHECKPOINT_VERSION, rest)) => {
                postcard::from_bytes(rest).map_err(|e| Error::Corrupt(format!("queue checkpoint: {e}")))
            }
            _ => Err(Error::Corrupt("queue checkpoint: unknown version".to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::replica::queue_sm::NewMsg;

    #[test]
    fn body_caches_share_the_node_budget() {
        let budget = CacheBudget::new(100);
        let entry = |n: usize| Bytes::from(vec![0u8; n]);
        let mut a = BodyCache::new(80, Some(budget.clone()));
        let mut b = BodyCache::new(80, Some(budget.clone()));
        a.insert(1, entry(40));
        a.insert(2, entry(40));
        assert_eq!((a.bytes(), budget.used()), (80, 80));
        // Its own limit: the oldest goes.
        a.insert(3, entry(30));
        assert!(a.get(1).is_none() && a.get(3).is_some());
        assert_eq!((a.bytes(), budget.used()), (70, 70));
        // The node's budget is nearly spent by `a`: `b` caches nothing it
        // cannot fit, and never evicts another queue's entries.
        b.insert(1, entry(40));
        assert!(b.get(1).is_none());
        b.insert(2, entry(30));
        assert!(b.get(2).is_some());
        assert_eq!((a.bytes(), b.bytes(), budget.used()), (70, 30, 100));
        // What a cache gives back (trim, clear, drop) frees the budget.
        a.trim_below(3);
        assert_eq!(budget.used(), 60);
        b.insert(3, entry(40));
        assert_eq!((b.bytes(), budget.used()), (70, 100));
        a.clear();
        assert_eq!(budget.used(), 70);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn bodies_are_sliced_out_of_an_entry() {
        let cmds = vec![Command::Enqueue { now_ms: 0, msgs: vec![NewMsg { size: 1, persistent: true, publish_id: None, ttl_ms: None, priority: 0, ..Default::default() }; 3] }];
        // In parts, as records are: each body is its parts joined.
        let parts = [
            [Bytes::from_static(b"a"), Bytes::new()],
            [Bytes::new(), Bytes::new()],
            [Bytes::from_static(b"cc"), Bytes::from_static(b"c")],
        ];
        let bodies = [&b"a"[..], b"", b"ccc"];
        let data = Bytes::from(encode_entry(&cmds, &parts).unwrap());
        assert_eq!(decode_commands(5, &data).unwrap(), cmds);
        for (i, b) in bodies.iter().enumerate() {
            assert_eq!(&entry_body(5, &data, i as u32).unwrap()[..], *b);
        }
        assert!(entry_body(5, &data, 3).is_err());
    }

    #[test]
    fn batches_locate_and_release() {
        let mut b = Batches::default();
        b.enqueued(10, 0, &[Some(0), Some(1)], 0);
        b.enqueued(11, 2, &[Some(2), None, Some(3)], 0);
        assert_eq!(b.locate(1), Some((10, 1)));
        assert_eq!(b.locate(3), Some((11, 4)));
        assert_eq!(b.locate(4), None);
        assert_eq!(b.oldest_index(), Some(10));
        b.removed(0);
        b.removed(1);
        assert_eq!(b.oldest_index(), Some(11));
        b.removed(2);
        b.removed(3);
        assert_eq!(b.oldest_index(), None);
        assert_eq!(b.len(), 0);
    }

    /// Batches emptied out of order stay dead behind a live one, are
    /// skipped by every lookup and by the encoding, and are swept once
    /// they outnumber the live ones.
    #[test]
    fn dead_batches_behind_a_live_one() {
        let mut b = Batches::default();
        for i in 0..1000u64 {
            b.enqueued(100 + i, 0, &[Some(2 * i), Some(2 * i + 1)], i);
        }
        assert_eq!(b.len(), 1000);
        // Everything but batch 0 goes.
        for seq in 2..2000 {
            b.removed(seq);
        }
        assert_eq!(b.len(), 1);
        assert!(b.list.len() <= 65, "dead batches swept: {}", b.list.len());
        assert_eq!(b.oldest_index(), Some(100));
        assert_eq!(b.locate(1), Some((100, 1)));
        assert_eq!(b.locate(5), None);
        assert_eq!(b.enqueued_ms(5), 0);
        // Removing a seq twice does not count twice.
        b.removed(5);
        assert_eq!(b.len(), 1);
        let bytes = postcard::to_allocvec(&b).unwrap();
        let back: Vec<(Seq, Batch)> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].0, 0);
        let restored = Batches::from_vec(back);
        assert_eq!(restored.locate(0), Some((100, 0)));
        b.removed(0);
        b.removed(1);
        assert_eq!((b.len(), b.oldest_index(), b.list.len()), (0, None, 0));
    }
}
