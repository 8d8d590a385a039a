//! The persistence boundary of one Raft group: [`LogStore`], its in-memory
//! implementation [`MemLogStore`], and [`RaftStore`], the adapter raft-rs
//! reads through.
//!
//! A store holds, for one group:
//!
//! - the **hard state** (term, vote, commit) and the **log entries**, both
//!   written by the driver through [`LogStore::submit`];
//! - the **snapshot**: metadata (index, term, configuration) plus the state
//!   machine's bytes. It is either produced locally by compaction
//!   ([`LogStore::compact`]) or received from the leader (inside a submitted
//!   [`LogWrite`]);
//! - the **apply state**: the index, term and configuration the state machine
//!   had applied when it last checkpointed ([`LogStore::save_apply_state`]).
//!
//! Writes are asynchronous. `submit` must make a write visible to reads at
//! once (raft-rs reads its own unpersisted entries back through `Storage`),
//! but it may become durable later; the owner of the store reports
//! durability to the driver with `Group::on_persisted(number)`. Writes become
//! durable in the order they were submitted, so "write n is durable" implies
//! every earlier write is. That is what lets one fsync cover the appends of
//! many groups: the fjall-backed store hands its writes to the node's storage
//! writer thread and reports each group's highest durable number after the
//! round's fsync.
//!
//! `save_apply_state` and `compact` are synchronous: they are called by the
//! state machine's checkpoint, which persists its own state in the same
//! batch.

use std::collections::VecDeque;

use bytes::Bytes;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

/// Index of the snapshot every replica of a new group starts from.
///
/// A group is bootstrapped from a snapshot rather than from an empty log so
/// that its first configuration is part of replicated state: a replica
/// added later starts empty, finds the leader's log compacted below index
/// 2, and receives this configuration in a snapshot instead of guessing it
/// (raft-rs's `MemStorage` notes the same choice).
pub const BOOTSTRAP_INDEX: u64 = 1;
/// Term of the bootstrap snapshot.
pub const BOOTSTRAP_TERM: u64 = 1;

/// What the state machine had applied at its last checkpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyState {
    /// Index of the last applied entry.
    pub index: u64,
    /// Term of the last applied entry.
    pub term: u64,
    /// The configuration after applying everything up to `index`.
    pub conf_state: ConfState,
}

/// One write the driver hands to the store: everything one raft-rs `Ready`
/// asks to persist.
///
/// Apply order within a write: the snapshot (which replaces the log), then
/// the entries (which replace any suffix of the log from their first
/// index), then the hard state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogWrite {
    /// The raft-rs ready number; durability is reported with it.
    pub number: u64,
    /// A new hard state, if it changed.
    pub hard_state: Option<HardState>,
    /// A snapshot received from the leader.
    pub snapshot: Option<Snapshot>,
    /// Entries to append, consecutive, truncating any conflicting suffix.
    pub entries: Vec<Entry>,
    /// Whether the write must be synced before it is reported durable.
    /// `false` only when the write is nothing but a new commit index, which
    /// raft-rs allows to lose (see `Ready::must_sync`).
    pub must_sync: bool,
}

impl LogWrite {
    /// Whether the write carries nothing to persist.
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none() && self.snapshot.is_none() && self.entries.is_empty()
    }
}

/// Why a store read or write failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogStoreError {
    /// The entry was compacted into the snapshot.
    #[error("log entry {index} is compacted (the log starts at {first})")]
    Compacted {
        /// The requested index.
        index: u64,
        /// The first index still in the log.
        first: u64,
    },
    /// The entry is beyond the end of the log.
    #[error("log entry {index} is beyond the last index {last}")]
    Unavailable {
        /// The requested index.
        index: u64,
        /// The last index in the log.
        last: u64,
    },
    /// No snapshot at or after the requested index exists yet.
    #[error("no snapshot at or after index {wanted} (the latest is at {have})")]
    SnapshotUnavailable {
        /// The index the snapshot must reach.
        wanted: u64,
        /// The index of the snapshot the store has.
        have: u64,
    },
    /// An append does not attach to the log: it would leave a hole, or it
    /// starts inside the snapshot.
    #[error("append at {first} does not attach to the log [{log_first}, {log_last}]")]
    Detached {
        /// First index of the appended entries.
        first: u64,
        /// First index of the log.
        log_first: u64,
        /// Last index of the log.
        log_last: u64,
    },
    /// Appended entries are not consecutive.
    #[error("appended entries are not consecutive at {index}")]
    NotConsecutive {
        /// The index where the sequence breaks.
        index: u64,
    },
    /// A compaction names an index or term the log does not have.
    #[error("cannot compact to index {index} term {term}: {reason}")]
    BadCompaction {
        /// The snapshot index asked for.
        index: u64,
        /// The snapshot term asked for.
        term: u64,
        /// What does not match.
        reason: &'static str,
    },
    /// The durable state is inconsistent (for example the state machine
    /// claims to have applied entries the log does not have).
    #[error("inconsistent raft state: {0}")]
    Inconsistent(String),
    /// The underlying storage failed.
    #[error("storage failed: {0}")]
    Failed(String),
}

/// The persistent state of one Raft group, as the driver sees it.
///
/// Reads see every submitted write, durable or not. See the module docs
/// for the durability contract.
pub trait LogStore {
    /// The hard state, including submitted writes.
    fn hard_state(&self) -> HardState;
    /// The apply state saved at the last checkpoint.
    fn apply_state(&self) -> ApplyState;
    /// Metadata of the latest snapshot (index 0 if there is none).
    fn snapshot_metadata(&self) -> SnapshotMetadata;
    /// The latest snapshot with its data.
    fn snapshot(&self) -> Result<Snapshot, LogStoreError>;
    /// The first index of the log: snapshot index + 1.
    fn first_index(&self) -> u64;
    /// The last index of the log (the snapshot index if the log is empty).
    fn last_index(&self) -> u64;
    /// The term of the entry at `index`, for `index` in
    /// `[first_index - 1, last_index]` (the snapshot's term for
    /// `first_index - 1`).
    fn term(&self, index: u64) -> Result<u64, LogStoreError>;
    /// Entries `[low, high)`, at least one if any exists, and beyond the
    /// first no more than `max_size` bytes in total (protobuf size).
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, LogStoreError>;
    /// Accepts a write: visible to reads when this returns, durable later,
    /// in submission order.
    fn submit(&mut self, write: LogWrite) -> Result<(), LogStoreError>;
    /// Durably records the state machine's checkpoint.
    fn save_apply_state(&mut self, state: &ApplyState) -> Result<(), LogStoreError>;
    /// Durably installs a snapshot the local state machine made at an
    /// applied index, and drops the entries it covers. A snapshot not newer
    /// than the current one is ignored.
    fn compact(&mut self, snapshot: Snapshot) -> Result<(), LogStoreError>;
}

/// Builds the snapshot a new group starts from: the given configuration at
/// [`BOOTSTRAP_INDEX`], with the state machine's initial bytes.
pub fn bootstrap_snapshot(voters: &[u64], learners: &[u64], data: Bytes) -> Snapshot {
    let conf_state = ConfState { voters: voters.to_vec(), learners: learners.to_vec(), ..Default::default() };
    let mut snapshot = Snapshot { data, ..Default::default() };
    let metadata = snapshot.mut_metadata();
    metadata.index = BOOTSTRAP_INDEX;
    metadata.term = BOOTSTRAP_TERM;
    metadata.set_conf_state(conf_state);
    snapshot
}

/// Where a replica resumes after opening its store: derived from the
/// durable state, and checked so that raft-rs never sees a state it would
/// panic on.
#[derive(Debug, Clone)]
pub(crate) struct StartPoint {
    /// The hard state raft-rs starts from; its commit is raised to what is
    /// known to be committed (see [`start_point`]).
    pub hard_state: HardState,
    /// The configuration as of `applied`.
    pub conf_state: ConfState,
    /// What the state machine resumes from (raft-rs `Config::applied`).
    pub applied: ApplyState,
    /// Whether the state machine must first be rebuilt from the store's
    /// snapshot, because the snapshot is newer than the last checkpoint.
    pub restore: bool,
}

/// Computes the [`StartPoint`] of a store.
///
/// The apply state and the snapshot are written independently, so either
/// can be ahead: if the snapshot is newer, the state machine restarts from
/// it. The durable commit index can lag both (a new commit index is a
/// write that may be lost, and compaction does not touch the hard state),
/// but anything applied or snapshotted was committed, so the commit index
/// is raised to it. raft-rs would panic on `applied > commit`.
pub(crate) fn start_point<S: LogStore + ?Sized>(store: &S) -> Result<StartPoint, LogStoreError> {
    let snapshot = store.snapshot_metadata();
    let apply = store.apply_state();
    let mut hard_state = store.hard_state();
    let (applied, restore) = if snapshot.index > apply.index {
        let applied = ApplyState {
            index: snapshot.index,
            term: snapshot.term,
            conf_state: snapshot.get_conf_state().clone(),
        };
        (applied, true)
    } else {
        (apply, false)
    };
    let last_index = store.last_index();
    if applied.index > last_index {
        return Err(LogStoreError::Inconsistent(format!(
            "applied index {} is beyond the last log index {last_index}",
            applied.index
        )));
    }
    if hard_state.commit > last_index {
        return Err(LogStoreError::Inconsistent(format!(
            "commit index {} is beyond the last log index {last_index}",
            hard_state.commit
        )));
    }
    hard_state.commit = hard_state.commit.max(applied.index);
    hard_state.term = hard_state.term.max(snapshot.term);
    Ok(StartPoint { hard_state, conf_state: applied.conf_state.clone(), applied, restore })
}

/// The log of one group held in memory: the shared logic of both layers of
/// [`MemLogStore`].
#[derive(Debug, Clone, Default)]
struct LogState {
    hard_state: HardState,
    snapshot: Snapshot,
    /// Entries after the snapshot, consecutive from `snapshot index + 1`.
    entries: Vec<Entry>,
    apply_state: ApplyState,
}

impl LogState {
    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn first_index(&self) -> u64 {
        self.snapshot_index() + 1
    }

    fn last_index(&self) -> u64 {
        self.snapshot_index() + self.entries.len() as u64
    }

    fn term(&self, index: u64) -> Result<u64, LogStoreError> {
        let snapshot_index = self.snapshot_index();
        if index == snapshot_index {
            return Ok(self.snapshot.get_metadata().term);
        }
        if index < snapshot_index {
            return Err(LogStoreError::Compacted { index, first: self.first_index() });
        }
        let offset = (index - snapshot_index - 1) as usize;
        self.entries
            .get(offset)
            .map(|entry| entry.term)
            .ok_or(LogStoreError::Unavailable { index, last: self.last_index() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, LogStoreError> {
        let first = self.first_index();
        if low < first {
            return Err(LogStoreError::Compacted { index: low, first });
        }
        let last = self.last_index();
        if high > last + 1 {
            return Err(LogStoreError::Unavailable { index: high - 1, last });
        }
        if low >= high {
            return Ok(Vec::new());
        }
        let from = (low - first) as usize;
        let to = (high - first) as usize;
        let mut entries = self.entries.get(from..to).map(<[Entry]>::to_vec).unwrap_or_default();
        raft::util::limit_size(&mut entries, max_size);
        Ok(entries)
    }

    fn apply_write(&mut self, write: &LogWrite) -> Result<(), LogStoreError> {
        if let Some(snapshot) = &write.snapshot {
            self.install_received_snapshot(snapshot.clone());
        }
        if let Some(first) = write.entries.first() {
            self.append(first.index, &write.entries)?;
        }
        if let Some(hard_state) = &write.hard_state {
            self.hard_state = hard_state.clone();
        }
        Ok(())
    }

    fn append(&mut self, first: u64, entries: &[Entry]) -> Result<(), LogStoreError> {
        let log_first = self.first_index();
        let log_last = self.last_index();
        if first < log_first || first > log_last + 1 {
            return Err(LogStoreError::Detached { first, log_first, log_last });
        }
        for (offset, entry) in entries.iter().enumerate() {
            if entry.index != first + offset as u64 {
                return Err(LogStoreError::NotConsecutive { index: first + offset as u64 });
            }
        }
        self.entries.truncate((first - log_first) as usize);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    /// A snapshot from the leader replaces the whole log: the entries we
    /// hold may conflict with it, and raft-rs only sends one when our log
    /// cannot be repaired by appends.
    fn install_received_snapshot(&mut self, snapshot: Snapshot) {
        let metadata = snapshot.get_metadata();
        self.hard_state.commit = self.hard_state.commit.max(metadata.index);
        self.hard_state.term = self.hard_state.term.max(metadata.term);
        self.entries.clear();
        self.snapshot = snapshot;
    }

    /// A local snapshot keeps the entries after it.
    fn compact(&mut self, snapshot: &Snapshot) -> Result<(), LogStoreError> {
        let index = snapshot.get_metadata().index;
        let term = snapshot.get_metadata().term;
        if index <= self.snapshot_index() {
            return Ok(());
        }
        let bad = |reason| LogStoreError::BadCompaction { index, term, reason };
        match self.term(index) {
            Ok(found) if found == term => {}
            Ok(_) => return Err(bad("the log has a different term at that index")),
            Err(_) => return Err(bad("the log does not reach that index")),
        }
        let drop = (index - self.snapshot_index()) as usize;
        self.entries.drain(..drop.min(self.entries.len()));
        self.snapshot = snapshot.clone();
        Ok(())
    }
}

/// An in-memory [`LogStore`] that models a disk: it keeps a durable layer
/// that survives [`MemLogStore::crash`] and a view that also holds the
/// submitted writes not yet made durable by [`MemLogStore::sync_through`].
///
/// Used by the simulation and by tests; `sluice serve` will use the
/// fjall-backed store.
#[derive(Debug, Clone, Default)]
pub struct MemLogStore {
    /// What reads see: durable state plus pending writes.
    view: LogState,
    /// What survives a crash.
    durable: LogState,
    /// Submitted writes not yet durable, oldest first.
    pending: VecDeque<LogWrite>,
}

impl MemLogStore {
    /// An empty, uninitialized store: a replica created to join an existing
    /// group. It learns the configuration from the leader's snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store for a founding member of a new group: every founding replica
    /// must be created with the same arguments.
    pub fn bootstrap(voters: &[u64], learners: &[u64], data: Bytes) -> Self {
        let snapshot = bootstrap_snapshot(voters, learners, data);
        let mut state = LogState::default();
        state.hard_state.term = BOOTSTRAP_TERM;
        state.hard_state.commit = BOOTSTRAP_INDEX;
        state.apply_state = ApplyState {
            index: BOOTSTRAP_INDEX,
            term: BOOTSTRAP_TERM,
            conf_state: snapshot.get_metadata().get_conf_state().clone(),
        };
        state.snapshot = snapshot;
        MemLogStore { view: state.clone(), durable: state, pending: VecDeque::new() }
    }

    /// Makes every pending write numbered `number` or lower durable, in
    /// order. Returns the highest number made durable by this call.
    pub fn sync_through(&mut self, number: u64) -> Result<Option<u64>, LogStoreError> {
        let mut synced = None;
        while let Some(write) = self.pending.front() {
            if write.number > number {
                break;
            }
            self.durable.apply_write(write)?;
            synced = Some(write.number);
            self.pending.pop_front();
        }
        Ok(synced)
    }

    /// Number of submitted writes not yet durable.
    pub fn pending_writes(&self) -> usize {
        self.pending.len()
    }

    /// Simulates a process crash: every write not yet durable is lost.
    pub fn crash(&mut self) {
        self.pending.clear();
        self.view = self.durable.clone();
    }

    /// Last index of the durable log.
    pub fn durable_last_index(&self) -> u64 {
        self.durable.last_index()
    }

    /// The durable hard state.
    pub fn durable_hard_state(&self) -> &HardState {
        &self.durable.hard_state
    }
}

impl LogStore for MemLogStore {
    fn hard_state(&self) -> HardState {
        self.view.hard_state.clone()
    }

    fn apply_state(&self) -> ApplyState {
        self.view.apply_state.clone()
    }

    fn snapshot_metadata(&self) -> SnapshotMetadata {
        self.view.snapshot.get_metadata().clone()
    }

    fn snapshot(&self) -> Result<Snapshot, LogStoreError> {
        Ok(self.view.snapshot.clone())
    }

    fn first_index(&self) -> u64 {
        self.view.first_index()
    }

    fn last_index(&self) -> u64 {
        self.view.last_index()
    }

    fn term(&self, index: u64) -> Result<u64, LogStoreError> {
        self.view.term(index)
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, LogStoreError> {
        self.view.entries(low, high, max_size)
    }

    fn submit(&mut self, write: LogWrite) -> Result<(), LogStoreError> {
        if write.is_empty() {
            return Ok(());
        }
        self.view.apply_write(&write)?;
        self.pending.push_back(write);
        Ok(())
    }

    fn save_apply_state(&mut self, state: &ApplyState) -> Result<(), LogStoreError> {
        self.view.apply_state = state.clone();
        self.durable.apply_state = state.clone();
        Ok(())
    }

    fn compact(&mut self, snapshot: Snapshot) -> Result<(), LogStoreError> {
        // The durable layer first: compaction only covers applied entries,
        // which are durable, so if it fails the view would fail too.
        self.durable.compact(&snapshot)?;
        self.view.compact(&snapshot)
    }
}

/// The adapter through which raft-rs reads a [`LogStore`].
///
/// raft-rs only reads through `Storage`; every write goes through the
/// driver. The one thing the adapter adds: when raft-rs needs a snapshot
/// for a follower and the stored one will not do (older than requested, or
/// made before the follower joined, so raft-rs on the follower would refuse
/// it), it answers "temporarily unavailable" and remembers that a fresh
/// snapshot is wanted; the driver passes that on as
/// `Output::snapshot_wanted`, and raft-rs asks again on a later heartbeat
/// response.
#[derive(Debug)]
pub struct RaftStore<S> {
    inner: S,
    snapshot_wanted: std::cell::Cell<bool>,
}

impl<S: LogStore> RaftStore<S> {
    /// Wraps a store.
    pub fn new(inner: S) -> Self {
        RaftStore { inner, snapshot_wanted: std::cell::Cell::new(false) }
    }

    /// Whether raft-rs asked for a snapshot the store could not give since
    /// the last call.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// The wrapped store.
    pub fn get(&self) -> &S {
        &self.inner
    }

    /// The wrapped store, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the store.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl From<LogStoreError> for raft::Error {
    fn from(error: LogStoreError) -> Self {
        match error {
            LogStoreError::Compacted { .. } => raft::Error::Store(StorageError::Compacted),
            LogStoreError::Unavailable { .. } => raft::Error::Store(StorageError::Unavailable),
            LogStoreError::SnapshotUnavailable { .. } => {
                raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)
            }
            other => raft::Error::Store(StorageError::Other(Box::new(other))),
        }
    }
}

impl<S: LogStore> raft::Storage for RaftStore<S> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let start = start_point(&self.inner)?;
        Ok(RaftState::new(start.hard_state, start.conf_state))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        // Reads are synchronous, so the context's offer to fetch
        // asynchronously is declined.
        Ok(self.inner.entries(low, high, max_size.into())?)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        Ok(self.inner.term(index)?)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.inner.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.inner.last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // raft-rs panics on any error but "temporarily unavailable" here, so
        // every failure is reported as that.
        let unavailable = || {
            self.snapshot_wanted.set(true);
            Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
        };
        let Ok(snapshot) = self.inner.snapshot() else {
            return unavailable();
        };
        let metadata = snapshot.get_metadata();
        let conf_state = metadata.get_conf_state();
        let includes_recipient = conf_state.voters.contains(&to)
            || conf_state.learners.contains(&to)
            || conf_state.voters_outgoing.contains(&to);
        if metadata.index == 0 || metadata.index < request_index || !includes_recipient {
            return unavailable();
        }
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: Bytes::from(vec![index as u8; 4]), ..Entry::default() }
    }

    fn write(number: u64, entries: Vec<Entry>) -> LogWrite {
        LogWrite { number, entries, must_sync: true, ..LogWrite::default() }
    }

    #[test]
    fn bootstrap_store_starts_after_the_bootstrap_snapshot() {
        let store = MemLogStore::bootstrap(&[1, 2, 3], &[], Bytes::new());
        assert_eq!(store.first_index(), BOOTSTRAP_INDEX + 1);
        assert_eq!(store.last_index(), BOOTSTRAP_INDEX);
        assert_eq!(store.term(BOOTSTRAP_INDEX), Ok(BOOTSTRAP_TERM));
        let start = start_point(&store).unwrap();
        assert_eq!(start.applied.index, BOOTSTRAP_INDEX);
        assert_eq!(start.conf_state.voters, vec![1, 2, 3]);
        assert!(!start.restore);
    }

    #[test]
    fn pending_writes_are_readable_but_lost_on_crash() {
        let mut store = MemLogStore::bootstrap(&[1], &[], Bytes::new());
        store.submit(write(1, vec![entry(2, 2), entry(3, 2)])).unwrap();
        store.submit(write(2, vec![entry(4, 2)])).unwrap();
        assert_eq!(store.last_index(), 4);
        assert_eq!(store.sync_through(1).unwrap(), Some(1));
        assert_eq!(store.durable_last_index(), 3);
        store.crash();
        assert_eq!(store.last_index(), 3);
        assert_eq!(store.pending_writes(), 0);
    }

    #[test]
    fn append_truncates_a_conflicting_suffix_and_refuses_gaps() {
        let mut store = MemLogStore::bootstrap(&[1], &[], Bytes::new());
        store.submit(write(1, vec![entry(2, 2), entry(3, 2), entry(4, 2)])).unwrap();
        store.submit(write(2, vec![entry(3, 3)])).unwrap();
        assert_eq!(store.last_index(), 3);
        assert_eq!(store.term(3), Ok(3));
        let gap = store.submit(write(3, vec![entry(9, 3)]));
        assert!(matches!(gap, Err(LogStoreError::Detached { first: 9, .. })));
        let hole = store.submit(write(4, vec![entry(4, 3), entry(6, 3)]));
        assert!(matches!(hole, Err(LogStoreError::NotConsecutive { index: 5 })));
    }

    #[test]
    fn compaction_keeps_later_entries_and_reports_compacted_reads() {
        let mut store = MemLogStore::bootstrap(&[1], &[], Bytes::new());
        store.submit(write(1, vec![entry(2, 2), entry(3, 2), entry(4, 2)])).unwrap();
        store.sync_through(1).unwrap();
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = 3;
        snapshot.mut_metadata().term = 2;
        store.compact(snapshot).unwrap();
        assert_eq!(store.first_index(), 4);
        assert_eq!(store.term(3), Ok(2));
        assert!(matches!(store.term(2), Err(LogStoreError::Compacted { .. })));
        assert!(matches!(store.entries(2, 5, None), Err(LogStoreError::Compacted { .. })));
        assert_eq!(store.entries(4, 5, None).unwrap().len(), 1);
        let mut wrong = Snapshot::default();
        wrong.mut_metadata().index = 4;
        wrong.mut_metadata().term = 9;
        assert!(matches!(store.compact(wrong), Err(LogStoreError::BadCompaction { .. })));
    }

    #[test]
    fn a_snapshot_newer_than_the_checkpoint_forces_a_restore() {
        let mut store = MemLogStore::bootstrap(&[1], &[], Bytes::new());
        store.submit(write(1, vec![entry(2, 2), entry(3, 2)])).unwrap();
        store.sync_through(1).unwrap();
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = 3;
        snapshot.mut_metadata().term = 2;
        store.compact(snapshot).unwrap();
        let start = start_point(&store).unwrap();
        assert!(start.restore);
        assert_eq!(start.applied.index, 3);
        // The commit index lagged (no hard state was written) and is raised.
        assert_eq!(start.hard_state.commit, 3);
    }

    #[test]
    fn entries_respect_max_size_but_return_at_least_one() {
        let mut store = MemLogStore::bootstrap(&[1], &[], Bytes::new());
        store.submit(write(1, vec![entry(2, 2), entry(3, 2), entry(4, 2)])).unwrap();
        assert_eq!(store.entries(2, 5, Some(0)).unwrap().len(), 1);
        assert_eq!(store.entries(2, 5, None).unwrap().len(), 3);
        assert!(matches!(store.entries(2, 9, None), Err(LogStoreError::Unavailable { .. })));
    }
}
