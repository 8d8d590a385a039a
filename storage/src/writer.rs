//! The writer thread: group commit.
//!
//! One plain std thread owns every write. It blocks on the request channel,
//! then drains whatever else is already queued (up to `max_batch_ops` /
//! `max_batch_bytes`), turns the whole group into ONE fjall batch and commits
//! it: with `PersistMode::SyncData` (fdatasync) if any request of the group
//! is durable, else with `PersistMode::Buffer` (a `write(2)` to the OS, which
//! survives a process crash; fjall would otherwise keep it in a userspace
//! buffer). Then it answers every request of the group.
//!
//! No timer is involved: while one fsync runs, the next group accumulates in
//! the channel, so N concurrent durable writers share one fsync.
//!
//! If building or committing a group fails, every request of the group gets
//! the error and the store is poisoned: nothing is ever reported as written
//! unless it is, and after an fsync failure the state of the journal is
//! unknown, so later writes are refused with `Error::Poisoned`.

use crate::completion::Responder;
use crate::error::{Error, Result};
use crate::format::{self, Counters as PersistedCounters};
use crate::keys;
use crate::maintenance::Compactor;
use crate::stats::Counters;
use crate::store::{Keyspaces, Op, StoreOptions};
use fjall::{Database, PersistMode};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};

/// What `Store` sends to the writer.
pub(crate) enum Request {
    /// A group of ops (possibly empty: `flush` is an empty durable write).
    Write { ops: Vec<Op>, durable: bool, done: Option<Responder> },
    /// Commit and fsync everything queued before, then stop.
    Close,
}

/// One `msgs` key's final fate inside a batch.
enum MsgWrite {
    Put(Vec<u8>),
    /// Ack or queue deletion: a weak (single-delete) tombstone, which
    /// cancels against its value at the next flush or compaction.
    RemoveWeak,
}

/// The group being built. Maps keep only the last write per key: the same
/// key twice in one fjall batch would share one seqno, with no defined winner.
#[derive(Default)]
struct Pending {
    msgs: BTreeMap<[u8; keys::MSG_KEY_LEN], MsgWrite>,
    logs: BTreeMap<[u8; keys::MSG_KEY_LEN], Option<bytes::Bytes>>,
    state: BTreeMap<Vec<u8>, Option<bytes::Bytes>>,
    meta: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    puts: u64,
    removes: u64,
    /// A queue drained or was deleted in this group (compaction hint).
    drained: bool,
}

struct Limits {
    sync: bool,
    max_batch_ops: usize,
    max_batch_bytes: usize,
    auto_compact: bool,
    compact_after_removes: u64,
    compact_drained_min_removes: u64,
}

pub(crate) struct Writer {
    db: Database,
    ks: Keyspaces,
    rx: mpsc::Receiver<Request>,
    counters: Arc<Counters>,
    compactor: Compactor,
    limits: Limits,
    /// Authoritative copy of the persisted counters (the atomics in
    /// `counters` are published copies for `stats`).
    persisted: PersistedCounters,
    /// Cache of the persisted per-queue next seq (highest seq ever put + 1),
    /// loaded on first use.
    next_seq: HashMap<u64, u64>,
    /// Raft log garbage, for the compaction policy (in memory only: after a
    /// restart the entries already on disk count with [`UNKNOWN_LOG_ENTRY`]).
    logs: LogGarbage,
}

/// What the Raft logs (the `logs` keyspace) hold and have removed since
/// the last compaction, in bytes.
#[derive(Default)]
struct LogGarbage {
    /// Size of every entry written by this process and not removed yet,
    /// by log.
    sizes: HashMap<u64, LogSizes>,
    live_bytes: u64,
    removed_bytes: u64,
}

/// The sizes of a log's entries from index `first` on, 0 where unknown (a
/// gap). Logs grow at the end and are cut at either end, so a deque of
/// 4-byte sizes does (a long queue's log has an entry per few messages; a
/// map of keys took 25 to 50 bytes per entry).
#[derive(Default)]
struct LogSizes {
    first: u64,
    sizes: VecDeque<u32>,
}

/// A log entry this far from the known ones starts the log afresh (the
/// older sizes count as unknown when removed).
const LOG_SIZES_MAX_GAP: u64 = 1 << 16;

impl LogGarbage {
    /// Entry `index` of `log` is written with `size` bytes; returns the
    /// size of the entry it replaced, if known.
    fn put(&mut self, log: u64, index: u64, size: u64) -> Option<u64> {
        let l = self.sizes.entry(log).or_default();
        let size = u32::try_from(size).unwrap_or(u32::MAX).max(1);
        let end = l.first + l.sizes.len() as u64;
        if l.sizes.is_empty() || index + LOG_SIZES_MAX_GAP < l.first || index > end + LOG_SIZES_MAX_GAP {
            l.sizes.clear();
            l.first = index;
        }
        while index < l.first {
            l.sizes.push_front(0);
            l.first -= 1;
        }
        let at = usize::try_from(index - l.first).unwrap_or(usize::MAX);
        while l.sizes.len() < at {
            l.sizes.push_back(0);
        }
        match l.sizes.get_mut(at) {
            Some(slot) => {
                let old = std::mem::replace(slot, size);
                (old != 0).then_some(u64::from(old))
            }
            None => {
                l.sizes.push_back(size);
                None
            }
        }
    }

    /// Entry `index` of `log` is removed: its size, if known.
    fn take(&mut self, log: u64, index: u64) -> Option<u64> {
        let l = self.sizes.get_mut(&log)?;
        let at = usize::try_from(index.checked_sub(l.first)?).ok()?;
        let old = std::mem::take(l.sizes.get_mut(at)?);
        while l.sizes.front() == Some(&0) {
            l.sizes.pop_front();
            l.first += 1;
        }
        while l.sizes.back() == Some(&0) {
            l.sizes.pop_back();
        }
        if l.sizes.is_empty() {
            self.sizes.remove(&log);
        } else if l.sizes.capacity() > 4 * l.sizes.len() + 64 {
            l.sizes.shrink_to(2 * l.sizes.len());
        }
        (old != 0).then_some(u64::from(old))
    }
}

/// The size assumed for a removed log entry written before this process
/// started.
const UNKNOWN_LOG_ENTRY: u64 = 4096;

/// Log garbage that always warrants a compaction once it is 4 times the
/// live log, and the least garbage worth one once the logs are empty.
const LOG_COMPACT_BYTES: u64 = 64 << 20;
const LOG_COMPACT_DRAINED_BYTES: u64 = 4 << 20;

impl Writer {
    pub(crate) fn new(
        db: Database,
        ks: Keyspaces,
        rx: mpsc::Receiver<Request>,
        counters: Arc<Counters>,
        compactor: Compactor,
        opts: &StoreOptions,
        persisted: PersistedCounters,
    ) -> Writer {
        let limits = Limits {
            sync: opts.sync,
            max_batch_ops: opts.max_batch_ops.max(1),
            max_batch_bytes: opts.max_batch_bytes.max(1),
            auto_compact: opts.auto_compact,
            compact_after_removes: opts.compact_after_removes,
            compact_drained_min_removes: opts.compact_drained_min_removes,
        };
        Writer { db, ks, rx, counters, compactor, limits, persisted, next_seq: HashMap::new(), logs: LogGarbage::default() }
    }

    /// Thread body. Returns the result of the final fsync at `Close`.
    pub(crate) fn run(mut self) -> Result<()> {
        loop {
            // All senders gone without `Close` cannot happen (Store::drop
            // sends it), but treat it the same way.
            let first = self.rx.recv().unwrap_or(Request::Close);
            let mut group = Vec::new();
            let mut closing = false;
            let (mut ops, mut bytes) = (0usize, 0usize);
            let mut next = Some(first);
            while let Some(req) = next.take() {
                match req {
                    Request::Write { ops: o, durable, done } => {
                        self.counters.queued_bytes.fetch_sub(Op::queued_len(&o), Relaxed);
                        ops += o.len();
                        bytes += o.iter().map(Op::payload_len).sum::<usize>();
                        group.push((o, durable, done));
                    }
                    Request::Close => {
                        closing = true;
                        break;
                    }
                }
                if ops < self.limits.max_batch_ops && bytes < self.limits.max_batch_bytes {
                    next = self.rx.try_recv().ok();
                }
            }

            // Fault injection for tests (`Store::hold_writes`): a disk that
            // takes its time. One relaxed load per group otherwise.
            while self.counters.held.load(Relaxed) && !closing {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let result = self.commit_group(group, closing);
            if closing {
                tracing::debug!("storage writer stopped");
                return result;
            }
        }
    }

    /// Commits one group and answers its requests. `force_sync`: the close
    /// path, which must leave everything durable.
    fn commit_group(&mut self, group: Vec<(Vec<Op>, bool, Option<Responder>)>, force_sync: bool) -> Result<()> {
        let durable = force_sync || group.iter().any(|(_, durable, _)| *durable);
        let n_writes = group.iter().filter(|(ops, _, _)| !ops.is_empty()).count() as u64;
        let n_ops = group.iter().map(|(ops, _, _)| ops.len() as u64).sum::<u64>();

        let result = if self.counters.poisoned.load(Relaxed) {
            Err(Error::Poisoned)
        } else {
            self.build(group.iter().flat_map(|(ops, _, _)| ops)).and_then(|p| self.commit(p, durable, n_writes))
        };

        match &result {
            Ok(()) => {
                self.counters.writes.fetch_add(n_writes, Relaxed);
                self.counters.ops.fetch_add(n_ops, Relaxed);
            }
            Err(e) => {
                // Also when fjall reports Poisoned itself (e.g. a failed
                // background flush): from now on every write is refused.
                if !self.counters.poisoned.swap(true, Relaxed) {
                    tracing::error!(error = %e, writes = n_writes, "storage group commit failed; poisoning the store");
                }
            }
        }
        for (_, _, done) in group {
            if let Some(done) = done {
                done.send(result.clone());
            }
        }
        result
    }

    /// Turns a group into its final per-key writes.
    fn build<'a>(&mut self, ops: impl Iterator<Item = &'a Op>) -> Result<Pending> {
        let mut p = Pending::default();
        for op in ops {
            match op {
                Op::PutMessage { queue, seq, record } => {
                    p.msgs.insert(keys::msg_key(*queue, *seq), MsgWrite::Put(format::encode_record(record)));
                    p.puts += 1;
                    let next = seq.saturating_add(1);
                    if next > self.next_seq(*queue)? {
                        self.next_seq.insert(*queue, next);
                        p.state.insert(keys::next_seq_key(*queue).to_vec(), Some(bytes::Bytes::copy_from_slice(&format::encode_u64(next))));
                    }
                }
                Op::RemoveMessage { queue, seq } => {
                    let key = keys::msg_key(*queue, *seq);
                    // Put and acked within one group: by the write-once
                    // rule nothing older exists, so neither reaches the disk.
                    if !matches!(p.msgs.remove(&key), Some(MsgWrite::Put(_))) {
                        p.msgs.insert(key, MsgWrite::RemoveWeak);
                    }
                    p.removes += 1;
                }
                Op::SetAckFloor { queue, floor } => {
                    p.state.insert(keys::floor_key(*queue).to_vec(), Some(bytes::Bytes::copy_from_slice(&format::encode_u64(*floor))));
                    if *floor > 0 && *floor >= self.next_seq(*queue)? {
                        p.drained = true;
                    }
                }
                Op::DeleteQueue { queue } => self.delete_queue(&mut p, *queue)?,
                Op::LogAppend { log, index, data } => {
                    let key = keys::log_key(*log, *index);
                    let size = data.len() as u64;
                    if let Some(old) = self.logs.put(*log, *index, size) {
                        self.logs.live_bytes = self.logs.live_bytes.saturating_sub(old);
                    }
                    self.logs.live_bytes += size;
                    p.logs.insert(key, Some(data.clone()));
                }
                Op::LogTruncate { log, from } => self.log_remove(&mut p, *log, *from, u64::MAX)?,
                Op::LogCompact { log, below } => {
                    let first = self.log_first(&p, *log)?;
                    if *below > first {
                        self.log_remove(&mut p, *log, first, below - 1)?;
                        p.state.insert(keys::log_first_key(*log).to_vec(), Some(bytes::Bytes::copy_from_slice(&format::encode_u64(*below))));
                    }
                }
                Op::LogMeta { log, tag, value } => {
                    p.state.insert(keys::log_meta_key(*log, *tag).to_vec(), value.clone());
                }
                Op::PutMeta { key, value } => {
                    p.meta.insert(key.clone(), Some(value.clone()));
                }
                Op::DeleteMeta { key } => {
                    p.meta.insert(key.clone(), None);
                }
            }
        }
        Ok(p)
    }

    /// The first index of `log`, as this group leaves it.
    fn log_first(&self, p: &Pending, log: u64) -> Result<u64> {
        let key = keys::log_first_key(log);
        if let Some(Some(v)) = p.state.get(key.as_slice()) {
            return format::decode_u64("log first index", &key, v);
        }
        match self.ks.state.get(key)? {
            Some(v) => format::decode_u64("log first index", &key, &v),
            None => Ok(0),
        }
    }

    /// Removes entries `lo..=hi` of `log`: those committed (strong
    /// tombstones, since log indexes may be rewritten) and those put
    /// earlier in this group.
    fn log_remove(&mut self, p: &mut Pending, log: u64, lo: u64, hi: u64) -> Result<()> {
        let range = keys::log_key(log, lo)..=keys::log_key(log, hi);
        let pending: Vec<_> = p.logs.range(range.clone()).map(|(k, _)| *k).collect();
        for key in pending {
            p.logs.insert(key, None);
            self.log_removed(&key);
        }
        for guard in self.ks.logs.range(range) {
            let key = guard.key()?;
            let key: [u8; keys::MSG_KEY_LEN] = key.as_ref().try_into().map_err(|_| Error::Corrupt {
                what: "log key",
                key: key.to_vec(),
                detail: "not 16 bytes".into(),
            })?;
            if p.logs.insert(key, None).is_none() {
                self.log_removed(&key);
            }
        }
        Ok(())
    }

    /// Accounts for a removed log entry (compaction policy).
    fn log_removed(&mut self, key: &[u8; keys::MSG_KEY_LEN]) {
        let size = match keys::decode_msg_key(key).and_then(|(log, index)| self.logs.take(log, index)) {
            Some(size) => {
                self.logs.live_bytes = self.logs.live_bytes.saturating_sub(size);
                size
            }
            None => UNKNOWN_LOG_ENTRY,
        };
        self.logs.removed_bytes += size;
    }

    /// The persisted next seq of `queue` (highest seq ever put + 1), cached.
    fn next_seq(&mut self, queue: u64) -> Result<u64> {
        if let Some(n) = self.next_seq.get(&queue) {
            return Ok(*n);
        }
        let key = keys::next_seq_key(queue);
        let n = match self.ks.state.get(key)? {
            Some(v) => format::decode_u64("next seq", &key, &v)?,
            None => 0,
        };
        self.next_seq.insert(queue, n);
        Ok(n)
    }

    /// Removes every message of `queue` from its committed floor up, plus
    /// whatever this group already put for it, plus the floor. The next seq
    /// is kept on purpose: a reused queue id continues numbering after it,
    /// so no key is ever written twice.
    fn delete_queue(&mut self, p: &mut Pending, queue: u64) -> Result<()> {
        let floor_key = keys::floor_key(queue);
        let floor = match self.ks.state.get(floor_key)? {
            Some(v) => format::decode_u64("ack floor", &floor_key, &v)?,
            None => 0,
        };
        // Puts earlier in this group never reach the disk.
        let pending: Vec<_> = p.msgs.range(keys::queue_range(queue, 0)).map(|(k, _)| *k).collect();
        for key in pending {
            if let Some(MsgWrite::Put(_)) = p.msgs.remove(&key) {
                p.removes += 1;
            }
        }
        // Only this thread writes, so the committed state plus `p` is the
        // complete picture.
        for guard in self.ks.msgs.range(keys::queue_range(queue, floor)) {
            let key = guard.key()?;
            let key: [u8; keys::MSG_KEY_LEN] = key.as_ref().try_into().map_err(|_| Error::Corrupt {
                what: "message key",
                key: key.to_vec(),
                detail: "not 16 bytes".into(),
            })?;
            p.msgs.insert(key, MsgWrite::RemoveWeak);
            p.removes += 1;
        }
        p.state.insert(floor_key.to_vec(), None);
        p.drained = true;
        Ok(())
    }

    /// Writes `p` as one fjall batch (plus the updated counters, so they stay
    /// consistent with the data across crashes).
    fn commit(&mut self, p: Pending, durable: bool, n_writes: u64) -> Result<()> {
        // Removes already accounted for by a compaction that started since
        // the last commit; subtracted only once this commit succeeded.
        let compacted = self.counters.compacted_removes.load(Relaxed);
        let mut next = self.persisted;
        next.removes_since_compaction = next.removes_since_compaction.saturating_sub(compacted) + p.removes;
        next.live_estimate = (next.live_estimate + p.puts).saturating_sub(p.removes);

        let fsync = durable && self.limits.sync;
        let mode = if fsync { PersistMode::SyncData } else { PersistMode::Buffer };
        let mut batch = self.db.batch().durability(Some(mode));
        for (key, w) in p.msgs {
            match w {
                MsgWrite::Put(v) => batch.insert(&self.ks.msgs, key, v),
                MsgWrite::RemoveWeak => batch.remove_weak(&self.ks.msgs, key),
            }
        }
        for (key, v) in p.state {
            match v {
                Some(v) => batch.insert(&self.ks.state, key, v),
                None => batch.remove(&self.ks.state, key),
            }
        }
        for (key, v) in p.meta {
            match v {
                Some(v) => batch.insert(&self.ks.meta, key, v),
                None => batch.remove(&self.ks.meta, key),
            }
        }
        for (key, v) in p.logs {
            match v {
                Some(v) => batch.insert(&self.ks.logs, key, v.as_ref()),
                None => batch.remove(&self.ks.logs, key),
            }
        }
        if next != self.persisted {
            batch.insert(&self.ks.state, keys::COUNTERS_KEY, format::encode_counters(next).to_vec());
        }

        let started = std::time::Instant::now();
        if batch.is_empty() {
            // A flush (or a durable group with nothing to write): fjall's
            // commit of an empty batch does nothing, so persist explicitly.
            if durable {
                self.db.persist(mode)?;
            } else {
                return Ok(());
            }
        } else {
            batch.commit()?;
        }

        if fsync {
            self.counters.syncs.fetch_add(1, Relaxed);
            // One sample per group commit (not per message): the commit
            // with its fdatasync, as seen by the writers waiting on it.
            metrics::histogram!("sluice_storage_fsync_seconds").record(started.elapsed().as_secs_f64());
        }
        metrics::histogram!("sluice_storage_batch_writes").record(n_writes as f64);
        self.counters.record_batch(n_writes);
        self.counters.compacted_removes.fetch_sub(compacted, Relaxed);
        self.persisted = next;
        self.counters.live_estimate.store(next.live_estimate, Relaxed);
        self.counters.removes_since_compaction.store(next.removes_since_compaction, Relaxed);
        self.maybe_compact(p.drained);
        Ok(())
    }

    /// Compaction policy (see docs/storage.md): compact when enough removes
    /// piled up, or a queue drained after enough removes, provided dead
    /// entries outnumber live ones 4:1 (major compaction rewrites every live
    /// message, so it must be mostly garbage to be worth it).
    ///
    /// The Raft logs the same way, in bytes: removed entries (compacted or
    /// truncated logs, deleted groups) are tombstones until a major
    /// compaction, and compact once they are 4 times the live log and at
    /// least [`LOG_COMPACT_BYTES`] (or [`LOG_COMPACT_DRAINED_BYTES`] once
    /// the logs are empty).
    fn maybe_compact(&mut self, drained: bool) {
        let l = &self.limits;
        let removes = self.persisted.removes_since_compaction;
        let enough = removes >= l.compact_after_removes || (drained && removes >= l.compact_drained_min_removes);
        let msgs = enough && self.persisted.live_estimate.saturating_mul(4) <= removes;
        let g = &self.logs;
        let log_enough = g.removed_bytes >= LOG_COMPACT_BYTES || (g.live_bytes == 0 && g.removed_bytes >= LOG_COMPACT_DRAINED_BYTES);
        let logs = log_enough && g.live_bytes.saturating_mul(4) <= g.removed_bytes;
        if l.auto_compact && (msgs || logs) {
            if logs {
                self.logs.removed_bytes = 0;
            }
            self.compactor.request();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sizes_follow_appends_rewrites_and_cuts_at_both_ends() {
        let mut g = LogGarbage::default();
        for i in 10..20 {
            assert_eq!(g.put(1, i, 100 + i), None);
        }
        assert_eq!(g.put(1, 15, 7), Some(115), "a rewrite returns the old size");
        assert_eq!(g.take(1, 10), Some(110));
        assert_eq!(g.take(1, 10), None, "removed once");
        assert_eq!(g.take(1, 9), None, "never written");
        // A truncation from the back.
        for i in (15..20).rev() {
            assert!(g.take(1, i).is_some());
        }
        // A gap: the entries between are unknown.
        assert_eq!(g.put(1, 30, 5), None);
        assert_eq!(g.take(1, 25), None);
        assert_eq!(g.take(1, 30), Some(5));
        for i in 11..15 {
            assert_eq!(g.take(1, i), Some(100 + i));
        }
        assert!(g.sizes.is_empty(), "an emptied log is forgotten");
        // An entry far from the known ones starts the log afresh.
        assert_eq!(g.put(2, 0, 1), None);
        assert_eq!(g.put(2, 1 << 20, 2), None);
        assert_eq!(g.take(2, 0), None);
        assert_eq!(g.take(2, 1 << 20), Some(2));
        assert!(g.sizes.is_empty());
    }
}
