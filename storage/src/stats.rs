//! Counters shared by the writer, the maintenance thread and `Store::stats`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Number of buckets of [`Stats::writes_per_batch`].
pub const BATCH_HISTOGRAM_BUCKETS: usize = 14;

/// A snapshot of the store's counters, for metrics and docs.
///
/// All counters count since `Store::open` except the two maintenance
/// counters, which are persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Bytes on disk: journal + tables of all keyspaces.
    pub disk_bytes: u64,
    /// Bytes of journal files (part of `disk_bytes`).
    pub journal_bytes: u64,
    /// `write`/`write_nowait` calls committed successfully (flushes not counted).
    pub writes: u64,
    /// Operations in those calls.
    pub ops: u64,
    /// Group commits (one per writer wake-up that wrote or synced something;
    /// a flush-only group counts too).
    pub batches: u64,
    /// `fdatasync` calls made by group commits and flushes.
    pub syncs: u64,
    /// `write` calls in the most recent group.
    pub last_batch_writes: u64,
    /// Histogram of writes per group: bucket `i` counts groups holding
    /// `2^i ..= 2^(i+1)-1` writes; the last bucket is open-ended.
    pub writes_per_batch: [u64; BATCH_HISTOGRAM_BUCKETS],
    /// Approximate number of live messages (persisted; puts minus removes).
    pub live_estimate: u64,
    /// Message removes since the last major compaction started (persisted).
    pub removes_since_compaction: u64,
    /// Major compactions finished since open.
    pub compactions: u64,
    /// Whether a major compaction is running right now.
    pub compaction_running: bool,
    /// Duration of the last major compaction.
    pub last_compaction: Duration,
    /// Whether the store refuses writes after a failed commit.
    pub poisoned: bool,
}

/// Live counters; `Stats` is a snapshot of these plus disk sizes.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub writes: AtomicU64,
    pub ops: AtomicU64,
    pub batches: AtomicU64,
    pub syncs: AtomicU64,
    pub last_batch_writes: AtomicU64,
    pub writes_per_batch: [AtomicU64; BATCH_HISTOGRAM_BUCKETS],
    pub live_estimate: AtomicU64,
    pub removes_since_compaction: AtomicU64,
    pub compactions: AtomicU64,
    /// Removes a starting compaction took off `removes_since_compaction`;
    /// the writer (owner of the persisted counter) subtracts them.
    pub compacted_removes: AtomicU64,
    pub compaction_running: AtomicBool,
    pub last_compaction_us: AtomicU64,
    pub poisoned: AtomicBool,
    /// Bytes submitted to the writer and not yet taken off its channel.
    pub queued_bytes: AtomicU64,
    /// [`crate::Store::hold_writes`]: the writer commits nothing while set.
    pub held: AtomicBool,
}

impl Counters {
    /// Records one group commit of `writes` write calls.
    pub fn record_batch(&self, writes: u64) {
        self.batches.fetch_add(1, Relaxed);
        self.last_batch_writes.store(writes, Relaxed);
        let bucket = (u64::BITS - writes.max(1).leading_zeros() - 1) as usize;
        if let Some(b) = self.writes_per_batch.get(bucket.min(BATCH_HISTOGRAM_BUCKETS - 1)) {
            b.fetch_add(1, Relaxed);
        }
    }

    pub fn snapshot(&self) -> Stats {
        Stats {
            disk_bytes: 0,
            journal_bytes: 0,
            writes: self.writes.load(Relaxed),
            ops: self.ops.load(Relaxed),
            batches: self.batches.load(Relaxed),
            syncs: self.syncs.load(Relaxed),
            last_batch_writes: self.last_batch_writes.load(Relaxed),
            writes_per_batch: std::array::from_fn(|i| self.writes_per_batch[i].load(Relaxed)),
            live_estimate: self.live_estimate.load(Relaxed),
            removes_since_compaction: self.removes_since_compaction.load(Relaxed),
            compactions: self.compactions.load(Relaxed),
            compaction_running: self.compaction_running.load(Relaxed),
            last_compaction: Duration::from_micros(self.last_compaction_us.load(Relaxed)),
            poisoned: self.poisoned.load(Relaxed),
        }
    }
}
